"""Tests for reading, validating and writing LLaVA-format instruction records."""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import easy_vqa
import pytest
from PIL import Image

from drape.data.records import (
    ImageError,
    Record,
    RecordError,
    load_image,
    read_records,
    write_records,
)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An image root holding two real easy-vqa PNGs as shapes/0.png and shapes/1.png."""
    root = tmp_path / "images"
    (root / "shapes").mkdir(parents=True)
    paths = easy_vqa.get_test_image_paths()
    for image_id in (0, 1):
        shutil.copy(paths[image_id], root / "shapes" / f"{image_id}.png")
    return root


def raw_record(record_id: str = "r0", image: str | None = "shapes/0.png", instruction: str = "What color is the shape?",
               answer: str = "blue") -> dict:
    raw = {"id": record_id, "conversations": [
        {"from": "human", "value": f"<image>\n{instruction}" if image else instruction},
        {"from": "gpt", "value": answer},
    ]}
    if image is not None:
        raw["image"] = image
    return raw


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------
# Valid files


def test_round_trip_preserves_records(tmp_path, image_root):
    records = [
        Record(id="a", image="shapes/0.png", instruction="What color is the shape?", answer="blue"),
        Record(id="b", image="shapes/1.png", instruction="Is there a circle?\nAnswer yes or no.", answer="no",
               answers=("no", "no", "yes")),
        Record(id="c", image=None, instruction="What is two plus two?", answer="4"),
    ]
    path = tmp_path / "split.jsonl"
    write_records(path, records)

    assert read_records(path, image_root=image_root) == records


def test_write_uses_llava_format(tmp_path):
    path = tmp_path / "split.jsonl"
    write_records(path, [Record(id="a", image="x.png", instruction="Name it.", answer="cat", answers=("cat", "kitten"))])

    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "id": "a",
        "image": "x.png",
        "conversations": [{"from": "human", "value": "<image>\nName it."}, {"from": "gpt", "value": "cat"}],
        "answers": ["cat", "kitten"],
    }


def test_write_replaces_file_atomically(tmp_path):
    path = tmp_path / "split.jsonl"
    path.write_text("old content\n")
    write_records(path, [Record(id="a", image=None, instruction="Say hi.", answer="hi")])

    assert [p.name for p in tmp_path.iterdir()] == ["split.jsonl"]
    assert json.loads(path.read_text())["id"] == "a"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_rejects_empty_list(tmp_path):
    with pytest.raises(RecordError, match="no records to write"):
        write_records(tmp_path / "split.jsonl", [])
    assert not (tmp_path / "split.jsonl").exists()


def test_write_rejects_duplicate_ids(tmp_path):
    record = Record(id="a", image=None, instruction="Say hi.", answer="hi")
    with pytest.raises(RecordError, match="record 1 has duplicate id 'a'"):
        write_records(tmp_path / "split.jsonl", [record, record])
    assert list(tmp_path.iterdir()) == []


def test_read_strips_image_placeholder(tmp_path, image_root):
    raw = raw_record()
    raw["conversations"][0]["value"] = "  What color is the shape?\n<image>  "
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    assert read_records(path, image_root=image_root)[0].instruction == "What color is the shape?"


def test_json_list_format_is_read(tmp_path, image_root):
    path = tmp_path / "split.json"
    path.write_text(json.dumps([raw_record("a"), raw_record("b", image="shapes/1.png", answer="red")], indent=2))

    records = read_records(path, image_root=image_root)

    assert [r.id for r in records] == ["a", "b"]
    assert records[1].answer == "red"
    assert records[1].image == "shapes/1.png"


def test_json_list_error_names_record_index(tmp_path, image_root):
    path = tmp_path / "split.json"
    path.write_text(json.dumps([raw_record("a"), raw_record("b", answer="  ")]))

    with pytest.raises(RecordError, match=r"split\.json: record 1: empty answer"):
        read_records(path, image_root=image_root)


def test_json_list_syntax_error_names_line(tmp_path):
    path = tmp_path / "split.json"
    path.write_text('[\n  {"id": "a",\n  "image": }\n]\n')

    with pytest.raises(RecordError, match=r"split\.json:3: invalid JSON"):
        read_records(path)


def test_json_file_must_hold_list(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(raw_record()))

    with pytest.raises(RecordError, match="must hold a JSON list"):
        read_records(path, check_images=False)


def test_image_root_defaults_to_file_directory(image_root):
    path = write_jsonl(image_root / "split.jsonl", [raw_record()])

    assert read_records(path)[0].image == "shapes/0.png"


def test_integer_id_is_read_as_string(tmp_path, image_root):
    raw = raw_record()
    raw["id"] = 17
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    assert read_records(path, image_root=image_root)[0].id == "17"


def test_blank_lines_are_skipped(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", ["", raw_record("a"), "   ", raw_record("b")])

    assert [r.id for r in read_records(path, image_root=image_root)] == ["a", "b"]


def test_extra_turns_are_ignored_with_warning(tmp_path, image_root, caplog):
    raw = raw_record()
    raw["conversations"] += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with caplog.at_level(logging.WARNING, logger="drape.data.records"):
        records = read_records(path, image_root=image_root)

    assert records[0].answer == "blue"
    assert "1 records have more than one human/gpt exchange" in caplog.text


def test_check_images_false_skips_files(tmp_path):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record(image="nowhere/missing.png")])

    assert read_records(path, check_images=False)[0].image == "nowhere/missing.png"


# ---------------------------------------------------------------------------
# Invalid files


def test_malformed_line_reports_line_number(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record("a"), raw_record("b"), '{"id": "c", "image": '])

    with pytest.raises(RecordError) as info:
        read_records(path, image_root=image_root)

    message = str(info.value)
    assert message.startswith(f"{path}:3: invalid JSON")
    assert "Expecting value" in message
    assert "each line must hold exactly one JSON object" in message


@pytest.mark.parametrize("key", ["id", "conversations"])
def test_missing_key_is_rejected(tmp_path, image_root, key):
    raw = raw_record()
    del raw[key]
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record("first"), raw])

    with pytest.raises(RecordError, match=rf"split\.jsonl:2: missing key '{key}'"):
        read_records(path, image_root=image_root)


def test_missing_turn_key_is_rejected(tmp_path, image_root):
    raw = raw_record()
    del raw["conversations"][1]["value"]
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with pytest.raises(RecordError, match=r":1: conversations\[1\]: missing key 'from' or 'value'"):
        read_records(path, image_root=image_root)


def test_single_turn_is_rejected(tmp_path, image_root):
    raw = raw_record()
    raw["conversations"] = raw["conversations"][:1]
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with pytest.raises(RecordError, match="at least two turns"):
        read_records(path, image_root=image_root)


def test_wrong_turn_order_is_rejected(tmp_path, image_root):
    raw = raw_record()
    raw["conversations"].reverse()
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with pytest.raises(RecordError, match=r"conversations\[0\]: expected 'from': 'human', got 'gpt'"):
        read_records(path, image_root=image_root)


def test_empty_instruction_is_rejected(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record(instruction="  \n ")])

    with pytest.raises(RecordError, match=r"split\.jsonl:1: empty instruction in record 'r0'"):
        read_records(path, image_root=image_root)


def test_empty_answer_is_rejected(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record(answer=" ")])

    with pytest.raises(RecordError, match=r"split\.jsonl:1: empty answer in record 'r0'"):
        read_records(path, image_root=image_root)


def test_placeholder_without_image_is_rejected(tmp_path):
    raw = raw_record()
    del raw["image"]
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with pytest.raises(RecordError, match="has an <image> placeholder but no 'image' key"):
        read_records(path)


@pytest.mark.parametrize("answers", [[], "blue", ["blue", ""], ["blue", 3]])
def test_invalid_answers_list_is_rejected(tmp_path, image_root, answers):
    raw = raw_record()
    raw["answers"] = answers
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with pytest.raises(RecordError, match="'answers' must be a non-empty list of non-empty strings"):
        read_records(path, image_root=image_root)


@pytest.mark.parametrize("box", [[0.1, 0.2, 0.3], "[0.1, 0.2, 0.3, 0.4]", [0.1, 0.2, 0.3, "0.4"], [0, 0, 1, True]])
def test_invalid_box_is_rejected(tmp_path, image_root, box):
    raw = raw_record()
    raw["box"] = box
    path = write_jsonl(tmp_path / "split.jsonl", [raw])

    with pytest.raises(RecordError, match=r"'box' must be a list of four numbers \[x1, y1, x2, y2\]"):
        read_records(path, image_root=image_root)


def test_box_round_trips(tmp_path):
    record = Record(id="g", image=None, instruction="Where is the cat?", answer="[0.10, 0.20, 0.50, 0.90]", box=[0.1, 0.2, 0.5, 0.9])
    assert record.box == (0.1, 0.2, 0.5, 0.9)
    path = tmp_path / "split.jsonl"
    write_records(path, [record])

    assert json.loads(path.read_text())["box"] == [0.1, 0.2, 0.5, 0.9]
    assert read_records(path) == [record]


def test_duplicate_id_names_both_lines(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record("a"), raw_record("b"), raw_record("a")])

    with pytest.raises(RecordError) as info:
        read_records(path, image_root=image_root)

    message = str(info.value)
    assert message.startswith(f"{path}:3: duplicate id 'a'")
    assert f"first at {path}:1" in message


def test_missing_image_is_rejected(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record(), raw_record("r1", image="shapes/7.png")])

    with pytest.raises(ImageError) as info:
        read_records(path, image_root=image_root)

    message = str(info.value)
    assert message.startswith(f"{path}:2: image file not found")
    assert str(image_root / "shapes" / "7.png") in message


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "flipped byte"])
def test_corrupt_image_is_rejected(tmp_path, image_root, corruption):
    image_path = image_root / "shapes" / "0.png"
    data = image_path.read_bytes()
    if corruption == "garbage":
        data = b"this is not a PNG file"
    elif corruption == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    image_path.write_bytes(data)
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record()])

    with pytest.raises(ImageError, match=rf"split\.jsonl:1: corrupt or unreadable image .*0\.png"):
        read_records(path, image_root=image_root)


def test_corrupt_image_error_is_record_error():
    assert issubclass(ImageError, RecordError)
    assert issubclass(RecordError, ValueError)


@pytest.mark.parametrize("content", ["", "  \n\n", "[]"])
def test_empty_file_is_rejected(tmp_path, content):
    path = tmp_path / "split.jsonl"
    path.write_text(content)

    with pytest.raises(RecordError, match="file is empty|no records found"):
        read_records(path)


def test_missing_record_file_is_rejected(tmp_path):
    with pytest.raises(RecordError, match="record file not found"):
        read_records(tmp_path / "absent.jsonl")


def test_non_object_line_is_rejected(tmp_path, image_root):
    path = write_jsonl(tmp_path / "split.jsonl", [raw_record(), "42"])

    with pytest.raises(RecordError, match=r"split\.jsonl:2: expected a JSON object, got int"):
        read_records(path, image_root=image_root)


def test_non_object_list_item_is_rejected(tmp_path):
    path = tmp_path / "split.jsonl"
    # A file starting with "[" is read as a JSON list whatever its suffix.
    path.write_text('["a", "b"]\n')

    with pytest.raises(RecordError, match="record 0: expected a JSON object, got str"):
        read_records(path)


# ---------------------------------------------------------------------------
# Record and load_image


def test_record_rejects_empty_fields():
    with pytest.raises(ValueError, match="id must be a non-empty string"):
        Record(id="", image=None, instruction="Say hi.", answer="hi")
    with pytest.raises(ValueError, match="instruction must be a non-empty string"):
        Record(id="a", image=None, instruction=" ", answer="hi")
    with pytest.raises(ValueError, match="answer must be a non-empty string"):
        Record(id="a", image=None, instruction="Say hi.", answer="")


def test_record_stores_answers_as_tuple():
    record = Record(id="a", image=None, instruction="Say hi.", answer="hi", answers=["hi", "hello"])
    assert record.answers == ("hi", "hello")


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 8), color=200).save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (8, 8)
    assert image.getpixel((0, 0)) == (200, 200, 200)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"absent\.png: image file not found"):
        load_image(tmp_path / "absent.png")


def test_load_image_corrupt_file(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing valid")

    with pytest.raises(ImageError, match=r"bad\.png: cannot decode image"):
        load_image(path)
