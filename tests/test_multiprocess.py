"""Data-parallel stages: ``accelerate launch`` on two CPU processes against one process.

The same stream runs twice from the same data, features and initial state: once in one
plain process, once with the data-parallel stages launched on two processes that talk
through gloo. The mini-batches (4 samples) split 2/2, 2/1 and 1/0 between the processes,
and the evaluation batches (2 samples) alternate between them.

DRAPE runs on the embedded real models under ``accelerate launch --cpu``, which starts
the processes through Open MPI's ``mpirun``. SmolLM2 decodes real words, so the
predictions and the accuracy matrix check the evaluation's numerics as well as its order,
routing and gathering. O-LoRA, whose adapters live inside the LLM, runs on the tiny
preset under ``accelerate launch --multi_gpu``, the ``torchrun`` launcher that GPU machines
use. There the random LLM decodes empty answers, so the trained weights and losses carry
the check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, REPO_ROOT, free_port, input_stages, make_pipeline_repo, run_stages, small_params, small_task, write_params
from drape.distributed import shard_bounds
from drape.metrics import read_matrix_csv
from drape.nullspace import NullSpaceProjector

TASKS = {"digits": ("digits-classify", 5), "parity": ("digits-parity", 7)}
"""Task name -> (data kind, training samples): batches of 4+1 and 4+3 samples."""

METHODS = {
    "drape": ({"method": "drape"}, ("train", "prototypes", "evaluate"), "embedded", "cpu"),
    "o_lora": ({"method": "o_lora", "o_lora": {"rank": 2, "l2_weight": 0.01}}, ("train",), "tiny", "torchrun"),
}
"""Method -> (params overrides, stages launched on two processes, preset, launcher).

DRAPE has null-space covariances, a projector and generators. O-LoRA trains adapters
inside the LLM with a regularizer. Only O-LoRA's training is launched on two processes,
because its prototypes and evaluation run the same code as DRAPE's and each launch costs
about 10 s of process start-up on two cores.
"""

STAGES = ("train", "prototypes", "evaluate")

LEARNING_RATE = 1e-3
"""small_task's generator and projector learning rate: the largest change of a weight in one AdamW step."""

# Float32 training: the shards pad their sequences to other lengths than the whole batch,
# so token losses and gradients differ from a single process's in the last bits. AdamW
# divides each gradient by its running magnitude, which turns those differences into steps
# of up to the learning rate for gradients that are zero up to rounding. On the embedded
# models about one weight in 100,000 differs by more than a tenth of a step (the largest
# by 1.7 steps, in a projector row that gets almost no gradient), while the median weight
# differs by about 1e-9. A wrong reduction (a lost shard, a double-counted term) moves most
# weights by a sizeable part of a step, and changes the logged gradient norms.
OUTLIER_DIFFERENCE = 0.1 * LEARNING_RATE
MAX_OUTLIER_FRACTION = 1e-4
MEDIAN_WEIGHT_DIFFERENCE = 1e-7
LOSS_RTOL = 1e-5
# The first projector layer's inputs are the fixed features, so its covariance differs only
# by the order of float64 additions (about 1e-16 of its largest entry). The second layer's
# inputs carry the trained weights' differences, so its covariance agrees to about 1e-5 of
# its largest entry on the embedded models. A lost or doubled shard changes the sums by a
# sizeable fraction.
COVARIANCE_ATOL_PER_SCALE = {"covariance.fc1": 1e-12, "covariance.fc2": 1e-4}


def stream() -> dict:
    tasks, after = {}, "init"
    for name, (kind, n_train) in TASKS.items():
        tasks[name] = small_task(kind, after, n_train=n_train, n_test=3, batch_size=4)
        after = name
    return tasks


def method_params(method: str) -> dict:
    params = small_params(METHODS[method][2], stream=stream(), evaluate={"batch_size": 2, "max_new_tokens": 3})
    for name, values in METHODS[method][0].items():
        params[name] = {**params[name], **values} if isinstance(values, dict) else values
    return params


def cpu_environment() -> dict:
    """The environment of a launched stage: this checkout's ``drape``, CPU only, one thread."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PATH=str(BIN) + os.pathsep + env["PATH"],
        # Open MPI refuses to start processes as root (as in CI containers) without both.
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    return env


def run(command: list[str], repo: Path) -> None:
    result = subprocess.run(command, cwd=repo, env=cpu_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def run_single_process(repo: Path, stages: tuple[str, ...] = STAGES) -> None:
    """``stages`` of every task, in stream order, in one fresh CPU process, as ``drape stage ...`` runs them."""
    calls = [["stage", stage, "--task", task] for task in TASKS for stage in stages]
    script = f"from drape.cli import main\nfor argv in {calls!r}:\n    assert main(argv) == 0, argv\n"
    run([sys.executable, "-c", script], repo)


def launch_command(launcher: str, workdir: Path) -> list[str]:
    """``accelerate launch`` of ``drape.cli`` on two CPU processes with ``launcher``.

    ``cpu``: ``--cpu`` starts several processes only through ``mpirun`` with a hostfile;
    Open MPI comes with the test extras. ``torchrun``: ``--multi_gpu`` starts them through
    ``torchrun``, and without a visible GPU drape joins them in one gloo group.
    """
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    common += ["--main_process_port", str(free_port())]
    if launcher == "cpu":
        hostfile = workdir / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        options = ["--cpu", "--mpirun_hostfile", str(hostfile)]
    else:
        options = ["--multi_gpu"]
    return [str(BIN / "accelerate"), "launch", *options, *common, "-m", "drape.cli"]


def run_two_processes(repo: Path, launched: tuple[str, ...], launcher: str) -> None:
    """Run ``launched`` stages on two processes started by ``launcher``, then the others in one.

    Training depends only on earlier training, so the others can follow all launches.
    """
    launch = launch_command(launcher, repo.parent)
    for task in TASKS:
        for stage in launched:
            run([*launch, "stage", stage, "--task", task], repo)
    others = tuple(stage for stage in STAGES if stage not in launched)
    if others:
        assert launched == ("train",), launched
        run_single_process(repo, others)


@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory):
    """Return, for a method, a pipeline repository with every task's data and features on its preset.

    Each preset's repository is built once, on first use.
    """
    repos = {}

    def prepare(method: str) -> Path:
        preset = METHODS[method][2]
        if preset not in repos:
            models = request.getfixturevalue(f"{preset}_models")
            repo = make_pipeline_repo(tmp_path_factory.mktemp(f"multiprocess-{preset}") / "prepared", method_params(method), models=models)
            run_stages(repo, input_stages(TASKS))
            repos[preset] = repo
        return repos[preset]

    return prepare


@pytest.fixture(scope="module", params=list(METHODS))
def runs(request, prepared, tmp_path_factory) -> tuple[Path, Path, str]:
    """The stream of one method run in one process and in two; returns both repositories and the method."""
    method = request.param
    repos = []
    for name in ("single", "parallel"):
        repo = tmp_path_factory.mktemp(f"{method}-{name}") / "repo"
        shutil.copytree(prepared(method), repo, symlinks=True)
        write_params(repo, method_params(method))
        run_stages(repo, [["stage", "init"]])
        repos.append(repo)
    single, parallel = repos

    started = time.perf_counter()
    run_single_process(single)
    run_two_processes(parallel, METHODS[method][1], METHODS[method][3])
    print(f"{method}: both streams in {time.perf_counter() - started:.1f} s")

    for repo in repos:
        run_stages(repo, [["stage", "report", "--no-mlflow"]])
    return single, parallel, method


def test_accuracy_matrix_is_identical(runs):
    single, parallel, _ = runs
    expected = read_matrix_csv(single / "results/report/matrix.csv")
    found = read_matrix_csv(parallel / "results/report/matrix.csv")
    assert found.trained == expected.trained == list(TASKS)
    assert (parallel / "results/report/matrix.csv").read_text() == (single / "results/report/matrix.csv").read_text()


@pytest.mark.parametrize("task", list(TASKS))
def test_predictions_are_identical(runs, task):
    single, parallel, _ = runs
    expected = (single / "results/eval" / task / "predictions.jsonl").read_text().splitlines()
    found = (parallel / "results/eval" / task / "predictions.jsonl").read_text().splitlines()
    # Forward transfer is on, so every task's 3 test samples are evaluated, in the original order.
    assert len(found) == 3 * len(TASKS)
    assert found == expected


def test_real_models_decode_words(runs):
    """On the embedded preset the compared predictions are SmolLM2's words, not empty strings."""
    _, parallel, method = runs
    if METHODS[method][2] != "embedded":
        pytest.skip("the tiny preset's random LLM decodes empty answers")
    rows = [json.loads(line) for task in TASKS for line in (parallel / "results/eval" / task / "predictions.jsonl").read_text().splitlines()]
    assert sum(bool(row["prediction"].strip()) for row in rows) >= len(rows) // 2, [row["prediction"] for row in rows]


@pytest.mark.parametrize("task", list(TASKS))
def test_prototypes_match(runs, task):
    single, parallel, _ = runs
    expected = load_file(single / "results/prototypes" / task / "prototypes.safetensors")
    found = load_file(parallel / "results/prototypes" / task / "prototypes.safetensors")
    assert expected.keys() == found.keys()
    for key in expected:
        # Every process computes the means over all samples, in the same order.
        assert torch.equal(found[key], expected[key]), key


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the key bias when it is an attention layer's packed input bias.

    A key bias adds the same number to a query's scores over all keys, and the softmax
    removes it. So its gradient is zero up to rounding, and AdamW moves each of its entries
    by up to a full step in a direction set by that rounding.
    """
    if not name.endswith("in_proj_bias"):
        return tensor
    width = tensor.numel() // 3
    return torch.cat([tensor[:width], tensor[2 * width :]])


@pytest.mark.parametrize("task", list(TASKS))
def test_trained_weights_match(runs, task):
    single, parallel, _ = runs
    for name in ("projector.safetensors", "parameters.safetensors"):
        expected = load_file(single / "results/train" / task / name)
        found = load_file(parallel / "results/train" / task / name)
        assert expected.keys() == found.keys()
        for key in expected:
            assert torch.isfinite(found[key]).all(), f"{name}: {key}"
            difference = without_key_bias(key, found[key] - expected[key]).abs().flatten()
            outliers = float((difference > OUTLIER_DIFFERENCE).float().mean())
            assert outliers <= MAX_OUTLIER_FRACTION, f"{name}: {key}: {outliers:.3g} of the weights differ by more than {OUTLIER_DIFFERENCE:g}"
            assert difference.median() < MEDIAN_WEIGHT_DIFFERENCE, f"{name}: {key}: median difference {difference.median():.3g}"


@pytest.mark.parametrize("task", list(TASKS))
def test_training_log_matches(runs, task):
    single, parallel, method = runs
    expected = json.loads((single / "results/train" / task / "train_log.json").read_text())
    found = json.loads((parallel / "results/train" / task / "train_log.json").read_text())
    assert found["steps"] == expected["steps"] == 2
    # A launch that silently starts one process would pass every other comparison.
    assert (expected["processes"], found["processes"]) == (1, 2)
    assert found["samples_seen"] == expected["samples_seen"]
    for key in ("losses", "regularizer", "gradient_norms"):
        assert len(found[key]) == len(expected[key]), key
        assert torch.allclose(torch.tensor(found[key]), torch.tensor(expected[key]), rtol=LOSS_RTOL), (key, found[key], expected[key])
    assert all(norm > 0 for norm in found["gradient_norms"])
    # O-LoRA's L2 term on its adapters runs at every step; DRAPE has no regularizer.
    assert len(found["regularizer"]) == (2 if method == "o_lora" else 0)


@pytest.mark.parametrize("task", list(TASKS))
def test_nullspace_covariances_match(runs, task):
    single, parallel, _ = runs
    path = Path("results/train") / task / "nullspace.safetensors"
    if not (single / path).is_file():
        assert not (parallel / path).is_file()
        pytest.skip("the method keeps no null-space covariances")
    expected = load_file(single / path)
    found = load_file(parallel / path)
    assert expected.keys() == found.keys()
    assert list(expected) == ["covariance.fc1", "covariance.fc2"]
    for key in expected:
        scale = float(expected[key].abs().max())
        assert scale > 0, key
        difference = (found[key] - expected[key]).abs().max()
        assert torch.allclose(found[key], expected[key], rtol=0, atol=COVARIANCE_ATOL_PER_SCALE[key] * scale), f"{key}: max difference {difference:.3g}"


def test_no_partial_outputs_left(runs):
    _, parallel, _ = runs
    assert not list(parallel.glob("results/**/*.partial"))


@pytest.mark.parametrize(("count", "world"), [(4, 2), (3, 2), (1, 2), (0, 2), (7, 3), (5, 1)])
def test_shards_cover_items_in_order(count, world):
    bounds = [shard_bounds(count, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0
    assert bounds[-1][1] == count
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert end == start
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_nullspace_reduce_adds_summed_inputs():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    inputs = torch.randn(6, 3)
    reference = NullSpaceProjector(layer, 0.99)
    reduced = NullSpaceProjector(layer, 0.99)
    with reference.accumulating():
        layer(inputs[:4])
    with reduced.accumulating():
        layer(inputs[:4])

    # A reduce that doubles stands for two processes that saw the same samples.
    with reference.accumulating():
        layer(inputs[4:])
        layer(inputs[4:])
    with reduced.accumulating(reduce=lambda covariance: 2 * covariance):
        layer(inputs[4:])
    assert torch.allclose(reduced.covariances[""], reference.covariances[""], rtol=1e-12)


def test_shard_losses_add_up_to_batch_mean(tiny_models):
    from drape.encoders import load_llm
    from drape.mllm import FrozenLLM

    llm = FrozenLLM(*load_llm(tiny_models / "llm"))
    torch.manual_seed(0)
    content = torch.randn(3, 2, llm.hidden_size)
    instructions = ["Which digit is shown?", "Is the digit even or odd?", "Name the color."]
    answers = ["seven", "odd", "dark blue"]

    mean = llm.loss(content, instructions, answers)
    tokens = llm.answer_tokens(answers)
    shards = [(0, 2), (2, 3)]
    summed = sum(llm.loss(content[a:b], instructions[a:b], answers[a:b], tokens=tokens) for a, b in shards)
    assert tokens == sum(len(ids) + 1 for ids in llm.tokenize(answers))
    assert torch.allclose(summed, mean, rtol=1e-5), (float(summed), float(mean))
