"""Benchmark definitions: the task order, record files and scorer of CoIN and UCIT, stored as data.

Each benchmark is a JSON file in this package (``coin.json``, ``ucit.json``) that lists
its tasks in the published training order. A task has a short key (``textvqa``), its
train and test record files relative to a data root, and the name of the scorer of
``drape.scorers.SCORERS`` that scores it. The benchmark's ``image_root`` is the folder,
relative to the same data root, that the records' ``image`` paths are relative to.
``add_benchmark`` registers another definition file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The value of ``stream.<task>.data.kind`` that selects a benchmark task.
BENCHMARK_KIND = "benchmark"

_DEFINITIONS_DIR = Path(__file__).resolve().parent
_TASK_FIELDS = ("key", "name", "train", "test", "scorer")


class BenchmarkDefinitionError(ValueError):
    """An invalid benchmark definition file; the message names the file and the field."""


@dataclass(frozen=True)
class BenchmarkTask:
    """One task of a benchmark, with paths relative to the data root."""

    # Short key used in params.yaml (``stream.<task>.data.task``).
    key: str
    # Published name, e.g. "OCR-VQA".
    name: str
    # Train and test record files.
    train: str
    test: str
    # Folder that the records' image paths are relative to.
    image_root: str
    # Key of drape.scorers.SCORERS.
    scorer: str


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its tasks in the published training order."""

    name: str
    title: str
    # Source of the layout and the task order.
    source: str
    tasks: tuple[BenchmarkTask, ...]

    @property
    def task_keys(self) -> list[str]:
        """The task keys in training order."""
        return [task.key for task in self.tasks]

    def task(self, key: str) -> BenchmarkTask:
        """Return the task called `key`; raise KeyError listing the benchmark's task keys."""
        for task in self.tasks:
            if task.key == key:
                return task
        raise KeyError(f"benchmark {self.name!r} has no task {key!r}; its tasks are: {', '.join(self.task_keys)}")


def _require_string(raw: dict[str, Any], field: str, where: str) -> str:
    value = raw.get(field)
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkDefinitionError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
    return value


def load_benchmark(path: Path | str) -> Benchmark:
    """Read and validate one benchmark definition file.

    Raises BenchmarkDefinitionError naming the file and the field that is missing,
    of the wrong type, or a duplicate task key.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BenchmarkDefinitionError(f"{path}: cannot read the benchmark definition ({error})") from None
    if not isinstance(raw, dict):
        raise BenchmarkDefinitionError(f"{path}: expected a JSON object, got a {type(raw).__name__}")

    name = _require_string(raw, "name", str(path))
    image_root = _require_string(raw, "image_root", str(path))
    raw_tasks = raw.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise BenchmarkDefinitionError(f"{path}: 'tasks' must be a non-empty list of task objects")

    tasks = []
    for index, raw_task in enumerate(raw_tasks):
        where = f"{path}: tasks[{index}]"
        if not isinstance(raw_task, dict):
            raise BenchmarkDefinitionError(f"{where}: expected an object, got a {type(raw_task).__name__}")
        values = {field: _require_string(raw_task, field, where) for field in _TASK_FIELDS}
        # A task may keep its images under another folder than the benchmark's.
        task_image_root = raw_task.get("image_root", image_root)
        if not isinstance(task_image_root, str) or not task_image_root.strip():
            raise BenchmarkDefinitionError(f"{where}: 'image_root' must be a non-empty string, got {task_image_root!r}")
        if any(task.key == values["key"] for task in tasks):
            raise BenchmarkDefinitionError(f"{where}: duplicate task key {values['key']!r}")
        tasks.append(BenchmarkTask(image_root=task_image_root, **values))

    return Benchmark(
        name=name,
        title=raw.get("title", name),
        source=raw.get("source", ""),
        tasks=tuple(tasks),
    )


BENCHMARKS: dict[str, Benchmark] = {}


def add_benchmark(path: Path | str, replace: bool = False) -> Benchmark:
    """Load a definition file and register it under its name; raise ValueError if taken, unless `replace`."""
    benchmark = load_benchmark(path)
    if benchmark.name in BENCHMARKS and not replace:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered; pass replace=True to override it")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    """Return the registered benchmark called `name`; raise KeyError listing the known names."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}") from None


def task_scorer(data: Any) -> str:
    """Return the scorer name of a stream task's ``data`` settings, benchmark or embedded kind."""
    if data.kind == BENCHMARK_KIND:
        return get_benchmark(data.benchmark).task(data.task).scorer
    from drape.data.stream import TASK_KINDS

    return TASK_KINDS[data.kind].scorer


for _path in sorted(_DEFINITIONS_DIR.glob("*.json")):
    add_benchmark(_path)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_KIND",
    "Benchmark",
    "BenchmarkDefinitionError",
    "BenchmarkTask",
    "add_benchmark",
    "get_benchmark",
    "load_benchmark",
    "task_scorer",
]
