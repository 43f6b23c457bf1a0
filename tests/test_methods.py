"""Every method and ablation through the pipeline's stages on the tiny preset, few samples per task."""

from __future__ import annotations

import json
import math

import pytest

from conftest import input_stages, make_pipeline_repo, run_stages, small_params, small_task, stream_stages, write_params
from drape.methods import METHODS
from drape.metrics import read_matrix_csv

TASKS = {"digits": "digits-classify", "color": "shapes-color", "parity": "digits-parity"}

# name -> params overrides; the ablations are settings of the drape section.
VARIANTS = {name: {"method": name} for name in METHODS}
VARIANTS.update(
    {
        "drape-no-nullspace": {"method": "drape", "drape": {"nullspace": False}},
        "drape-frozen-projector": {"method": "drape", "drape": {"freeze_projector_after_first_task": True}},
        "drape-oracle": {"method": "drape", "drape": {"oracle_routing": True}},
        "drape-fixed-prompts": {"method": "drape", "drape": {"prompts": "fixed"}},
    }
)
ROUTED = {"drape", "modalprompt", "hide_lora", "dualprompt", "drape-no-nullspace", "drape-frozen-projector", "drape-oracle", "drape-fixed-prompts"}


def stream() -> dict:
    tasks, after = {}, "init"
    for name, kind in TASKS.items():
        tasks[name] = small_task(kind, after, n_train=4, n_test=3, batch_size=2)
        after = name
    return tasks


def small_method_params(**overrides) -> dict:
    params = small_params(stream=stream())
    for section in ("seq_ft", "joint"):
        params[section].update(hidden=32, prompt_length=4, heads=2)
    params["l2p"].update(pool_size=4, prompt_length=2, top_k=2)
    params["coda_prompt"].update(components_per_task=2, prompt_length=4)
    params["modalprompt"].update(prompt_length=4)
    for section in ("seq_lora", "o_lora", "hide_lora"):
        params[section].update(rank=2)
    for name, values in overrides.items():
        params[name] = {**params[name], **values} if isinstance(values, dict) else values
    return params


def run_stream(repo) -> dict:
    """Run init, then train/prototypes/evaluate per task and the report; return the metrics."""
    run_stages(repo, stream_stages(TASKS))
    return json.loads((repo / "results/report/metrics.json").read_text())


@pytest.fixture(scope="module")
def repo(tiny_models, tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("methods") / "repo", small_method_params(), models=tiny_models)
    run_stages(repo, input_stages(TASKS))
    return repo


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_runs_whole_stream(repo, variant):
    write_params(repo, small_method_params(**VARIANTS[variant]))
    metrics = run_stream(repo)

    matrix = read_matrix_csv(repo / "results/report/matrix.csv")
    assert matrix.trained == list(TASKS)
    for key in ("MFN", "MFT", "MAA", "BWT", "forgetting", "projector_drift", "stored_parameters", "latency_ms_per_sample"):
        assert math.isfinite(metrics[key]), key
    assert ("routing_accuracy" in metrics) == (variant in ROUTED)
    assert metrics["stored_parameters"] > 0

    state = json.loads((repo / "results/train/parity/state.json").read_text())
    assert state["tasks"] == list(TASKS)
    assert state["fingerprint"]["method"] == VARIANTS[variant]["method"]
    log = json.loads((repo / "results/train/parity/train_log.json").read_text())
    if variant == "zero_shot":
        assert log["steps"] == 0
        assert log["trainable_parameters"] == 0
    else:
        assert log["steps"] == 2
        assert log["trainable_parameters"] > 0
