"""A one-task stream: its report (backward-transfer metrics have no entries) and its output files."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from conftest import input_stages, make_pipeline_repo, run_stages, small_params, small_task, stream_stages
from drape.cli import main


def reject_constant(name: str) -> None:
    raise ValueError(f"metrics.json holds {name}, which is not JSON")


@pytest.fixture(scope="module")
def one_task_repo(tiny_models, tmp_path_factory):
    params = small_params(stream={"digits": small_task("digits-classify", "init", n_train=4, n_test=2)})
    repo = make_pipeline_repo(tmp_path_factory.mktemp("report") / "repo", params, models=tiny_models)
    run_stages(repo, input_stages(["digits"]) + stream_stages(["digits"]))
    return repo


def test_metrics_json_is_strict_json(one_task_repo):
    text = (one_task_repo / "results/report/metrics.json").read_text()

    metrics = json.loads(text, parse_constant=reject_constant)

    assert metrics["BWT"] is None
    assert metrics["forgetting"] is None
    assert isinstance(metrics["MFN"], float)


def test_show_marks_undefined_metrics(one_task_repo, capsys):
    assert main(["show", "--report", str(one_task_repo / "results/report")]) == 0

    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["BWT"].endswith("n/a (needs entries of 2+ tasks)")


def test_checkpoints_follow_umask(one_task_repo):
    mask = os.umask(0)
    os.umask(mask)
    files = sorted((one_task_repo / "results").rglob("*.safetensors"))

    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


@pytest.mark.parametrize(
    ("values", "expected"),
    [([[50.0, 130.5], [math.nan, 20.0]], 130.5), ([[50.0]], 100.0), ([[math.nan]], 100.0)],
)
def test_heatmap_scale_covers_caption_scores(values, expected):
    from drape.report import score_scale

    assert score_scale(np.array(values)) == expected


def test_heatmap_title_without_caption_tasks(one_task_repo):
    from drape.config import load_config
    from drape.report import heatmap_title

    assert heatmap_title(load_config(one_task_repo / "params.yaml")) == "Accuracy (%) after each task (row: trained)"
