"""The DVC pipeline end to end on the tiny preset: caching, partial re-runs, metrics, plots, MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_pipeline_repo, small_params, write_params

METRIC_KEYS = {
    "MFN", "MFT", "MAA", "BWT", "forgetting", "routing_accuracy", "projector_drift",
    "trainable_parameters_per_task", "stored_parameters", "latency_ms_per_sample",
}


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    repo = make_pipeline_repo(tmp_path_factory.mktemp("dvc") / "repo", small_params())
    return repo, dvc(repo, "repro").stdout


def test_first_repro_runs_every_stage(reproduced):
    _, output = reproduced
    ran = stages_run(output)
    expected = {"models", "init", "report"} | {f"{stage}@{task}" for stage in ("data", "features", "train", "prototypes", "evaluate") for task in ("digits", "parity")}
    assert set(ran) == expected
    assert "Accuracy matrix" in output
    assert "MFN" in output


def test_report_files_and_metrics(reproduced):
    repo, _ = reproduced
    metrics = json.loads((repo / "results/report/metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    matrix = (repo / "results/report/matrix.csv").read_text().splitlines()
    assert matrix[0] == "trained,digits,parity"
    assert len(matrix) == 3
    metrics_table = dvc(repo, "metrics", "show").stdout
    for key in METRIC_KEYS:
        assert key in metrics_table


def test_plots_show_renders_heatmap(reproduced):
    repo, _ = reproduced
    out = repo / "plots_html"
    dvc(repo, "plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    assert "heatmap.png" in page
    assert any(path.name.endswith("heatmap.png") for path in out.rglob("*.png"))


def test_mlflow_parent_with_child_per_task(reproduced):
    repo, _ = reproduced
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("drape-mini-stream")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["launcher"] == "dvc"
    assert set(parent.data.metrics) >= METRIC_KEYS
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["task"] for run in children) == ["digits", "parity"]
    losses = client.get_metric_history(children[0].info.run_id, "train_loss")
    assert len(losses) >= 2
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/heatmap.png" in artifacts
    assert "report/matrix.csv" in artifacts


def test_second_repro_is_noop(reproduced):
    repo, _ = reproduced
    again = dvc(repo, "repro").stdout
    assert stages_run(again) == []


def test_code_change_marks_its_stages(reproduced):
    repo, _ = reproduced
    routing = repo / "drape/routing.py"
    source = routing.read_text()
    # Byte-compiled files are in .dvcignore, so a Python run does not change the hashes.
    cache = repo / "drape/scorers/__pycache__/text.cpython-311.pyc"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(b"compiled")
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}

    routing.write_text(source + "\n# edited\n")
    try:
        changed = json.loads(dvc(repo, "status", "--json").stdout)
    finally:
        routing.write_text(source)
    assert sorted(changed) == ["evaluate@digits", "evaluate@parity", "prototypes@digits", "prototypes@parity"]
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_last_task_change_reruns_only_it(reproduced):
    # Runs after the tests above, which read the first reproduction's outputs.
    repo, _ = reproduced
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["stream"]["parity"]["train"]["epochs"] = 2
    write_params(repo, params)
    changed = dvc(repo, "repro").stdout
    assert sorted(stages_run(changed)) == ["evaluate@parity", "report", "train@parity"]


def test_train_alone_prints_score(reproduced):
    repo, _ = reproduced
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    result = subprocess.run(["drape", "train-alone", "--task", "parity"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("parity"))
    score = float(line.split("score")[1].split("%")[0])
    assert 0.0 <= score <= 100.0
    assert not (repo / "results/train/parity.partial").exists()
