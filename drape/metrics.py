"""Continual-learning metrics of an accuracy matrix.

``A[t][j]`` is the score (percent) on task j's test split after training through task t.
Rows follow the training order and each row is labelled with the task just trained, so
the diagonal entry of row t is the column of that task. Entries that were not evaluated
are NaN; a lower-triangular matrix is enough for every metric here.

| name | definition |
| --- | --- |
| MFN | mean over the trained tasks j of ``A[T][j]`` (final average, "Last") |
| MFT | mean over j of ``A[j][j]`` (accuracy right after learning each task) |
| MAA | mean over t of the mean over j <= t of ``A[t][j]`` ("Avg") |
| BWT | mean over j < T of ``A[T][j] - A[j][j]`` |
| forgetting | mean over j < T of ``max_{j<=t<T} A[t][j] - A[T][j]`` |

Only trained tasks (the row labels) enter the means, so a matrix that also reports
tasks not yet trained (forward transfer, ``j > t``) gives the same metrics as its lower
triangle.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


_CORNER_LABELS = ("", "trained", "stage", "task", "after")


class MatrixError(ValueError):
    """An accuracy matrix that cannot be read; the message names the file and row."""


@dataclass(frozen=True)
class AccuracyMatrix:
    tasks: list[str]
    """Column labels: the tasks evaluated."""
    trained: list[str]
    """Row labels: the task just trained at each stage, in training order."""
    values: np.ndarray
    """(len(trained), len(tasks)) scores in percent; NaN where not evaluated."""

    def __post_init__(self) -> None:
        shape = (len(self.trained), len(self.tasks))
        assert self.values.shape == shape, f"matrix shape {self.values.shape} != labels {shape}"

    def score(self, stage: str, task: str) -> float:
        """Return ``A[stage][task]``: the score on ``task`` after training ``stage``."""
        return float(self.values[self.trained.index(stage), self.tasks.index(task)])


@dataclass(frozen=True)
class StreamMetrics:
    mfn: float
    mft: float
    maa: float
    bwt: float
    forgetting: float

    def as_dict(self) -> dict[str, float]:
        return {key.upper() if key != "forgetting" else key: value for key, value in asdict(self).items()}


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else float("nan")


def compute_metrics(matrix: AccuracyMatrix) -> StreamMetrics:
    """Compute MFN, MFT, MAA, BWT and forgetting; NaN where no evaluated entry enters a metric."""
    trained = matrix.trained
    last = trained[-1]

    final = [matrix.score(last, task) for task in trained]
    diagonal = [matrix.score(task, task) for task in trained]
    averages = [
        _nanmean([matrix.score(stage, task) for task in trained[: t + 1]])
        for t, stage in enumerate(trained)
    ]
    backward = [matrix.score(last, task) - matrix.score(task, task) for task in trained[:-1]]
    forgetting = []
    for j, task in enumerate(trained[:-1]):
        # Scores of task j from the stage that trained it up to the stage before the last.
        earlier = [matrix.score(stage, task) for stage in trained[j:-1]]
        earlier = [value for value in earlier if not math.isnan(value)]
        if earlier:
            forgetting.append(max(earlier) - matrix.score(last, task))

    return StreamMetrics(
        mfn=_nanmean(final),
        mft=_nanmean(diagonal),
        maa=_nanmean(averages),
        bwt=_nanmean(backward),
        forgetting=_nanmean(forgetting),
    )


def read_matrix_csv(path: Path | str) -> AccuracyMatrix:
    """Read an accuracy matrix CSV.

    The header row contains the task names, optionally after a corner label (``stage``).
    Each further row starts with the task just trained, then one score per task; an empty
    cell is not evaluated.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except OSError as error:
        raise MatrixError(f"{path}: cannot be read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise MatrixError(f"{path}: not a UTF-8 text file; expected a comma-separated accuracy matrix") from None
    if len(rows) < 2:
        raise MatrixError(f"{path}: needs a header row of task names and at least one stage row")

    header = [cell.strip() for cell in rows[0]]
    if len(header) < 2 and len(rows[1]) < 2:
        raise MatrixError(f"{path}:1: found one column only; the matrix must be comma-separated")
    # The header starts with a corner label when its first cell is a usual label, or a
    # name that no stage row starts with (a trained task always starts a row).
    row_labels = {row[0].strip() for row in rows[1:]}
    if header[0].lower() in _CORNER_LABELS or header[0] not in row_labels:
        header = header[1:]
    tasks = header
    if len(set(tasks)) != len(tasks) or not all(tasks):
        raise MatrixError(f"{path}:1: task names in the header must be unique and non-empty: {tasks}")

    trained: list[str] = []
    values = np.full((len(rows) - 1, len(tasks)), np.nan)
    for i, row in enumerate(rows[1:]):
        line = i + 2
        stage = row[0].strip()
        if stage not in tasks:
            raise MatrixError(
                f"{path}:{line}: the first cell '{stage}' must be the task just trained, "
                f"one of the header's tasks: {', '.join(tasks)}"
            )
        if stage in trained:
            raise MatrixError(f"{path}:{line}: task '{stage}' is trained twice; each row is one stage")
        cells = row[1:]
        if len(cells) > len(tasks):
            raise MatrixError(f"{path}:{line}: {len(cells)} scores for {len(tasks)} tasks")
        for j, cell in enumerate(cells):
            if not cell.strip():
                continue
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not 0.0 <= value <= 100.0:
                raise MatrixError(
                    f"{path}:{line}: score '{cell.strip()}' for task '{tasks[j]}' is not a number from 0 to 100 "
                    "(scores are percent); leave the cell empty if it was not evaluated"
                )
            values[i, j] = value
        trained.append(stage)
    return AccuracyMatrix(tasks=tasks, trained=trained, values=values)


def write_matrix_csv(matrix: AccuracyMatrix, path: Path) -> None:
    """Write ``matrix`` in the format ``read_matrix_csv`` reads."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trained", *matrix.tasks])
        for stage, row in zip(matrix.trained, matrix.values):
            writer.writerow([stage, *("" if math.isnan(value) else f"{value:.4f}" for value in row)])


def format_matrix(matrix: AccuracyMatrix) -> str:
    """Render the matrix as a fixed-width text table for the terminal."""
    width = max(8, *(len(task) + 1 for task in matrix.tasks))
    first = max(len("trained"), *(len(task) for task in matrix.trained)) + 2
    lines = ["trained".ljust(first) + "".join(task.rjust(width) for task in matrix.tasks)]
    for stage, row in zip(matrix.trained, matrix.values):
        cells = "".join(("-" if math.isnan(value) else f"{value:.1f}").rjust(width) for value in row)
        lines.append(stage.ljust(first) + cells)
    return "\n".join(lines)
