"""The whole stream on the embedded real models (SmolLM2, EfficientNet-Lite0, MiniLM), few samples per task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import input_stages, make_pipeline_repo, run_stages, small_params, small_task, stream_stages
from drape.metrics import read_matrix_csv

KINDS = {
    "digits": "digits-classify",
    "fashion": "fashion-classify",
    "color": "shapes-color",
    "parity": "digits-parity",
    "shape": "shapes-choice",
}


@pytest.fixture(scope="module")
def embedded_run(embedded_models, tmp_path_factory):
    stream, after = {}, "init"
    for name, kind in KINDS.items():
        stream[name] = small_task(kind, after, n_train=4, n_test=3, epochs=2, batch_size=2)
        after = name
    params = small_params(preset="embedded", stream=stream)
    repo = make_pipeline_repo(tmp_path_factory.mktemp("e2e") / "repo", params, models=embedded_models)
    run_stages(repo, input_stages(KINDS) + stream_stages(KINDS))
    return repo


def test_matrix_covers_every_stage_and_task(embedded_run):
    matrix = read_matrix_csv(embedded_run / "results/report/matrix.csv")
    assert matrix.tasks == list(KINDS)
    assert matrix.trained == list(KINDS)
    assert np.isfinite(matrix.values).all()
    assert ((matrix.values >= 0) & (matrix.values <= 100)).all()


def test_metrics_are_finite(embedded_run):
    metrics = json.loads((embedded_run / "results/report/metrics.json").read_text())
    for key in ("MFN", "MFT", "MAA", "BWT", "forgetting", "routing_accuracy", "projector_drift"):
        assert math.isfinite(metrics[key]), key


def test_routing_uses_real_encoders(embedded_run):
    # Tasks sharing an image source (digits/parity, fashion/choice) differ in their
    # instructions; the MiniLM text prototypes must tell them apart.
    metrics = json.loads((embedded_run / "results/report/metrics.json").read_text())
    assert metrics["routing_accuracy"] >= 90.0


def test_predictions_are_decoded_text(embedded_run):
    rows = [json.loads(line) for line in (embedded_run / "results/eval/shape/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3
    assert all(isinstance(row["prediction"], str) for row in rows)
    assert {row["routed_task"] for row in rows} <= set(KINDS)


def test_scores_have_no_corpus_fields(embedded_run):
    # No task of this stream is a caption task, so scores.json keeps its three keys.
    for stage in KINDS:
        text = (embedded_run / "results/eval" / stage / "scores.json").read_text()
        scores = json.loads(text)
        assert list(scores) == ["trained", "scores", "timing"]
        assert text == json.dumps({"trained": stage, "scores": scores["scores"], "timing": scores["timing"]}, indent=2)


def test_checkpoints_are_safetensors(embedded_run):
    files = {path.name for path in (embedded_run / "results/train/shape").iterdir()}
    assert {"projector.safetensors", "parameters.safetensors", "nullspace.safetensors", "state.json"} <= files
    assert not any(name.endswith((".pt", ".pth", ".bin", ".pkl")) for name in files)
