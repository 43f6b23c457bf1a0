"""Re-score saved predictions from a JSONL file, as ``drape score`` does.

Each line is a JSON object with a string ``prediction`` and the reference: a
non-empty string ``answer`` or a non-empty list of strings ``answers`` (or both).
``box`` ([x1, y1, x2, y2]) is read for grounding_iou, and ``id`` and
``instruction`` are read when present, so the ``predictions.jsonl`` that the
evaluate stage writes can be re-scored as it is. Blank lines are skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drape.data.records import Record
from drape.scorers import CORPUS_SCORERS, get_scorer, score_corpus

# Record requires an instruction, so a line without one gets this text. It contains no
# option line, so choice_letter cannot read an option from it.
MISSING_INSTRUCTION = "(no instruction given)"


class PredictionFileError(ValueError):
    """A prediction file that cannot be read at all; the message names the file."""


@dataclass
class RescoreResult:
    """Metrics of the usable lines of a prediction file and the lines that were skipped."""

    scorer: str
    # Metric name -> value as a fraction (CIDEr can exceed 1).
    metrics: dict[str, float]
    scored: int
    # (line number, reason) of every line that could not be scored.
    problems: list[tuple[int, str]] = field(default_factory=list)
    # The distinct values of the lines' 'task' field, in order of appearance.
    tasks: list[str] = field(default_factory=list)
    # Lines left out because their 'task' is not the requested one.
    other_task_lines: int = 0


def _line_to_record(raw: Any, line_number: int) -> tuple[str, Record]:
    """Build (prediction, record) from one parsed line, or raise ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    if "prediction" not in raw:
        raise ValueError("missing 'prediction'")
    prediction = raw["prediction"]
    if not isinstance(prediction, str):
        raise ValueError(f"'prediction' must be a string, got {type(prediction).__name__}")

    answers = raw.get("answers")
    if answers is not None and (
        not isinstance(answers, list) or not answers or not all(isinstance(item, str) and item.strip() for item in answers)
    ):
        raise ValueError(f"'answers' must be a non-empty list of non-empty strings, got {answers!r}")
    box = raw.get("box")
    if box is not None:
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in box)
            or not all(math.isfinite(value) for value in box)
        ):
            raise ValueError(f"'box' must be a list of four finite numbers [x1, y1, x2, y2], got {box!r}")
        box = tuple(float(value) for value in box)

    answer = raw.get("answer")
    if answer is None and answers is None and box is None:
        raise ValueError("missing 'answer', 'answers' or 'box'")
    if answer is None:
        # A grounding line may give its reference as 'box' alone.
        answer = answers[0] if answers is not None else "[" + ", ".join(f"{value:g}" for value in box) + "]"
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"'answer' must be a non-empty string, got {answer!r}")

    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        instruction = MISSING_INSTRUCTION
    record_id = raw.get("id")
    if not isinstance(record_id, str) or not record_id:
        record_id = f"line {line_number}"

    record = Record(
        id=record_id,
        image=None,
        instruction=instruction,
        answer=answer.strip(),
        answers=tuple(item.strip() for item in answers) if answers is not None else None,
        box=box,
    )
    return prediction, record


@dataclass
class PredictionLines:
    """The lines of a prediction file, parsed."""

    rows: list[tuple[int, str, Record]]
    """(line number, prediction, record) of every usable line."""
    problems: list[tuple[int, str]]
    """(line number, reason) of every line that cannot be used."""
    tasks: list[str]
    """The distinct values of the lines' 'task' field, in order of appearance."""
    other_task_lines: int = 0
    """Lines left out because their 'task' is not the requested one."""


def read_prediction_lines(path: Path, task: str | None = None) -> PredictionLines:
    """Read a prediction file, keeping only the lines of ``task`` when it is given.

    With ``task``, a line whose 'task' field is another task is left out and counted,
    and a line without the field is a problem. Raises PredictionFileError when the file
    is not UTF-8 or has no non-blank line, and FileNotFoundError when it does not exist.
    A UTF-8 byte order mark is accepted.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise PredictionFileError(f"{path}: not valid UTF-8 ({error}); save the file as UTF-8 JSONL") from error

    lines = PredictionLines(rows=[], problems=[], tasks=[])
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            lines.problems.append((line_number, f"invalid JSON ({error.msg}, column {error.colno})"))
            continue
        line_task = raw.get("task") if isinstance(raw, dict) else None
        if isinstance(line_task, str) and line_task not in lines.tasks:
            lines.tasks.append(line_task)
        if task is not None and isinstance(raw, dict):
            if "task" not in raw:
                lines.problems.append((line_number, f"missing 'task', so the line cannot be matched to --task {task}"))
                continue
            if line_task != task:
                lines.other_task_lines += 1
                continue
        try:
            prediction, record = _line_to_record(raw, line_number)
        except ValueError as error:
            lines.problems.append((line_number, str(error)))
            continue
        lines.rows.append((line_number, prediction, record))

    if not lines.rows and not lines.problems and not lines.other_task_lines:
        raise PredictionFileError(f"{path}: no predictions found; write one JSON object per line")
    if task is not None and not lines.rows and not lines.problems:
        known = ", ".join(lines.tasks) or "none"
        raise PredictionFileError(f"{path}: no line has task {task!r}; the file's tasks: {known}")
    return lines


def rescore_file(name: str, path: Path, task: str | None = None) -> RescoreResult:
    """Score every usable line of a prediction file with scorer `name` (only ``task``'s lines when given).

    A line that the scorer rejects (for example a reference that is not an
    option letter for choice_letter, or no valid reference box for
    grounding_iou) is a problem like a malformed line. The metrics cover the
    scored lines only; they are empty when no line could be scored. Raises
    UnknownScorerError for an unknown name.
    """
    scorer = get_scorer(name)
    lines = read_prediction_lines(path, task)
    rows, problems = lines.rows, lines.problems

    usable: list[tuple[str, Record]] = []
    values: list[float] = []
    for line_number, prediction, record in rows:
        # Scoring each line alone finds the lines the scorer rejects; for the caption
        # scorer this is the per-sample ROUGE-L, and the metrics come from score_corpus.
        try:
            values.append(scorer(prediction, record))
        except ValueError as error:
            problems.append((line_number, str(error)))
            continue
        usable.append((prediction, record))

    problems.sort()
    metrics: dict[str, float] = {}
    if usable and name in CORPUS_SCORERS:
        metrics = score_corpus(name, [prediction for prediction, _ in usable], [record for _, record in usable])
    elif usable:
        metrics = {name: sum(values) / len(values)}
    return RescoreResult(
        scorer=name,
        metrics=metrics,
        scored=len(usable),
        problems=problems,
        tasks=lines.tasks,
        other_task_lines=lines.other_task_lines,
    )
