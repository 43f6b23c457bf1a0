"""Check a CUDA machine: the embedded pipeline in bf16, then the llava-7b architecture at full size.

Usage, from the repository root of an installed checkout (``bash scripts/setup.sh``), on a
machine with one CUDA GPU and no internet:

    python benchmarks/gpu_check.py                     # both parts
    python benchmarks/gpu_check.py --skip-pipeline     # the llava-7b step only
    python benchmarks/gpu_check.py --device cpu --scale scaled-down --skip-pipeline   # dry run

Part 1 copies the repository's tracked files to a temporary folder, shrinks the embedded
stream (``--n-train`` samples per task, one epoch) and runs ``dvc repro`` there with
``ACCELERATE_MIXED_PRECISION=bf16``, so training runs under bf16 autocast through
accelerate. It prints the wall time, the metrics and the peak GPU memory in use (sampled
every 0.5 s with ``torch.cuda.mem_get_info``, so other processes on the GPU count too).

Part 2 builds the llava-7b architecture (open_clip ViT-L-14-336, LlamaForCausalLM with
Vicuna-7B's shape, the mlp2x_gelu projector) with random weights, casts the frozen towers
to bf16 with gradient checkpointing, and times optimizer steps of DRAPE's generator and
projector: frozen penultimate-layer patch features, projector, generator, then the LLM's
forward and backward over ``[prompts; 576 visual tokens; instruction]``. It prints seconds
per step, samples per second and ``torch.cuda.max_memory_allocated``.

Both parts stop at their time limits (``--pipeline-timeout``, ``--steps``), so the whole
check is meant to finish within 8 minutes on one GPU; the script prints its total time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


class MemorySampler:
    """Track the peak GPU memory in use on one device by sampling it in a thread."""

    def __init__(self, device: int = 0, interval: float = 0.5):
        self.device, self.interval = device, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_pipeline(args: argparse.Namespace) -> dict:
    """Run the shrunk embedded stream with ``dvc repro`` in a temporary copy, in bf16."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(prefix="drape-gpu-check-") as tmp:
        work = Path(tmp) / "repo"
        for name in files:
            if name.startswith(("results/", "docs/")) or name == "dvc.lock":
                continue
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target)
        params = yaml.safe_load((work / "params.yaml").read_text())
        for task in params["stream"].values():
            task["data"].update(n_train=args.n_train, n_test=args.n_test)
            task["train"].update(epochs=1)
        params["tracking"]["mlflow_uri"] = f"sqlite:///{work / 'mlflow.db'}"
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=check", "-c", "user.email=check@localhost", "commit", "-qm", "check"]):
            subprocess.run(command, cwd=work, check=True)

        env = dict(os.environ, ACCELERATE_MIXED_PRECISION="bf16")
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        started = time.perf_counter()
        sampler = MemorySampler() if torch.cuda.is_available() else None
        try:
            with sampler or contextlib.nullcontext():
                result = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=args.pipeline_timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {args.pipeline_timeout} s"}
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            return {"status": f"failed (exit {result.returncode})", "stderr": result.stderr[-2000:]}
        metrics = json.loads((work / "results/report/metrics.json").read_text())
        return {
            "status": "ok",
            "seconds": round(seconds, 1),
            "peak_gpu_memory_gib": round(sampler.peak / 2**30, 2) if sampler else None,
            "metrics": metrics,
        }


def step_llava(args: argparse.Namespace) -> dict:
    """Time DRAPE training steps on the llava-7b architecture with random weights."""
    from drape.methods.drape.config import DrapeConfig
    from drape.methods.drape.model import PromptGenerator
    from drape.presets.llava import apply_training_flags, build_llava_architecture, select_patch_features

    device = torch.device(args.device)
    started = time.perf_counter()
    model = build_llava_architecture(device=device, scale=args.scale)
    spec = model.spec
    bf16 = device.type == "cuda"
    llm = apply_training_flags(model.llm, spec.training.model_copy(update={"bf16": bf16}))
    llm.requires_grad_(False)
    vision = model.vision.to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
    projector = model.projector.to(device)
    generator = PromptGenerator(spec.llm.hidden_size, DrapeConfig(hidden=args.hidden, prompt_length=10, heads=8)).to(device)
    trainable = list(projector.parameters()) + list(generator.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=2e-5)
    build_seconds = time.perf_counter() - started

    size = spec.vision.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    instruction = torch.randint(0, spec.llm.vocab_size, (args.batch_size, args.text_tokens), device=device)
    answer = torch.randint(0, spec.llm.vocab_size, (args.batch_size, args.answer_tokens), device=device)
    embed = llm.get_input_embeddings()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    durations = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        with torch.no_grad():
            patches = select_patch_features(vision, pixels, spec.vision.select_layer).float()  # (B, 576, 1024)
        visual = projector(patches)  # (B, 576, d_llm)
        text = embed(instruction).float()
        prompts = generator(text, torch.ones_like(instruction, dtype=torch.bool), visual)  # (B, 10, d_llm)
        inputs = torch.cat([prompts, visual, text, embed(answer).float()], dim=1).to(embed.weight.dtype)
        labels = torch.full(inputs.shape[:2], -100, dtype=torch.long, device=device)
        labels[:, -args.answer_tokens :] = answer
        loss = llm(inputs_embeds=inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step warms up kernels and the allocator
            durations.append(time.perf_counter() - began)

    per_step = sum(durations) / len(durations)
    return {
        "scale": args.scale,
        "device": str(device),
        "parameters": model.parameter_counts(),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "sequence_length": inputs.shape[1],
        "build_seconds": round(build_seconds, 1),
        "seconds_per_step": round(per_step, 3),
        "samples_per_second": round(args.batch_size / per_step, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": round(float(loss.detach()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device of part 2 (default: cuda)")
    parser.add_argument("--scale", default="full", choices=["full", "scaled-down"], help="llava-7b size of part 2")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step in part 2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps in part 2, after one warm-up step")
    parser.add_argument("--hidden", type=int, default=512, help="DRAPE generator width H in part 2")
    parser.add_argument("--text-tokens", type=int, default=48, help="instruction tokens per sample in part 2")
    parser.add_argument("--answer-tokens", type=int, default=8, help="answer tokens per sample in part 2")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip part 1 (the embedded stream)")
    parser.add_argument("--n-train", type=int, default=48, help="training samples per task in part 1")
    parser.add_argument("--n-test", type=int, default=10, help="test samples per task in part 1")
    parser.add_argument("--pipeline-timeout", type=int, default=300, help="seconds before part 1 is stopped")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; pass --device cpu --scale scaled-down for a dry run")

    started = time.perf_counter()
    report = {}
    if not args.skip_pipeline:
        report["pipeline_bf16"] = run_pipeline(args)
        print(json.dumps({"pipeline_bf16": report["pipeline_bf16"]}, indent=2), flush=True)
    report["llava_step"] = step_llava(args)
    print(json.dumps({"llava_step": report["llava_step"]}, indent=2), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
