"""The ``drape`` command line: pipeline stages, metrics of any accuracy matrix, re-scoring, the last report."""

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
DATA_PARALLEL_STAGES = ("train", "prototypes", "evaluate")
"""Stages that every process of an ``accelerate launch`` runs; the main process alone writes their outputs."""
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


class ReportFileError(ValueError):
    """A report file that cannot be read; the message names the file and how to rebuild it."""


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that describe bad input; the command prints them without a traceback."""
    from drape.config import ConfigError
    from drape.data.records import RecordError
    from drape.features import FeatureError
    from drape.methods.base import CheckpointError
    from drape.metrics import MatrixError
    from drape.scorers import UnknownScorerError
    from drape.scorers.rescore import PredictionFileError

    return (
        ConfigError,
        RecordError,
        FeatureError,
        CheckpointError,
        MatrixError,
        UnknownScorerError,
        PredictionFileError,
        ReportFileError,
        FileNotFoundError,
    )


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

    score = commands.add_parser(
        "score",
        help="re-score saved predictions (JSONL) with a scorer and print the score in percent",
        description=(
            "Re-score saved predictions without running a model. Each line of FILE is a JSON object with "
            "'prediction' and 'answer' or 'answers' (and 'box' for grounding_iou; 'id' and 'instruction' "
            "are used when present). An evaluate stage's predictions.jsonl holds every evaluated task, so "
            "select one with --task. Prints the score in percent (every metric for the caption scorer) and "
            "the number of scored and skipped lines, and names each line it cannot score. Exits with 1 when "
            "any line cannot be scored (with --skip-invalid, only when no line can be), and with 2 when "
            "the file cannot be read or the scorer is unknown."
        ),
    )
    score.add_argument("file", type=Path, metavar="FILE", help="the predictions, one JSON object per line")
    score.add_argument("--scorer", required=True, help="the scorer's name, e.g. vqa_accuracy or caption")
    score.add_argument(
        "--task",
        metavar="NAME",
        help="score only the lines whose 'task' field is NAME (a stream task of predictions.jsonl)",
    )
    score.add_argument("--json", action="store_true", help="print the result as JSON (metrics in percent)")
    score.add_argument(
        "--skip-invalid",
        action="store_true",
        help="exit with 0 even when some lines could not be scored (they are still listed on stderr)",
    )

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
    from drape.distributed import processes, write_on_main_process
    from drape.report import format_report

    ctx = stages.StageContext(args.params)
    if not processes().is_main_process:
        # Every process runs the same steps; the main process's log is enough.
        logger.setLevel(logging.WARNING)
    if args.stage == "report":

        def report() -> None:
            result = stages.stage_report(ctx, launcher=args.launcher, log_to_mlflow=not args.no_mlflow)
            print(format_report(result, ctx.config.tracking.mlflow_uri))

        write_on_main_process(report)
        return 0
    function = getattr(stages, f"stage_{args.stage}")
    arguments = (ctx, args.task) if args.stage in TASK_STAGES else (ctx,)
    if args.stage in DATA_PARALLEL_STAGES or processes().num_processes == 1:
        function(*arguments)
    else:
        # Under a multi-process launch the other stages run once, on the main process.
        write_on_main_process(lambda: function(*arguments))
    return 0


def run_train_alone(args: argparse.Namespace) -> int:
    from drape import stages

    from drape.distributed import processes

    ctx = stages.StageContext(args.params)
    for task in args.task:
        result = stages.train_alone(ctx, task)
        if not processes().is_main_process:
            continue
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


def _count(number: int, noun: str) -> str:
    """``number`` and ``noun``, plural unless ``number`` is 1 ("1 line", "3 lines")."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def run_score(args: argparse.Namespace) -> int:
    from drape.scorers.rescore import rescore_file

    result = rescore_file(args.scorer, args.file, task=args.task)
    for line_number, reason in result.problems:
        print(f"{args.file}:{line_number}: {reason}", file=sys.stderr)
    if args.task is None and len(result.tasks) > 1:
        print(
            f"drape: warning: {args.file} holds the predictions of {len(result.tasks)} tasks "
            f"({', '.join(result.tasks)}), scored together; pass --task NAME to score one",
            file=sys.stderr,
        )
    percent = {name: 100.0 * value for name, value in result.metrics.items()}

    if args.json:
        output = {
            "file": str(args.file),
            "scorer": result.scorer,
            "task": args.task,
            "scored": result.scored,
            "skipped": len(result.problems),
            "other_task_lines": result.other_task_lines,
            "metrics": percent,
            "problems": [{"line": line_number, "error": reason} for line_number, reason in result.problems],
        }
        print(json.dumps(output, indent=2))
    else:
        for name, value in percent.items():
            print(f"{name:<16}{value:8.2f}")
        print(f"lines scored: {result.scored}, skipped: {len(result.problems)}")

    if not result.scored:
        print(f"drape: error: {args.file}: no line could be scored", file=sys.stderr)
        return 1
    if result.problems and not args.skip_invalid:
        print(
            f"drape: error: {_count(len(result.problems), 'line')} of {args.file} could not be scored, so the score "
            "covers only the other lines; fix them, or pass --skip-invalid to accept the partial score",
            file=sys.stderr,
        )
        return 1
    return 0


def run_show(args: argparse.Namespace) -> int:
    from drape.metrics import format_matrix, read_matrix_csv

    metrics_path = args.report / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no report yet; run the pipeline first (dvc repro)")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as error:
        raise ReportFileError(f"{metrics_path}: not valid JSON ({error}); re-run the report stage (dvc repro report)") from None
    print(format_matrix(read_matrix_csv(args.report / "matrix.csv")))
    print()
    width = max(map(len, metrics), default=0) + 2
    for key, value in metrics.items():
        if value is None:
            text = "n/a (needs entries of 2+ tasks)"
        elif key == "projector_drift":
            # The drift is a ratio, not a percentage, and is usually far below 1.
            text = f"{value:.4f}"
        elif float(value).is_integer() and abs(value) >= 1000:
            text = f"{int(value):,}"
        else:
            text = f"{value:.2f}"
        print(f"{key:<{width}}{text}")
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
    handlers = {
        "stage": run_stage,
        "metrics": run_metrics,
        "score": run_score,
        "show": run_show,
        "train-alone": run_train_alone,
    }
    try:
        return handlers[args.command](args)
    except _user_errors() as error:
        message = str(error) if not isinstance(error, FileNotFoundError) or not error.filename else f"{error.filename}: {error.strerror}"
        print(f"drape: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
