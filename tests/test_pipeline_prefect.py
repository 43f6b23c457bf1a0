"""The Prefect flow and the process-pool deployment against a real Prefect server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import make_pipeline_repo, small_params

BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def api_post(env: dict, path: str) -> list[dict]:
    """POST an empty filter to the server's REST API and return the decoded list."""
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path, data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def read_server(env: dict) -> tuple[list[dict], list[dict]]:
    return api_post(env, "/flow_runs/filter"), api_post(env, "/artifacts/filter")


def mlflow_launchers(repo: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("drape-mini-stream")
    runs = client.search_runs([experiment.experiment_id])
    return [run.data.tags["launcher"] for run in runs if "mlflow.parentRunId" not in run.data.tags]


def test_flow_then_deployment_on_process_pool(prefect_server, tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo", small_params())
    env = dict(prefect_server, PWD=str(repo))

    # The flow, run directly against the server.
    result = run([sys.executable, "flows/pipeline.py", "."], repo, env)
    assert '"MFN"' in result.stdout
    runs, artifacts = read_server(env)
    assert [run["state"]["type"] for run in runs] == ["COMPLETED"]
    assert "accuracy-matrix" in {artifact["key"] for artifact in artifacts}
    table = next(artifact for artifact in artifacts if artifact["key"] == "accuracy-matrix")
    assert "digits" in str(table["data"])
    assert mlflow_launchers(repo) == ["prefect"]

    # The deployment from prefect.yaml, picked up by a process worker.
    run([str(BIN / "prefect"), "work-pool", "create", "local-process", "--type", "process"], repo, env)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "mini-stream"], repo, env)
    run([str(BIN / "prefect"), "deployment", "run", "drape-pipeline/mini-stream"], repo, env)
    run([str(BIN / "prefect"), "worker", "start", "--pool", "local-process", "--run-once"], repo, env)

    runs, _ = read_server(env)
    deployed = [run for run in runs if run["deployment_id"] is not None]
    assert len(deployed) == 1
    assert deployed[0]["state"]["type"] == "COMPLETED", deployed[0]["state"]["message"]
    # Stages are cached by DVC, but the report re-runs, so each flow run logs one MLflow run.
    assert mlflow_launchers(repo) == ["prefect", "prefect"]
