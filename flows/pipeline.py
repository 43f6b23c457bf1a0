"""Prefect flow that runs the DVC pipeline stage by stage.

Each stage of ``dvc.yaml`` becomes one Prefect task that calls ``dvc repro --single-item``,
so DVC keeps deciding what is up to date (Prefect does not cache anything itself) while
Prefect adds retries, run records and the accuracy matrix as a table artifact. The report
stage is always re-run, so every flow run logs exactly one MLflow parent run, tagged
``launcher=prefect``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from drape.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402  (after the telemetry opt-outs)
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

REPORT_STAGE = "report"


def pipeline_stages(root: Path) -> list[str]:
    """List the stages of ``root/dvc.yaml`` so that every stage follows its dependencies."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        # DVC's edges point from a stage to the stages it depends on.
        ordered = list(reversed(list(nx.topological_sort(graph))))
        return [stage.addressing for stage in ordered]


def _stage_environment(flow_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["DRAPE_LAUNCHER"] = "prefect"
    if flow_run_id:
        env["PREFECT__FLOW_RUN_ID"] = flow_run_id
    # The stages call the `drape` entry point, which lives next to this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@task(retries=2, retry_delay_seconds=5, task_run_name="{stage}")
def run_stage(stage: str, root: str, force: bool = False) -> str:
    """Run one DVC stage; DVC skips it when its dependencies and parameters are unchanged."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    command = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("running %s", " ".join(command))
    result = subprocess.run(command, cwd=root, env=_stage_environment(flow_run.id), capture_output=True, text=True)
    if result.stdout.strip():
        logger.info(result.stdout.strip()[-4000:])
    if result.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {result.returncode}):\n{result.stderr.strip()[-4000:]}")
    return result.stdout


def publish_report(root: Path) -> dict:
    """Publish the accuracy matrix and metrics as Prefect artifacts and return the metrics."""
    report = root / "results" / "report"
    with (report / "matrix.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((report / "metrics.json").read_text())
    create_table_artifact(
        key="accuracy-matrix",
        table=rows,
        description="Accuracy (%) on each task's test split (columns) after training each task (rows).",
    )
    # A metric with no entries to average (BWT of a one-task stream) is null in metrics.json.
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {'n/a' if value is None else f'{value:.2f}'} |" for key, value in metrics.items()]
    create_markdown_artifact(key="stream-metrics", markdown="\n".join(lines), description="Continual-learning metrics")
    return metrics


@flow(name="drape-pipeline", log_prints=True)
def drape_pipeline(root: str = ".") -> dict:
    """Run every stage of the DVC pipeline in ``root`` in order and publish the report."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    stages = pipeline_stages(root_path)
    logger.info("%d stages: %s", len(stages), ", ".join(stages))
    for stage in stages:
        run_stage(stage, str(root_path), force=stage == REPORT_STAGE)
    return publish_report(root_path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(drape_pipeline(sys.argv[1] if len(sys.argv) > 1 else "."), indent=2))
