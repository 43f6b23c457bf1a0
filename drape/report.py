"""The report stage: accuracy matrix, continual-learning metrics, plots and the MLflow run.

Writes into ``results/report/``:

* ``metrics.json``: MFN, MFT, MAA, BWT, forgetting, routing accuracy, projector drift;
* ``matrix.csv``: the accuracy matrix, readable by ``drape metrics --matrix``;
* ``heatmap.png``: the matrix as a heatmap;
* ``routing.csv``: true and routed task of every test sample after the last task
  (the routing confusion matrix, for ``dvc plots``);
* ``average.csv``: mean accuracy over the tasks seen so far after each stage.
"""

from __future__ import annotations

import csv
import json
import math
import logging
import shutil
from pathlib import Path

import numpy as np

from drape.metrics import AccuracyMatrix, compute_metrics, format_matrix, write_matrix_csv
from drape.nullspace import relative_change

logger = logging.getLogger(__name__)

NOT_ROUTED = "not routed"


def read_stage_scores(eval_dir: Path, stream: list[str]) -> AccuracyMatrix:
    """Assemble the accuracy matrix from the evaluation stages' ``scores.json`` files."""
    values = np.full((len(stream), len(stream)), np.nan)
    for t, stage in enumerate(stream):
        path = eval_dir / stage / "scores.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run the evaluation stage after task '{stage}' (dvc repro)")
        scores = json.loads(path.read_text())["scores"]
        for j, task in enumerate(stream):
            if task in scores:
                values[t, j] = scores[task]
    return AccuracyMatrix(tasks=list(stream), trained=list(stream), values=values)


def read_routing(eval_dir: Path, stage: str) -> list[tuple[str, str]]:
    """(true task, routed task) of every test sample evaluated after ``stage``."""
    pairs = []
    with (eval_dir / stage / "predictions.jsonl").open() as handle:
        for line in handle:
            row = json.loads(line)
            pairs.append((row["task"], row["routed_task"]))
    return pairs


def routing_confusion(pairs: list[tuple[str, str]], tasks: list[str]) -> np.ndarray:
    """Counts (true task, routed task) in the order of ``tasks``."""
    confusion = np.zeros((len(tasks), len(tasks)), dtype=int)
    for true, routed in pairs:
        confusion[tasks.index(true), tasks.index(routed)] += 1
    return confusion


def plot_heatmap(
    matrix: np.ndarray, rows: list[str], columns: list[str], title: str, path: Path, vmax: float | None = None
) -> None:
    """Save ``matrix`` as an annotated heatmap; NaN cells stay blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if vmax is None:
        vmax = float(np.nanmax(matrix)) if np.isfinite(matrix).any() and np.nanmax(matrix) > 0 else 1.0
    figure, axes = plt.subplots(figsize=(1.2 * len(columns) + 2.5, 1.0 * len(rows) + 2))
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=vmax)
    axes.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    axes.set_yticks(range(len(rows)), labels=rows)
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isfinite(matrix[i, j]):
                # Dark text on the bright (yellow) end of viridis, white text elsewhere.
                color = "black" if matrix[i, j] > 0.6 * vmax else "white"
                axes.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", color=color, fontsize=9)
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def heatmap_title(config) -> str:
    """Return the accuracy heatmap's title, which names the caption tasks and their metric."""
    from drape.benchmarks import task_scorer
    from drape.scorers import CORPUS_SCORERS

    captions = [name for name, task in config.stream.items() if task_scorer(task.data) in CORPUS_SCORERS]
    if not captions:
        return "Accuracy (%) after each task (row: trained)"
    return f"Score after each task (row: trained); {', '.join(captions)}: {config.evaluate.caption_metric} x 100"


def score_scale(values: np.ndarray) -> float:
    """Return the top of the heatmap's colour scale: 100, or the largest entry above it (CIDEr x 100 can exceed 100)."""
    finite = values[np.isfinite(values)]
    return max(100.0, float(finite.max())) if finite.size else 100.0


def projector_drift(ctx, first: str, last: str) -> float:
    """Relative change of the projector's output on the first task's training features between
    the end of the first task and the end of the stream."""
    from drape.methods.base import load_projector_output

    patches = ctx.features(first, "train").patches
    dims = (ctx.encoder_info["image_dim"], ctx.llm_dim)
    input_norm = ctx.dims.projector_input_norm
    before = load_projector_output(ctx.paths.train / first, patches, *dims, input_norm=input_norm)
    after = load_projector_output(ctx.paths.train / last, patches, *dims, input_norm=input_norm)
    return relative_change(before, after)


def cost_metrics(ctx, stream: list[str]) -> dict[str, float]:
    """Trainable parameters per task (mean over the stream), stored parameters after the
    stream, and decoding latency per test sample in the last evaluation."""
    logs = [json.loads((ctx.paths.train / task / "train_log.json").read_text()) for task in stream]
    final = ctx.load_state(stream[-1], attach=False)
    timing = json.loads((ctx.paths.eval / stream[-1] / "scores.json").read_text()).get("timing", {})
    metrics = {
        "trainable_parameters_per_task": float(np.mean([log["trainable_parameters"] for log in logs])),
        "stored_parameters": float(final.stored_parameters()),
    }
    if timing.get("samples"):
        metrics["latency_ms_per_sample"] = 1000.0 * timing["seconds"] / timing["samples"]
    return metrics


def build_report(ctx, launcher: str = "dvc", log_to_mlflow: bool = True) -> dict:
    """Write the report files and log the run; return the matrix, the metrics and the MLflow run id."""
    stream = ctx.config.task_names
    paths = ctx.paths
    matrix = read_stage_scores(paths.eval, stream)
    metrics = compute_metrics(matrix).as_dict()

    pairs = read_routing(paths.eval, stream[-1])
    routed = [(true, routed) for true, routed in pairs if routed is not None]
    confusion = routing_confusion(routed, stream)
    if routed:
        # Methods that pick no task-specific part (L2P, CODA-Prompt, LoRA without experts) have no routing.
        metrics["routing_accuracy"] = 100.0 * float(np.trace(confusion)) / max(1, int(confusion.sum()))
    metrics["projector_drift"] = projector_drift(ctx, stream[0], stream[-1])
    metrics.update(cost_metrics(ctx, stream))
    metrics = {key: round(float(value), 4) for key, value in metrics.items()}

    staging = paths.report.with_name(paths.report.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # JSON has no NaN: a metric with no entries to average (BWT of a one-task stream) is null.
    stored = {key: None if math.isnan(value) else value for key, value in metrics.items()}
    (staging / "metrics.json").write_text(json.dumps(stored, indent=2, allow_nan=False) + "\n")
    write_matrix_csv(matrix, staging / "matrix.csv")
    plot_heatmap(matrix.values, stream, stream, heatmap_title(ctx.config), staging / "heatmap.png", vmax=score_scale(matrix.values))
    plot_heatmap(
        confusion.astype(float), stream, stream, "Routing after the last task (row: true task)", staging / "routing_confusion.png"
    )
    with (staging / "routing.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "routed"])
        # A method that does not route records its samples as 'not routed'.
        writer.writerows((true, routed if routed is not None else NOT_ROUTED) for true, routed in pairs)
    with (staging / "average.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "trained", "average_accuracy"])
        for t, stage in enumerate(stream):
            writer.writerow([t + 1, stage, f"{np.nanmean(matrix.values[t, : t + 1]):.2f}"])
    shutil.rmtree(paths.report, ignore_errors=True)
    staging.rename(paths.report)

    run_id = None
    if log_to_mlflow:
        from drape.tracking import log_pipeline_run

        run_id = log_pipeline_run(ctx, matrix, metrics, confusion, launcher=launcher)
    return {"matrix": matrix, "metrics": metrics, "mlflow_run_id": run_id}


def format_report(report: dict, tracking_uri: str) -> str:
    """Format the matrix, the metrics and the MLflow run as text for the terminal."""
    lines = [
        "Accuracy matrix (row: task just trained, column: task evaluated, %):",
        format_matrix(report["matrix"]),
        "",
        "Metrics: " + ", ".join(f"{key} {value:.4g}" for key, value in report["metrics"].items()),
    ]
    if report["mlflow_run_id"]:
        lines.append(f"MLflow run {report['mlflow_run_id']} (browse with: mlflow ui --backend-store-uri {tracking_uri})")
    return "\n".join(lines)
