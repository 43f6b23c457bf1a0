"""The ``drape`` command line: pipeline stages, metrics of any accuracy matrix, the last report."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from drape.telemetry import disable_telemetry

logger = logging.getLogger("drape")

TASK_STAGES = ("data", "features", "train", "prototypes", "evaluate")
STAGES = ("data", "models", "features", "init", "train", "prototypes", "evaluate", "report")
STAGE_HELP = {
    "data": "build one task's train/test records and images from packaged data (data/stream/TASK)",
    "models": "materialise the frozen LLM and the open_clip encoders into models/",
    "features": "encode one task's images and instructions with the frozen encoders (data/features/TASK)",
    "init": "write the state before the first task (results/train/init, results/prototypes/init)",
    "train": "train one task's prompt generator and the shared projector (results/train/TASK)",
    "prototypes": "add one task's image and text prototypes (results/prototypes/TASK)",
    "evaluate": "evaluate the state after one task on every task's test split (results/eval/TASK)",
    "report": "write the accuracy matrix, metrics and plots (results/report) and log the MLflow run",
}


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that describe bad input; the command prints them without a traceback."""
    from drape.config import ConfigError
    from drape.data.records import RecordError
    from drape.features import FeatureError
    from drape.methods.base import CheckpointError
    from drape.metrics import MatrixError

    return (ConfigError, RecordError, FeatureError, CheckpointError, MatrixError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drape",
        description="DRAPE: continual instruction tuning of a frozen multimodal LLM with generated soft prompts.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stage = commands.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)", description="Run one pipeline stage.")
    stage_commands = stage.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGES:
        sub = stage_commands.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name][0].upper() + STAGE_HELP[name][1:] + ".")
        sub.add_argument("--params", default="params.yaml", help="the parameter file (default: params.yaml)")
        if name in TASK_STAGES:
            sub.add_argument("--task", required=True, help="the task's name, a key of 'stream' in params.yaml")
        if name == "report":
            sub.add_argument(
                "--launcher",
                default=os.environ.get("DRAPE_LAUNCHER", "dvc"),
                help="recorded as the MLflow tag 'launcher' (default: $DRAPE_LAUNCHER, else dvc)",
            )
            sub.add_argument("--no-mlflow", action="store_true", help="write the report files without logging an MLflow run")

    metrics = commands.add_parser(
        "metrics",
        help="print MFN, MFT, MAA, BWT and forgetting of an accuracy matrix CSV",
        description=(
            "Print MFN, MFT, MAA, BWT and forgetting of an accuracy matrix. The CSV has a header row "
            "of task names (optionally after a corner label), then one row per training stage whose "
            "first cell is the task just trained; empty cells are not evaluated."
        ),
    )
    metrics.add_argument("--matrix", required=True, type=Path, help="the accuracy matrix CSV, scores in percent")
    metrics.add_argument("--json", action="store_true", help="print the metrics as JSON")

    alone = commands.add_parser(
        "train-alone",
        help="train one task alone from the initial state and print its test score (learnability check)",
        description=(
            "Train one task alone, with its settings from params.yaml but no earlier tasks, and print "
            "the score on its test split. Needs the outputs of the data, models, features and init stages "
            "(dvc repro init features@TASK); writes nothing."
        ),
    )
    alone.add_argument("--task", action="append", required=True, help="a task of the stream; repeat for several")
    alone.add_argument("--params", default="params.yaml", help="the parameter file (default: params.yaml)")

    show = commands.add_parser("show", help="print the accuracy matrix and metrics of the last report", description="Print the last report.")
    show.add_argument("--report", type=Path, default=Path("results/report"), help="the report folder (default: results/report)")
    return parser


def run_stage(args: argparse.Namespace) -> int:
    from drape import stages
    from drape.report import format_report

    ctx = stages.StageContext(args.params)
    if args.stage == "report":
        report = stages.stage_report(ctx, launcher=args.launcher, log_to_mlflow=not args.no_mlflow)
        print(format_report(report, ctx.config.tracking.mlflow_uri))
        return 0
    function = getattr(stages, f"stage_{args.stage}")
    if args.stage in TASK_STAGES:
        function(ctx, args.task)
    else:
        function(ctx)
    return 0


def run_train_alone(args: argparse.Namespace) -> int:
    from drape import stages

    ctx = stages.StageContext(args.params)
    for task in args.task:
        result = stages.train_alone(ctx, task)
        print(f"{result['task']:<12} score {result['score']:6.1f}%   final loss {result['final_loss']:.3f}   {result['train_seconds']} s")
    return 0


def run_metrics(args: argparse.Namespace) -> int:
    from drape.metrics import compute_metrics, format_matrix, read_matrix_csv

    matrix = read_matrix_csv(args.matrix)
    metrics = compute_metrics(matrix).as_dict()
    if args.json:
        # JSON has no NaN: a metric that no evaluated entry enters is null.
        print(json.dumps({key: None if math.isnan(value) else value for key, value in metrics.items()}, indent=2))
        return 0
    print(format_matrix(matrix))
    print()
    for key, value in metrics.items():
        print(f"{key:<12}{value:8.2f}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from drape.metrics import format_matrix, read_matrix_csv

    metrics_path = args.report / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no report yet; run the pipeline first (dvc repro)")
    print(format_matrix(read_matrix_csv(args.report / "matrix.csv")))
    print()
    for key, value in json.loads(metrics_path.read_text()).items():
        # The drift is a ratio, not a percentage, and is usually far below 1.
        print(f"{key:<18}{value:8.4f}" if key == "projector_drift" else f"{key:<18}{value:8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    args = build_parser().parse_args(argv)
    # Libraries such as open_clip log routine steps on the root logger at INFO; only this
    # package's own messages are shown at INFO unless --verbose is given.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handlers = {"stage": run_stage, "metrics": run_metrics, "show": run_show, "train-alone": run_train_alone}
    try:
        return handlers[args.command](args)
    except _user_errors() as error:
        message = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else f"{error.filename}: {error.strerror}"
        print(f"drape: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
