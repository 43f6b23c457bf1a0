"""MLflow records of pipeline runs: one parent run per execution, one child run per task.

The parent run carries the method, the stream, the seed, the git revision, the launcher
(``dvc`` or ``prefect``), all parameters, the metrics and the report files (matrix, heatmap,
routing confusion). Each child run carries its task's settings, its loss curve (one point
per optimizer step), throughput, null-space ranks, trainable parameters and its row of the
accuracy matrix. When caption tasks were evaluated, the child run also carries every corpus
metric of each, times 100, as ``caption.<metric>.<evaluated task>`` (``caption.CIDEr.flickr30k``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _flatten(prefix: str, value, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)
    return out


# Files that a pipeline run itself rewrites before the report stage logs the run.
_PIPELINE_WRITTEN = (":(exclude)dvc.lock", ":(exclude)results", ":(exclude,glob)**/.gitignore")


def git_revision(root: Path) -> str:
    """Return the checked-out commit, or ``unknown`` outside git.

    ``-dirty`` is appended when tracked files other than the pipeline's own outputs changed.
    """
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *_PIPELINE_WRITTEN]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")


def caption_metrics_for_mlflow(evaluation: dict) -> dict[str, float]:
    """Return the corpus metrics of one ``scores.json`` under their MLflow names, ``caption.<metric>.<evaluated task>``.

    Only caption tasks have corpus metrics, so an evaluation without them gives an empty dict.
    """
    return {
        f"caption.{metric}.{evaluated}": float(value)
        for evaluated, metrics in evaluation.get("corpus_metrics", {}).items()
        for metric, value in metrics.items()
    }


def log_pipeline_run(ctx, matrix, metrics: dict[str, float], confusion: np.ndarray, launcher: str) -> str:
    """Log one pipeline execution to MLflow and return the parent run's id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    config = ctx.config
    mlflow.set_tracking_uri(config.tracking.mlflow_uri)
    mlflow.set_experiment(config.tracking.experiment)
    stream = config.task_names
    params = _flatten("", config.model_dump(mode="json"), {})
    tags = {
        "method": config.method,
        "benchmark": "mini-stream",
        "stream": ",".join(stream),
        "seed": str(config.seed),
        "git_revision": git_revision(ctx.paths.root),
        "launcher": launcher,
        "models.preset": config.models.preset,
    }
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]

    run_name = config.tracking.run_name or f"{config.method}-seed{config.seed}"
    tags["variant"] = run_name
    with mlflow.start_run(run_name=run_name, tags=tags) as parent:
        # MLflow caps a parameter value at a few thousand characters; the flattened keys stay short.
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(ctx.paths.report), artifact_path="report")
        mlflow.log_dict({"tasks": stream, "confusion": confusion.tolist()}, "report/routing_confusion.json")

        for t, task in enumerate(stream):
            train_log = json.loads((ctx.paths.train / task / "train_log.json").read_text())
            prototype_stats = json.loads((ctx.paths.prototypes / task / "prototypes.json").read_text())["statistics"].get(task, {})
            evaluation = json.loads((ctx.paths.eval / task / "scores.json").read_text())
            with mlflow.start_run(run_name=f"{t + 1:02d}-{task}", nested=True, tags={"task": task, "position": str(t + 1), **tags}):
                mlflow.log_params(_flatten(f"stream.{task}", config.stream[task].model_dump(mode="json"), {}))
                # Logs written before the process count was recorded come from one process.
                mlflow.log_param("train_processes", train_log.get("processes", 1))
                for step, loss in enumerate(train_log["losses"]):
                    mlflow.log_metric("train_loss", loss, step=step)
                mlflow.log_metrics(
                    {
                        "samples_per_second": train_log["samples_per_second"],
                        "train_seconds": train_log["seconds"],
                        "trainable_parameters": train_log["trainable_parameters"],
                        **({"max_subspace_overlap": train_log["max_subspace_overlap"]} if "max_subspace_overlap" in train_log else {}),
                        **{f"nullspace_rank.{layer}": rank for layer, rank in train_log["nullspace_rank"].items()},
                        **{f"prototype.{name}": value for name, value in prototype_stats.items()},
                        **{
                            f"accuracy.{column}": float(matrix.values[t, j])
                            for j, column in enumerate(matrix.tasks)
                            if np.isfinite(matrix.values[t, j])
                        },
                        **caption_metrics_for_mlflow(evaluation),
                    }
                )
                mlflow.log_artifact(str(ctx.paths.train / task / "train_log.json"))
                mlflow.log_artifact(str(ctx.paths.eval / task / "scores.json"))
                mlflow.log_artifact(str(ctx.paths.eval / task / "routing.json"))
    logger.info("logged MLflow run %s to %s", parent.info.run_id, config.tracking.mlflow_uri)
    return parent.info.run_id
