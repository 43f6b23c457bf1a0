"""Instruction records in LLaVA format and the embedded mini-stream of small image tasks."""

from drape.data.records import (
    ImageError,
    Record,
    RecordError,
    load_image,
    read_records,
    write_records,
)
from drape.data.stream import (
    TASK_KINDS,
    Example,
    MissingSourceError,
    TaskKind,
    build_task,
    get_kind,
    register_kind,
)

__all__ = [
    "TASK_KINDS",
    "Example",
    "ImageError",
    "MissingSourceError",
    "Record",
    "RecordError",
    "TaskKind",
    "build_task",
    "get_kind",
    "load_image",
    "read_records",
    "register_kind",
    "write_records",
]
