"""Print a method's training and inference throughput on the materialised models.

Usage (after ``dvc repro models`` or a full run):

    python benchmarks/step_throughput.py [--method drape] [--models models] [--batch-size 8] [--steps 5]

It times optimizer steps of one task's parameters and the shared projector on random
features (the frozen LLM's forward and backward dominate), then greedy decoding, and
prints samples per second and the process's peak resident memory. The numbers
depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from drape.encoders import load_llm
from drape.features import FeatureSet
from drape.methods import METHODS, create_method
from drape.methods.base import ModelDims
from drape.mllm import FrozenLLM

INSTRUCTION = "What digit is written in the image? Answer with a single digit."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="drape", choices=list(METHODS), help="the method to time (default settings)")
    parser.add_argument("--models", type=Path, default=Path("models"), help="the materialised models folder")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    args = parser.parse_args()

    encoder = json.loads((args.models / "manifest.json").read_text())["encoder"]
    llm = FrozenLLM(*load_llm(args.models / "llm"))
    dims = ModelDims(encoder=encoder["name"], vision_dim=encoder["image_dim"], text_dim=encoder["text_dim"], llm_dim=llm.hidden_size)
    state = create_method(args.method, METHODS[args.method][0](), dims)
    state.attach(llm)
    state.add_task("benchmark")
    trainable = state.task_parameters("benchmark") + list(state.projector.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    instructions = [INSTRUCTION] * args.batch_size
    batch = FeatureSet(
        ids=[str(i) for i in range(args.batch_size)],
        instructions=instructions,
        answers=["7"] * args.batch_size,
        answer_lists=[None] * args.batch_size,
        patches=torch.randn(args.batch_size, encoder["num_patches"], encoder["image_dim"]),
        pooled=torch.randn(args.batch_size, encoder["image_dim"]),
        text=torch.randn(args.batch_size, encoder["text_dim"]),
    )

    durations = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        state.train()
        content = state.content(llm, batch, "benchmark")
        llm.loss(content, instructions, batch.answers).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up allocators and kernels
            durations.append(time.perf_counter() - started)
    train_rate = args.batch_size * len(durations) / sum(durations)

    started = time.perf_counter()
    state.eval()
    with torch.no_grad():
        content = state.content(llm, batch, "benchmark")
        llm.generate(content, instructions, max_new_tokens=5)
    latency = (time.perf_counter() - started) / args.batch_size

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"method             {args.method} ({sum(p.numel() for p in trainable)} trainable parameters)")
    print(f"threads            {torch.get_num_threads()}")
    print(f"train step         {sum(durations) / len(durations):.2f} s for {args.batch_size} samples ({train_rate:.2f} samples/s)")
    print(f"inference latency  {latency * 1000:.0f} ms per sample (batch {args.batch_size}, 5 new tokens)")
    print(f"peak memory        {peak_mib:.0f} MiB resident")


if __name__ == "__main__":
    main()
