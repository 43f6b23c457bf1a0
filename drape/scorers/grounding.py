"""Grounding accuracy: a predicted box is right when its IoU with the reference box is at least 0.5.

CoIN's grounding task (RefCOCO, RefCOCO+, RefCOCOg) uses LLaVA-1.5's box format:
"[x1, y1, x2, y2]" with the corners normalised to [0, 1] by the image width and
height and written with two decimals, e.g. "[0.12, 0.30, 0.58, 0.91]".
"""

from __future__ import annotations

import math
import re

from drape.data.records import Record

Box = tuple[float, float, float, float]

IOU_THRESHOLD = 0.5
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# Four comma-separated numbers in square or round brackets.
_BOX = re.compile(rf"[\[(]\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[\])]")


def parse_box(text: str) -> Box | None:
    """Return the first "[x1, y1, x2, y2]" box in `text`, or None.

    Round brackets are accepted too. A box whose corners are not finite or that
    has no area (x2 <= x1 or y2 <= y1) counts as no box.
    """
    match = _BOX.search(text)
    if match is None:
        return None
    return validate_box(tuple(float(value) for value in match.groups()))


def validate_box(values: tuple[float, ...]) -> Box | None:
    """Return `values` as a box when it is four finite corners with a positive area, else None."""
    if len(values) != 4 or not all(math.isfinite(value) for value in values):
        return None
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def box_iou(first: Box, second: Box) -> float:
    """Return the intersection over union of two (x1, y1, x2, y2) boxes with positive area."""
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    intersection = max(0.0, width) * max(0.0, height)
    area_first = (first[2] - first[0]) * (first[3] - first[1])
    area_second = (second[2] - second[0]) * (second[3] - second[1])
    return intersection / (area_first + area_second - intersection)


def reference_box(record: Record) -> Box:
    """Return the record's `box`, else the box written in its answer.

    Raises ValueError when neither holds a valid box, because the task was given
    the wrong scorer or the record is broken.
    """
    if record.box is not None:
        box = validate_box(tuple(record.box))
    else:
        box = parse_box(record.answer)
    if box is None:
        raise ValueError(
            f"grounding_iou scorer: record {record.id!r} has no valid reference box "
            f"(box {record.box!r}, answer {record.answer!r}); "
            "write the box as [x1, y1, x2, y2] with x2 > x1 and y2 > y1"
        )
    return box


def grounding_iou(prediction: str, record: Record) -> float:
    """Return 1.0 when the predicted box overlaps the reference box with IoU >= 0.5, else 0.0.

    A prediction without a valid box scores 0. Raises ValueError when the record
    has no valid reference box.
    """
    expected = reference_box(record)
    predicted = parse_box(prediction)
    if predicted is None:
        return 0.0
    return float(box_iou(predicted, expected) >= IOU_THRESHOLD)
