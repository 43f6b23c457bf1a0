"""Read the CoIN and UCIT record files as they are published.

Two record formats occur, and each record is read in the format its keys show:

* the LLaVA conversation format of the training files::

      {"id": "...", "image": "COCO2014/train2014/x.jpg",
       "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                         {"from": "gpt", "value": "cake"}, ...]}

* the question format of CoIN's test files::

      {"question_id": "...", "image": "...", "text": "What is ...?", "answer": "cake"}

  where a grounding record contains ``answer_bbox`` ("[x1, y1, x2, y2]") in place of
  ``answer``, and a record may contain ``answers`` (every annotator answer).

A file is a JSON list or JSONL (one record per line). ``image`` is relative to the
image root and is absent for a text-only record. The ``<image>`` placeholder may
stand anywhere in the first human turn and is removed. ``answers`` may list strings
or VQA annotation objects (``{"answer": ...}``). ``box`` (four numbers) or
``answer_bbox`` gives a grounding record's reference box.

A multi-turn conversation becomes one sample per human/gpt exchange with
``turns="all"``: the k-th exchange (k >= 1) gets the id ``<id>#<k>`` and an instruction
made of the earlier turns, one per line, followed by its own human turn. With
``turns="first"`` only the first exchange is read. ``answers`` and ``box`` belong to
the first exchange.

Every record that cannot be used is reported with its file and index. By default
the reader collects all of them and raises one BenchmarkRecordError that lists
them; with ``skip_invalid`` it logs each one and returns the usable records.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image

from drape.data.records import _PIL_READ_ERRORS, ASSISTANT_ROLE, HUMAN_ROLE, IMAGE_PLACEHOLDER, Record, RecordError
from drape.scorers.grounding import parse_box, validate_box

logger = logging.getLogger(__name__)

# The placeholder with the whitespace around it; it is replaced by a line break.
_PLACEHOLDER_PATTERN = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")
# Max number of problems an error message lists; BenchmarkRecordError.problems contains all of them.
MAX_LISTED_PROBLEMS = 50


@dataclass(frozen=True)
class RecordProblem:
    """One record that cannot be used."""

    path: Path
    # Position of the record in the file, from 0 (JSON list element or non-blank JSONL line).
    index: int
    # Line number in a JSONL file, from 1; None in a JSON list.
    line: int | None
    message: str

    def __str__(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}: record {self.index}{line}: {self.message}"


class BenchmarkRecordError(RecordError):
    """A record file with unusable records; ``problems`` lists every one of them."""

    def __init__(self, path: Path, problems: list[RecordProblem]):
        self.path = path
        self.problems = problems
        listed = "\n".join(f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more (the log lists every one)" if more > 0 else ""
        super().__init__(
            f"{path}: {len(problems)} {'record' if len(problems) == 1 else 'records'} cannot be used; "
            "fix them, or set skip_invalid: true "
            f"to leave them out:\n{listed}{tail}"
        )


class _InvalidRecord(Exception):
    """Raised inside the reader for one unusable record; becomes a RecordProblem."""


@dataclass(frozen=True)
class _RawItem:
    index: int
    line: int | None
    # The parsed JSON value, or None when the line is not valid JSON.
    value: Any
    # The JSON error of a JSONL line that cannot be parsed.
    json_error: str | None = None


def _load_items(path: Path) -> list[_RawItem]:
    """Parse a JSON list or JSONL file; a JSONL line that is not valid JSON becomes an item with json_error."""
    if path.is_dir():
        raise RecordError(f"{path}: is a folder, not a record file; set the path of a JSON or JSONL file")
    if not path.is_file():
        raise RecordError(f"{path}: record file not found; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecordError(f"{path}: not valid UTF-8 ({error}); save the file as UTF-8 JSON") from None
    if not text.strip():
        raise RecordError(f"{path}: file is empty; write at least one record")

    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecordError(
                f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno}); fix the syntax"
            ) from None
        return [_RawItem(index, None, value) for index, value in enumerate(data)]
    if path.suffix == ".json" and text.lstrip().startswith("{") and _is_single_object(text):
        raise RecordError(f"{path}: expected a JSON list of records or one record per line, got one JSON object")

    items = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_RawItem(len(items), line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            items.append(_RawItem(len(items), line_number, None, f"invalid JSON ({error.msg}, column {error.colno})"))
    return items


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_id(raw: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in raw:
            value = raw[key]
            # Some exports use integer ids; they are read as strings.
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, str) and value.strip():
                return value
            raise _InvalidRecord(f"{key!r} must be a non-empty string or an integer, got {value!r}")
    raise _InvalidRecord(f"missing key {' or '.join(repr(key) for key in keys)}")


def _read_image(raw: dict) -> str | None:
    image = raw.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image.strip():
        raise _InvalidRecord(f"'image' must be a non-empty path string, got {image!r}; drop the key for a text-only record")
    relative = PurePosixPath(image)
    if relative.is_absolute() or ".." in relative.parts:
        raise _InvalidRecord(f"'image' must be a path inside the image root, got {image!r}")
    return image


def _check_image(path: Path) -> None:
    if not path.is_file():
        raise _InvalidRecord(f"image file not found: {path}; check the image root and the record's 'image'")
    try:
        # verify() checks the file structure (PNG chunk CRCs, truncation) without decoding pixels.
        with Image.open(path) as image:
            image.verify()
    except _PIL_READ_ERRORS as error:
        raise _InvalidRecord(f"corrupt or unreadable image {path} ({type(error).__name__}: {error})") from None


def _strip_placeholder(text: str) -> str:
    return _PLACEHOLDER_PATTERN.sub("\n", text).strip()


def _read_answers(raw: dict) -> tuple[str, ...] | None:
    answers = raw.get("answers")
    if answers is None:
        return None
    if not isinstance(answers, list) or not answers:
        raise _InvalidRecord(f"'answers' must be a non-empty list, got {answers!r}")
    values = []
    for item in answers:
        # VQAv2 and VizWiz annotations list objects such as {"answer": "red", "answer_confidence": "yes"}.
        value = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(value, str) or not value.strip():
            raise _InvalidRecord(
                f"'answers' must hold non-empty strings or objects with an 'answer' string, got {item!r}"
            )
        values.append(value.strip())
    return tuple(values)


def _read_box(raw: dict) -> tuple[float, float, float, float] | None:
    for key in ("box", "answer_bbox"):
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, str):
            box = parse_box(value)
        elif (
            isinstance(value, list)
            and len(value) == 4
            and all(isinstance(number, (int, float)) and not isinstance(number, bool) for number in value)
        ):
            box = validate_box(tuple(float(number) for number in value))
        else:
            box = None
        if box is None:
            raise _InvalidRecord(f"{key!r} must be a box [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {value!r}")
        return box
    return None


def _format_box(box: tuple[float, float, float, float]) -> str:
    return "[" + ", ".join(f"{value:.2f}" for value in box) + "]"


def _read_turns(turns: Any) -> list[tuple[str, str]]:
    """Return the (human, gpt) exchanges of a conversation, or raise _InvalidRecord."""
    if not isinstance(turns, list) or not turns:
        raise _InvalidRecord(f"'conversations' must be a non-empty list of turns, got {turns!r}")
    for turn_index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise _InvalidRecord(
                f"conversations[{turn_index}] must be an object with string 'from' and 'value', got {turn!r}"
            )
        expected = HUMAN_ROLE if turn_index % 2 == 0 else ASSISTANT_ROLE
        if turn["from"] != expected:
            raise _InvalidRecord(
                f"conversations[{turn_index}] is from {turn['from']!r} but must be from {expected!r}; "
                "turns alternate human, gpt, starting with human"
            )
    if len(turns) < 2:
        raise _InvalidRecord("the conversation has no gpt turn; add the answer")
    if len(turns) % 2:
        raise _InvalidRecord(f"the last human turn (conversations[{len(turns) - 1}]) has no gpt answer")
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _conversation_records(raw: dict, turns_mode: str) -> list[Record]:
    record_id = _read_id(raw, ("id",))
    image = _read_image(raw)
    exchanges = _read_turns(raw["conversations"])

    first_human = exchanges[0][0]
    placeholders = first_human.count(IMAGE_PLACEHOLDER)
    if placeholders > 1:
        raise _InvalidRecord(f"the first human turn contains {placeholders} <image> placeholders but a record has one image")
    if placeholders and image is None:
        raise _InvalidRecord("the first human turn contains an <image> placeholder but the record has no 'image'")
    if any(IMAGE_PLACEHOLDER in human for human, _ in exchanges[1:]):
        raise _InvalidRecord("a later human turn contains an <image> placeholder; move it to the first human turn")

    if turns_mode == "first":
        exchanges = exchanges[:1]
    answers = _read_answers(raw)
    box = _read_box(raw)

    records = []
    context: list[str] = []
    for k, (human, gpt) in enumerate(exchanges):
        question = _strip_placeholder(human)
        answer = gpt.strip()
        if not question:
            raise _InvalidRecord(f"human turn {k} contains no text besides the <image> placeholder")
        if not answer:
            raise _InvalidRecord(f"gpt turn {k} is empty")
        instruction = "\n".join([*context, question])
        records.append(
            Record(
                id=record_id if k == 0 else f"{record_id}#{k}",
                image=image,
                instruction=instruction,
                answer=answer,
                answers=answers if k == 0 else None,
                box=box if k == 0 else None,
            )
        )
        context += [question, answer]
    return records


def _question_record(raw: dict) -> Record:
    record_id = _read_id(raw, ("question_id", "id"))
    image = _read_image(raw)
    text = raw["text"]
    if not isinstance(text, str):
        raise _InvalidRecord(f"'text' must be a string, got {type(text).__name__}")
    if text.count(IMAGE_PLACEHOLDER) > 1:
        raise _InvalidRecord("'text' contains more than one <image> placeholder but a record has one image")
    question = _strip_placeholder(text)
    if not question:
        raise _InvalidRecord("'text' is empty")

    answers = _read_answers(raw)
    box = _read_box(raw)
    answer = raw.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise _InvalidRecord(f"'answer' must be a non-empty string, got {answer!r}")
    if answer is None and answers is not None:
        # The most frequent annotator answer, the first one on a tie.
        answer = Counter(answers).most_common(1)[0][0]
    if answer is None and box is not None:
        answer = _format_box(box)
    if answer is None:
        raise _InvalidRecord("no reference answer; the record needs 'answer', 'answers' or 'answer_bbox'")
    return Record(id=record_id, image=image, instruction=question, answer=answer.strip(), answers=answers, box=box)


def _parse_item(value: Any, turns_mode: str) -> list[Record]:
    if not isinstance(value, dict):
        raise _InvalidRecord(f"expected a JSON object, got {type(value).__name__}")
    if "conversations" in value:
        return _conversation_records(value, turns_mode)
    if "text" in value:
        return [_question_record(value)]
    raise _InvalidRecord(
        "missing key 'conversations' (LLaVA conversation format) or 'text' (question format)"
    )


def read_benchmark_records(
    path: Path | str,
    image_root: Path | str | None = None,
    *,
    turns: Literal["first", "all"] = "first",
    check_images: bool = True,
    skip_invalid: bool = False,
) -> list[Record]:
    """Read a published CoIN or UCIT record file and return its usable records.

    `image_root` defaults to the file's folder. With `check_images`, every image must
    exist and pass PIL's ``verify()``. A record is unusable when it is not an object,
    lacks an id, a question or an answer, or has a value of the wrong type. It is also
    unusable when its turns do not alternate human and gpt, its image is missing or
    unreadable, or an earlier record has the same id. Raises BenchmarkRecordError listing every
    unusable record unless `skip_invalid`, and RecordError when the file cannot be
    read or holds no usable record.
    """
    if turns not in ("first", "all"):
        raise ValueError(f"turns must be 'first' or 'all', got {turns!r}")
    path = Path(path)
    image_root = path.parent if image_root is None else Path(image_root)
    items = _load_items(path)

    records: list[Record] = []
    problems: list[RecordProblem] = []
    first_seen: dict[str, int] = {}
    for item in items:
        try:
            if item.json_error is not None:
                raise _InvalidRecord(item.json_error)
            parsed = _parse_item(item.value, turns)
            for record in parsed:
                if record.id in first_seen:
                    raise _InvalidRecord(f"duplicate id {record.id!r} (first in record {first_seen[record.id]})")
            if check_images and parsed[0].image is not None:
                _check_image(image_root / parsed[0].image)
        except _InvalidRecord as error:
            problems.append(RecordProblem(path, item.index, item.line, str(error)))
            continue
        for record in parsed:
            first_seen[record.id] = item.index
        records.extend(parsed)

    for problem in problems:
        logger.warning("%s", problem)
    if problems and not skip_invalid:
        raise BenchmarkRecordError(path, problems)
    if problems:
        logger.warning("%s: left out %d of %d records that cannot be used", path, len(problems), len(items))
    if not records:
        raise RecordError(f"{path}: no usable records; check the file's format")
    logger.debug("Read %d samples from %d records of %s", len(records), len(items), path)
    return records


__all__ = ["BenchmarkRecordError", "RecordProblem", "read_benchmark_records"]
