"""Read and write instruction records in the LLaVA conversation format.

The CoIN and UCIT benchmarks store each split as a JSON list (or JSONL) of
records like::

    {"id": "vqav2-17", "image": "coco/000017.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "cake"}],
     "answers": ["cake", "cake", "pie"]}

``image`` is relative to an image root and is absent for text-only records.
``answers`` is optional and lists every annotator answer of a test record.
``box`` is optional and holds a grounding record's reference box as
``[x1, y1, x2, y2]``, normalised to [0, 1] as in LLaVA-1.5.
Only the first human/gpt exchange becomes a :class:`Record`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLE = "human"
ASSISTANT_ROLE = "gpt"

# PIL raises these for missing, truncated, corrupt or oversized image files:
# UnidentifiedImageError and truncated data are OSError, a bad PNG chunk CRC is
# SyntaxError, and DecompressionBombError derives from Exception only.
_PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class RecordError(ValueError):
    """Invalid record file or record; the message names the file and line and the fix."""


class ImageError(RecordError):
    """Missing or unreadable image file; the message names the file."""


@dataclass(frozen=True)
class Record:
    """One instruction-tuning example: an image, an instruction and its answer."""

    id: str
    # Image path relative to the image root; None for a text-only record.
    image: str | None
    # Human turn with every <image> placeholder and the surrounding whitespace removed.
    instruction: str
    # First gpt turn, stripped of surrounding whitespace.
    answer: str
    # Every annotator answer of a test record (used by vqa_accuracy); None when absent.
    answers: tuple[str, ...] | None = None
    # Reference box (x1, y1, x2, y2) of a grounding record (used by grounding_iou); None when absent.
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Record id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f"Record {self.id!r}: instruction must be a non-empty string, got {self.instruction!r}")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"Record {self.id!r}: answer must be a non-empty string, got {self.answer!r}")
        if self.answers is not None and not isinstance(self.answers, tuple):
            # A list passed by a caller is stored as a tuple so the record stays hashable.
            object.__setattr__(self, "answers", tuple(self.answers))
        if self.box is not None and not isinstance(self.box, tuple):
            object.__setattr__(self, "box", tuple(self.box))


def load_image(path: Path) -> Image.Image:
    """Open an image file fully decoded and converted to RGB.

    Raises ImageError naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found; check the image root and the record's image path")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _PIL_READ_ERRORS as error:
        raise ImageError(
            f"{path}: cannot decode image ({type(error).__name__}: {error}); "
            "replace the file with a valid image or remove the record"
        ) from error


def _verify_image(path: Path, where: str) -> None:
    """Raise ImageError unless `path` is an existing file that PIL can identify and verify."""
    if not path.is_file():
        raise ImageError(
            f"{where}: image file not found: {path}; "
            "fix the record's image path, or rebuild the task (dvc repro data@<task>, or dvc checkout for a tracked copy)"
        )
    try:
        # verify() checks the file structure (PNG chunk CRCs, truncation) without decoding pixels.
        with Image.open(path) as image:
            image.verify()
    except _PIL_READ_ERRORS as error:
        raise ImageError(
            f"{where}: corrupt or unreadable image {path} ({type(error).__name__}: {error}); "
            "replace the file with a valid image or remove the record"
        ) from error


def _parse_json_list(path: Path, text: str) -> list[tuple[str, Any]]:
    """Parse a JSON list file into (location, raw record) pairs."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(
            f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno}); "
            "fix the syntax or write one record per line as JSONL"
        ) from error
    if not isinstance(data, list):
        raise RecordError(
            f"{path}:1: expected a JSON list of records, got a {type(data).__name__}; "
            "wrap the records in [ ] or save them as .jsonl with one record per line"
        )
    return [(f"{path}: record {index}", item) for index, item in enumerate(data)]


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    """Parse a JSONL file into (location, raw record) pairs, skipping blank lines."""
    items = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordError(
                f"{path}:{line_number}: invalid JSON ({error.msg}, column {error.colno}); "
                "each line must hold exactly one JSON object"
            ) from error
        items.append((f"{path}:{line_number}", item))
    return items


def _require_text(raw: dict, key: str, where: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise RecordError(f"{where}: {key!r} must be a string, got {type(value).__name__}; fix the record")
    return value


def _parse_record(raw: Any, where: str) -> tuple[Record, int]:
    """Build a Record from one parsed JSON object.

    Returns the record and the number of conversation turns after the first exchange,
    which the Record does not keep.
    """
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}; fix the record")
    for key in ("id", "conversations"):
        if key not in raw:
            raise RecordError(
                f"{where}: missing key {key!r}; every record needs 'id' and 'conversations' "
                "(and 'image' unless it is text-only)"
            )

    record_id = raw["id"]
    # Some LLaVA-format exports use integer ids; they are read as strings.
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)
    if not isinstance(record_id, str) or not record_id.strip():
        raise RecordError(f"{where}: 'id' must be a non-empty string, got {raw['id']!r}; fix the record")

    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise RecordError(
            f"{where}: 'image' must be a non-empty path string, got {image!r}; "
            "fix it or drop the key for a text-only record"
        )

    turns = raw["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        raise RecordError(
            f"{where}: 'conversations' must be a list of at least two turns (human, then gpt); "
            f"record {record_id!r} has {turns!r}"
        )
    for turn_index, (turn, role) in enumerate(zip(turns[:2], (HUMAN_ROLE, ASSISTANT_ROLE))):
        turn_where = f"{where}: conversations[{turn_index}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"{turn_where}: missing key 'from' or 'value'; each turn is {{'from': ..., 'value': ...}}")
        if turn["from"] != role:
            raise RecordError(f"{turn_where}: expected 'from': {role!r}, got {turn['from']!r}; fix the turn order")
        _require_text(turn, "value", turn_where)

    instruction = turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    if not instruction:
        raise RecordError(
            f"{where}: empty instruction in record {record_id!r} "
            "(the human turn holds nothing but the <image> placeholder); write the instruction text"
        )
    if image is None and IMAGE_PLACEHOLDER in turns[0]["value"]:
        raise RecordError(
            f"{where}: record {record_id!r} has an <image> placeholder but no 'image' key; "
            "add the image path or remove the placeholder"
        )
    answer = turns[1]["value"].strip()
    if not answer:
        raise RecordError(f"{where}: empty answer in record {record_id!r}; write the gpt turn or remove the record")

    answers = raw.get("answers")
    if answers is not None:
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(item, str) and item.strip() for item in answers)
        ):
            raise RecordError(
                f"{where}: 'answers' must be a non-empty list of non-empty strings, got {answers!r}; "
                "fix it or drop the key"
            )
        answers = tuple(item.strip() for item in answers)

    box = raw.get("box")
    if box is not None:
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in box)
        ):
            raise RecordError(
                f"{where}: 'box' must be a list of four numbers [x1, y1, x2, y2], got {box!r}; "
                "fix it or drop the key"
            )
        box = tuple(float(value) for value in box)

    record = Record(id=record_id, image=image, instruction=instruction, answer=answer, answers=answers, box=box)
    return record, len(turns) - 2


def read_records(path: Path, image_root: Path | None = None, check_images: bool = True) -> list[Record]:
    """Read and validate a record file in LLaVA format.

    A file whose first non-blank character is ``[`` is read as a JSON list, any
    other file as JSONL, and a ``.json`` file must be a list. `image_root`
    defaults to the directory of `path`. With `check_images`, every image must
    exist and pass PIL's ``verify()``. Raises RecordError (ImageError for image
    problems) naming the file and the line (JSONL) or record index (JSON list).
    """
    path = Path(path)
    image_root = path.parent if image_root is None else Path(image_root)
    if not path.is_file():
        raise RecordError(f"{path}: record file not found; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecordError(f"{path}: not valid UTF-8 ({error}); save the file as UTF-8 JSON") from error

    if not text.strip():
        raise RecordError(f"{path}: file is empty; write at least one record")
    if text.lstrip().startswith("["):
        items = _parse_json_list(path, text)
    elif path.suffix == ".json":
        raise RecordError(
            f"{path}:1: a .json record file must hold a JSON list; "
            "wrap the records in [ ] or rename the file to .jsonl"
        )
    else:
        items = _parse_jsonl(path, text)
    if not items:
        raise RecordError(f"{path}: no records found; write at least one record")

    records = []
    first_seen: dict[str, str] = {}
    records_with_extra_turns = 0
    for where, raw in items:
        record, extra_turns = _parse_record(raw, where)
        if record.id in first_seen:
            raise RecordError(
                f"{where}: duplicate id {record.id!r} (first at {first_seen[record.id]}); ids must be unique"
            )
        first_seen[record.id] = where
        if check_images and record.image is not None:
            _verify_image(image_root / record.image, where)
        records_with_extra_turns += extra_turns > 0
        records.append(record)

    if records_with_extra_turns:
        logger.warning(
            "%s: %d records have more than one human/gpt exchange; only the first exchange is read",
            path,
            records_with_extra_turns,
        )
    logger.debug("Read %d records from %s", len(records), path)
    return records


def record_to_json(record: Record) -> dict[str, Any]:
    """Convert a Record to its LLaVA-format JSON object."""
    human_value = record.instruction if record.image is None else f"{IMAGE_PLACEHOLDER}\n{record.instruction}"
    raw: dict[str, Any] = {"id": record.id}
    if record.image is not None:
        raw["image"] = record.image
    raw["conversations"] = [
        {"from": HUMAN_ROLE, "value": human_value},
        {"from": ASSISTANT_ROLE, "value": record.answer},
    ]
    if record.answers is not None:
        raw["answers"] = list(record.answers)
    if record.box is not None:
        raw["box"] = list(record.box)
    return raw


def write_records(path: Path, records: list[Record]) -> None:
    """Write records as LLaVA-format JSONL, replacing `path` atomically.

    The records go to a temporary file in the same directory, which then replaces
    `path` with os.replace, so readers see either the old file or the complete new one.
    Raises RecordError for an empty list or duplicate ids, which read_records would reject.
    """
    path = Path(path)
    if not records:
        raise RecordError(f"{path}: no records to write; read_records rejects an empty file")
    seen: set[str] = set()
    for index, record in enumerate(records):
        if record.id in seen:
            raise RecordError(f"{path}: record {index} has duplicate id {record.id!r}; ids must be unique")
        seen.add(record.id)

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0600; record files are meant to be shared.
        os.fchmod(descriptor, 0o644)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record_to_json(record), ensure_ascii=False))
                handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.debug("Wrote %d records to %s", len(records), path)
