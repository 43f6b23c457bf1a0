"""Tests for the CoIN and UCIT definitions, the reader of their published files and the benchmark data stage."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from drape.benchmarks import (
    BENCHMARK_KIND,
    BenchmarkDefinitionError,
    get_benchmark,
    load_benchmark,
    task_scorer,
)
from drape.benchmarks.build import build_benchmark_task
from drape.benchmarks.config import BenchmarkDataConfig
from drape.benchmarks.reader import BenchmarkRecordError, read_benchmark_records
from drape.config import ConfigError, load_config, parse_config
from drape.data.records import RecordError, read_records
from drape.scorers import SCORERS

REPO_ROOT = Path(__file__).resolve().parents[1]

COIN_ORDER = ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCR-VQA"]
UCIT_ORDER = ["ImageNet-R", "ArxivQA", "VizWiz-caption", "IconQA", "CLEVR-Math", "Flickr30k"]
EXPECTED_SCORERS = {
    ("coin", "scienceqa"): "choice_letter",
    ("coin", "textvqa"): "vqa_accuracy",
    ("coin", "imagenet"): "exact_match",
    ("coin", "gqa"): "exact_match",
    ("coin", "vizwiz"): "vqa_accuracy",
    ("coin", "grounding"): "grounding_iou",
    ("coin", "vqav2"): "vqa_accuracy",
    ("coin", "ocrvqa"): "exact_match",
    ("ucit", "imagenet-r"): "substring_match",
    ("ucit", "arxivqa"): "choice_letter",
    ("ucit", "vizwiz-caption"): "caption",
    ("ucit", "iconqa"): "choice_letter",
    ("ucit", "clevr-math"): "exact_match",
    ("ucit", "flickr30k"): "caption",
}


# ---------------------------------------------------------------------------
# Fixture files in the published formats


def save_png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format="PNG")


def conversation(record_id, image, *turns, **extra) -> dict:
    """A record in the LLaVA conversation format; `turns` alternate human and gpt values."""
    raw = {"id": record_id}
    if image is not None:
        raw["image"] = image
    raw["conversations"] = [
        {"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(turns)
    ]
    raw.update(extra)
    return raw


def question(question_id, image, text, **extra) -> dict:
    """A record in CoIN's question format (the test files)."""
    raw = {"question_id": question_id, "text": text}
    if image is not None:
        raw["image"] = image
    raw.update(extra)
    return raw


def write_json(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def coin_root(tmp_path: Path) -> Path:
    """A CoIN data root with ScienceQA and Grounding records and their images."""
    root = tmp_path / "coin"
    images = root / "cl_dataset"
    for index in range(6):
        save_png(images / "COCO2014" / "train2014" / f"{index}.png", (40 * index, 10, 200 - 20 * index))
        save_png(images / "ScienceQA" / "train" / f"{index}" / "image.png", (10, 30 * index, 90))

    instructions = root / "playground" / "Instructions"
    choices = "Context: none\nWhich is a mammal?\nA. trout\nB. whale\nAnswer with the option's letter from the given choices directly."
    write_json(instructions / "ScienceQA" / "train.json", [
        conversation("sqa-0", "ScienceQA/train/0/image.png", f"<image>\n{choices}", "B"),
        conversation("sqa-1", "ScienceQA/train/1/image.png", f"{choices}\n<image>", "B"),
        # A text-only question: no image key and no placeholder.
        conversation("sqa-2", None, choices, "B"),
        conversation("sqa-3", "ScienceQA/train/3/image.png", f"Look at the picture. <image> {choices}", "B"),
    ])
    write_json(instructions / "ScienceQA" / "test.json", [
        question("sqa-t0", "ScienceQA/train/4/image.png", choices, answer="B"),
        question("sqa-t1", None, choices, answer="A"),
        question("sqa-t2", "ScienceQA/train/5/image.png", choices, answer="B"),
    ])

    refer = "Please provide the bounding box coordinate of the region this sentence describes: man in red."
    write_json(instructions / "Grounding" / "train.json", [
        conversation("g-0", "COCO2014/train2014/0.png", f"<image>\n{refer}", "[0.10, 0.20, 0.50, 0.60]"),
        conversation("g-1", "COCO2014/train2014/1.png", f"<image>\n{refer}", "[0.30, 0.30, 0.90, 0.80]"),
        conversation("g-2", "COCO2014/train2014/2.png", f"<image>\n{refer}", "[0.00, 0.05, 0.40, 0.95]"),
    ])
    write_json(instructions / "Grounding" / "test.json", [
        question(7, "COCO2014/train2014/3.png", refer, answer_bbox="[0.12, 0.30, 0.58, 0.91]", size=[640, 480]),
        question(8, "COCO2014/train2014/4.png", refer, answer_bbox="[0.2, 0.2, 0.4, 0.4]", size=[640, 480]),
    ])
    return root


# ---------------------------------------------------------------------------
# Definitions


def test_coin_tasks_in_published_order():
    benchmark = get_benchmark("coin")
    assert [task.name for task in benchmark.tasks] == COIN_ORDER
    assert benchmark.task_keys == ["scienceqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa"]


def test_ucit_tasks_in_published_order():
    benchmark = get_benchmark("ucit")
    assert [task.name for task in benchmark.tasks] == UCIT_ORDER
    assert benchmark.task_keys == ["imagenet-r", "arxivqa", "vizwiz-caption", "iconqa", "clevr-math", "flickr30k"]


@pytest.mark.parametrize(("benchmark", "task"), sorted(EXPECTED_SCORERS))
def test_definition_scorer_per_task(benchmark, task):
    definition = get_benchmark(benchmark).task(task)
    assert definition.scorer == EXPECTED_SCORERS[benchmark, task]
    assert definition.scorer in SCORERS


@pytest.mark.parametrize("benchmark", ["coin", "ucit"])
def test_definition_paths_are_relative(benchmark):
    for task in get_benchmark(benchmark).tasks:
        for value in (task.train, task.test, task.image_root):
            assert not Path(value).is_absolute(), value
            assert ".." not in Path(value).parts, value


def test_coin_paths_follow_repository_layout():
    task = get_benchmark("coin").task("textvqa")
    assert task.train == "playground/Instructions/TextVQA/train.json"
    assert task.test == "playground/Instructions/TextVQA/test.json"
    assert task.image_root == "cl_dataset"


def test_unknown_task_lists_task_keys():
    with pytest.raises(KeyError, match="its tasks are: scienceqa, textvqa"):
        get_benchmark("coin").task("textvq")


def test_unknown_benchmark_lists_names():
    with pytest.raises(KeyError, match="known benchmarks: coin, ucit"):
        get_benchmark("coinn")


def test_definition_missing_field_rejected(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"name": "b", "image_root": "images", "tasks": [{"key": "a", "name": "A", "train": "a.json", "test": "t.json"}]}))
    with pytest.raises(BenchmarkDefinitionError, match=r"tasks\[0\]: 'scorer' must be a non-empty string"):
        load_benchmark(path)


def test_definition_duplicate_key_rejected(tmp_path):
    task = {"key": "a", "name": "A", "train": "a.json", "test": "t.json", "scorer": "exact_match"}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"name": "b", "image_root": "images", "tasks": [task, task]}))
    with pytest.raises(BenchmarkDefinitionError, match=r"tasks\[1\]: duplicate task key 'a'"):
        load_benchmark(path)


# ---------------------------------------------------------------------------
# Reader: valid records


def test_reader_placeholder_anywhere_in_first_turn(coin_root):
    path = coin_root / "playground/Instructions/ScienceQA/train.json"
    records = {record.id: record for record in read_benchmark_records(path, coin_root / "cl_dataset")}
    for record_id in ("sqa-0", "sqa-1", "sqa-3"):
        assert "<image>" not in records[record_id].instruction
        assert records[record_id].instruction.endswith("directly.")
    assert records["sqa-0"].instruction.startswith("Context: none")
    assert records["sqa-3"].instruction.startswith("Look at the picture.\nContext: none")
    assert records["sqa-0"].answer == "B"


def test_reader_keeps_text_only_record(coin_root):
    path = coin_root / "playground/Instructions/ScienceQA/train.json"
    records = {record.id: record for record in read_benchmark_records(path, coin_root / "cl_dataset")}
    assert records["sqa-2"].image is None
    assert records["sqa-1"].image == "ScienceQA/train/1/image.png"


def test_reader_jsonl_and_json_list_agree(coin_root, tmp_path):
    source = coin_root / "playground/Instructions/ScienceQA/train.json"
    lines = json.loads(source.read_text())
    jsonl = write_jsonl(tmp_path / "train.jsonl", [lines[0], "", lines[1]])
    from_list = read_benchmark_records(source, coin_root / "cl_dataset")[:2]
    from_lines = read_benchmark_records(jsonl, coin_root / "cl_dataset")
    assert from_lines == from_list


def test_reader_question_format_with_box(coin_root):
    path = coin_root / "playground/Instructions/Grounding/test.json"
    records = read_benchmark_records(path, coin_root / "cl_dataset")
    assert [record.id for record in records] == ["7", "8"]
    assert records[0].box == (0.12, 0.30, 0.58, 0.91)
    assert records[0].answer == "[0.12, 0.30, 0.58, 0.91]"
    assert records[1].answer == "[0.20, 0.20, 0.40, 0.40]"
    assert SCORERS["grounding_iou"]("[0.12, 0.30, 0.58, 0.90]", records[0]) == 1.0


def test_reader_answers_lists(tmp_path):
    save_png(tmp_path / "images/a.png", (1, 2, 3))
    path = write_json(tmp_path / "test.json", [
        question("q0", "a.png", "What is written?", answers=["stop", "stop", "STOP sign", "stop"]),
        question("q1", "a.png", "What color?", answers=[{"answer": "red", "answer_confidence": "yes"}, {"answer": "blue"}, {"answer": "red"}]),
        question("q2", "a.png", "How many?", answer="2", answers=["two", "2", "2"]),
        conversation("c0", "a.png", "<image>\nWhat brand?", "nike", answers=["nike", "nike", "adidas"]),
    ])
    records = {record.id: record for record in read_benchmark_records(path, tmp_path / "images")}
    assert records["q0"].answers == ("stop", "stop", "STOP sign", "stop")
    assert records["q0"].answer == "stop"
    assert records["q1"].answers == ("red", "blue", "red")
    assert records["q1"].answer == "red"
    assert records["q2"].answer == "2"
    assert records["c0"].answers == ("nike", "nike", "adidas")
    # Leave-one-out over three annotators: (1/3 + 1/3 + 2/3) / 3.
    assert SCORERS["vqa_accuracy"]("nike", records["c0"]) == pytest.approx(4 / 9)


def test_reader_multi_turn_first_exchange_only(tmp_path):
    save_png(tmp_path / "images/a.png", (1, 2, 3))
    path = write_json(tmp_path / "train.json", [
        conversation("m", "a.png", "<image>\nWhat animal is this?", "A dog.", "What color is it?", "Brown.", "Is it sitting?", "Yes."),
    ])
    records = read_benchmark_records(path, tmp_path / "images", turns="first")
    assert len(records) == 1
    assert records[0].instruction == "What animal is this?"
    assert records[0].answer == "A dog."


def test_reader_multi_turn_every_exchange(tmp_path):
    save_png(tmp_path / "images/a.png", (1, 2, 3))
    path = write_json(tmp_path / "train.json", [
        conversation("m", "a.png", "<image>\nWhat animal is this?", "A dog.", "What color is it?", "Brown.", "Is it sitting?", "Yes.",
                     answers=["dog", "dog"]),
    ])
    records = read_benchmark_records(path, tmp_path / "images", turns="all")
    assert [record.id for record in records] == ["m", "m#1", "m#2"]
    assert records[1].instruction == "What animal is this?\nA dog.\nWhat color is it?"
    assert records[2].instruction == "What animal is this?\nA dog.\nWhat color is it?\nBrown.\nIs it sitting?"
    assert [record.answer for record in records] == ["A dog.", "Brown.", "Yes."]
    assert all(record.image == "a.png" for record in records)
    assert records[0].answers == ("dog", "dog")
    assert records[1].answers is None


def test_reader_rejects_unknown_turns_mode(coin_root):
    with pytest.raises(ValueError, match="turns must be 'first' or 'all'"):
        read_benchmark_records(coin_root / "playground/Instructions/ScienceQA/train.json", turns="every")


# ---------------------------------------------------------------------------
# Reader: unusable records


BAD_RECORDS = [
    ({"id": "no-conv", "image": "a.png"}, "missing key 'conversations'"),
    (conversation("no-gpt", "a.png", "<image>\nWhat is it?"), "has no gpt turn"),
    (conversation("missing-image", "missing.png", "<image>\nWhat is it?", "cat"), "image file not found"),
    (conversation(["list-id"], "a.png", "<image>\nWhat is it?", "cat"), "'id' must be a non-empty string or an integer"),
    ({"id": "int-value", "image": "a.png", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "must be an object with string 'from' and 'value'"),
    ({"id": "wrong-role", "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "must be from 'human'"),
    (conversation("placeholder-no-image", None, "<image>\nWhat is it?", "cat"), "has no 'image'"),
    (conversation("empty-answer", "a.png", "<image>\nWhat is it?", "  "), "gpt turn 0 is empty"),
    (conversation("bad-answers", "a.png", "<image>\nWhat is it?", "cat", answers="cat"), "'answers' must be a non-empty list"),
    (question("bad-box", "a.png", "Where is the man?", answer_bbox="[0.5, 0.5, 0.1, 0.1]"), "'answer_bbox' must be a box"),
    (question("no-answer", "a.png", "What is it?"), "no reference answer"),
    (conversation("escape", "../a.png", "<image>\nWhat is it?", "cat"), "must be a path inside the image root"),
    ("just a string", "expected a JSON object, got str"),
    (conversation("good", "a.png", "<image>\nWhat is it?", "cat"), None),
    (conversation("good", "a.png", "<image>\nWhat is it again?", "cat"), "duplicate id 'good' (first in record 13)"),
]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    save_png(tmp_path / "images/a.png", (1, 2, 3))
    return write_json(tmp_path / "train.json", [raw for raw, _ in BAD_RECORDS])


def test_reader_reports_every_bad_record(bad_file, tmp_path):
    with pytest.raises(BenchmarkRecordError) as caught:
        read_benchmark_records(bad_file, tmp_path / "images")
    error = caught.value
    expected = [(index, message) for index, (_, message) in enumerate(BAD_RECORDS) if message is not None]
    assert [problem.index for problem in error.problems] == [index for index, _ in expected]
    for problem, (index, message) in zip(error.problems, expected):
        assert problem.path == bad_file
        assert message in problem.message, (index, problem.message)
        assert f"{bad_file}: record {index}: " in str(error)
    assert str(error).startswith(f"{bad_file}: {len(expected)} records cannot be used")
    assert "skip_invalid: true" in str(error)


def test_reader_skip_invalid_logs_each_record(bad_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="drape.benchmarks.reader"):
        records = read_benchmark_records(bad_file, tmp_path / "images", skip_invalid=True)
    assert [record.id for record in records] == ["good"]
    logged = "\n".join(caplog.messages)
    for index, (_, message) in enumerate(BAD_RECORDS):
        if message is not None:
            assert f"{bad_file}: record {index}: " in logged
    assert f"left out {len(BAD_RECORDS) - 1} of {len(BAD_RECORDS)} records" in logged


def test_reader_jsonl_reports_line_numbers(tmp_path):
    save_png(tmp_path / "images/a.png", (1, 2, 3))
    path = write_jsonl(tmp_path / "train.jsonl", [
        conversation("a", "a.png", "<image>\nQ?", "A"),
        "",
        "{not json",
        conversation("b", "a.png", "<image>\nQ?"),
    ])
    with pytest.raises(BenchmarkRecordError) as caught:
        read_benchmark_records(path, tmp_path / "images")
    assert [str(problem) for problem in caught.value.problems] == [
        f"{path}: record 1 (line 3): invalid JSON (Expecting property name enclosed in double quotes, column 2)",
        f"{path}: record 2 (line 4): the conversation has no gpt turn; add the answer",
    ]


def test_reader_corrupt_image_reported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    path = write_json(tmp_path / "train.json", [conversation("a", "broken.png", "<image>\nQ?", "A")])
    with pytest.raises(BenchmarkRecordError, match=r"record 0: corrupt or unreadable image"):
        read_benchmark_records(path, tmp_path / "images")


def test_reader_no_usable_record_fails(tmp_path):
    path = write_json(tmp_path / "train.json", [{"id": "x"}])
    with pytest.raises(RecordError, match="no usable records"):
        read_benchmark_records(path, tmp_path, skip_invalid=True)


def test_reader_accepts_byte_order_mark(coin_root, tmp_path):
    source = coin_root / "playground/Instructions/ScienceQA/train.json"
    for name in ("train.json", "train.jsonl"):
        path = tmp_path / name
        items = json.loads(source.read_text())
        text = json.dumps(items) if name.endswith(".json") else "".join(json.dumps(item) + "\n" for item in items)
        path.write_text(text, encoding="utf-8-sig")

        records = read_benchmark_records(path, coin_root / "cl_dataset")

        assert [record.id for record in records] == ["sqa-0", "sqa-1", "sqa-2", "sqa-3"], name


def test_reader_folder_instead_of_file(tmp_path):
    with pytest.raises(RecordError) as caught:
        read_benchmark_records(tmp_path, tmp_path)

    assert str(caught.value) == f"{tmp_path}: is a folder, not a record file; set the path of a JSON or JSONL file"


def test_reader_invalid_json_list_names_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n{"id": "a",\n]')
    with pytest.raises(RecordError, match=r"train.json:3: invalid JSON"):
        read_benchmark_records(path)


# ---------------------------------------------------------------------------
# params.yaml selection


def embedded_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def benchmark_params(root: Path, **data) -> dict:
    params = embedded_params()
    params["stream"] = {
        "sqa": {"after": "init", "data": {"kind": "benchmark", "benchmark": "coin", "task": "scienceqa", "root": str(root), **data}},
        "ground": {"after": "sqa", "data": {"kind": "benchmark", "benchmark": "coin", "task": "grounding", "root": str(root)}},
        "digits": {"after": "ground", "data": {"kind": "digits-classify", "n_train": 10, "n_test": 5}},
    }
    return params


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return str(caught.value)


def test_config_embedded_params_still_valid():
    config = load_config(REPO_ROOT / "params.yaml")
    assert config.task("digits").data.kind == "digits-classify"


def test_config_accepts_benchmark_tasks(tmp_path):
    config = parse_config(benchmark_params(tmp_path, n_train=2))
    data = config.task("sqa").data
    assert isinstance(data, BenchmarkDataConfig)
    assert data.kind == BENCHMARK_KIND
    assert (data.n_train, data.n_test, data.turns, data.skip_invalid) == (2, None, "first", False)
    assert config.task_names == ["sqa", "ground", "digits"]


def test_config_unknown_benchmark_names_key(tmp_path):
    raw = benchmark_params(tmp_path, benchmark="coinn")
    message = config_error(raw)
    assert "  stream.sqa.data.benchmark: unknown benchmark 'coinn'; known benchmarks: coin, ucit" in message


def test_config_unknown_task_names_key(tmp_path):
    message = config_error(benchmark_params(tmp_path, task="science"))
    assert "  stream.sqa.data: task: benchmark 'coin' has no task 'science'; its tasks are: scienceqa" in message


def test_config_missing_root_names_key(tmp_path):
    raw = benchmark_params(tmp_path)
    del raw["stream"]["sqa"]["data"]["root"]
    assert "  stream.sqa.data.root: Field required" in config_error(raw)


def test_config_unknown_benchmark_field_rejected(tmp_path):
    message = config_error(benchmark_params(tmp_path, n_samples=3))
    assert "  stream.sqa.data.n_samples: unknown key; remove it or check its spelling" in message


def test_config_bad_turns_lists_values(tmp_path):
    message = config_error(benchmark_params(tmp_path, turns="every"))
    assert "  stream.sqa.data.turns: got 'every'; allowed values: 'first' or 'all'" in message


def test_config_embedded_errors_unchanged(tmp_path):
    raw = benchmark_params(tmp_path)
    raw["stream"]["digits"]["data"]["n_train"] = 0
    del raw["stream"]["ground"]["data"]["kind"]
    message = config_error(raw)
    assert "  stream.digits.data.n_train: Input should be greater than or equal to 1" in message
    # Without kind: benchmark the task is read as an embedded kind.
    assert "  stream.ground.data.kind: Field required" in message
    assert "  stream.ground.data.benchmark: unknown key" in message


def test_task_scorer_for_both_kinds(tmp_path):
    config = parse_config(benchmark_params(tmp_path))
    assert task_scorer(config.task("sqa").data) == "choice_letter"
    assert task_scorer(config.task("ground").data) == "grounding_iou"
    assert task_scorer(config.task("digits").data) == "exact_match"


# ---------------------------------------------------------------------------
# Data stage


def stage_context(tmp_path: Path, params: dict):
    from drape.stages import StageContext

    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return StageContext(params=repo / "params.yaml", root=repo)


def test_data_stage_writes_benchmark_task(coin_root, tmp_path, caplog):
    from drape.stages import stage_data

    ctx = stage_context(tmp_path, benchmark_params(coin_root))
    with caplog.at_level(logging.WARNING):
        stage_data(ctx, "sqa")
    task_dir = ctx.paths.stream / "sqa"

    assert sorted(entry.name for entry in task_dir.iterdir()) == ["images", "test.jsonl", "train.jsonl"]
    train = read_records(task_dir / "train.jsonl", image_root=task_dir)
    test = read_records(task_dir / "test.jsonl", image_root=task_dir)
    # Text-only records are kept (text_only: keep is the default), without an image path.
    assert [record.id for record in train] == ["sqa-0", "sqa-1", "sqa-2", "sqa-3"]
    assert [record.id for record in test] == ["sqa-t0", "sqa-t1", "sqa-t2"]
    assert train[2].image is None
    assert test[1].image is None
    assert "left out" not in caplog.text
    assert train[0].image == "images/ScienceQA/train/0/image.png"
    assert train[0].answer == "B"
    assert test[1].answer == "A"

    link = task_dir / train[0].image
    assert link.is_symlink()
    assert link.resolve() == (coin_root / "cl_dataset/ScienceQA/train/0/image.png").resolve()


def test_data_stage_drops_text_only_on_request(coin_root, tmp_path, caplog):
    from drape.stages import stage_data

    ctx = stage_context(tmp_path, benchmark_params(coin_root, text_only="drop"))
    with caplog.at_level(logging.WARNING):
        stage_data(ctx, "sqa")
    task_dir = ctx.paths.stream / "sqa"

    train = read_records(task_dir / "train.jsonl", image_root=task_dir)
    test = read_records(task_dir / "test.jsonl", image_root=task_dir)
    assert [record.id for record in train] == ["sqa-0", "sqa-1", "sqa-3"]
    assert [record.id for record in test] == ["sqa-t0", "sqa-t2"]
    assert "left out 1 text-only records of 4 (text_only: drop)" in caplog.text


def test_text_only_setting_rejects_unknown_value(coin_root):
    message = config_error(benchmark_params(coin_root, text_only="blank"))
    assert "text_only" in message
    assert "'keep'" in message


def test_features_encode_text_only_records_from_blank_image(coin_root, tmp_path, embedded_models):
    from drape.encoders import load_clip, stack_pixels
    from drape.features import extract_split, load_features
    from drape.stages import stage_data

    ctx = stage_context(tmp_path, benchmark_params(coin_root))
    stage_data(ctx, "sqa")
    task_dir = ctx.paths.stream / "sqa"
    encoder = load_clip(embedded_models / "clip")
    out = tmp_path / "test.parquet"
    assert extract_split(encoder, task_dir / "test.jsonl", task_dir, out) == 3

    features = load_features(out, dataclasses.asdict(encoder.info))
    assert features.ids == ["sqa-t0", "sqa-t1", "sqa-t2"]
    blank_patches, blank_pooled = encoder.encode_images([None])
    # The Parquet file stores patches in float16 (about 3 significant digits).
    assert torch.allclose(features.patches[1], blank_patches[0], rtol=2e-3, atol=1e-3)
    assert torch.allclose(features.pooled[1], blank_pooled[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features.pooled[0], features.pooled[1])

    pixels = stack_pixels(encoder.preprocess, [None, None])
    assert pixels.shape[0] == 2
    assert not pixels.any()


def test_data_stage_keeps_boxes_and_copies(coin_root, tmp_path):
    from drape.stages import stage_data

    params = benchmark_params(coin_root)
    params["stream"]["ground"]["data"].update(images="copy", n_train=2, n_test=1)
    ctx = stage_context(tmp_path, params)
    stage_data(ctx, "ground")
    task_dir = ctx.paths.stream / "ground"

    train = read_records(task_dir / "train.jsonl", image_root=task_dir)
    test = read_records(task_dir / "test.jsonl", image_root=task_dir)
    assert len(train) == 2
    assert {record.id for record in train} < {"g-0", "g-1", "g-2"}
    assert len(test) == 1
    assert test[0].box is not None
    assert test[0].answer.startswith("[")
    assert not (task_dir / test[0].image).is_symlink()
    assert sorted(path.name for path in (task_dir / "images/COCO2014/train2014").iterdir()) == sorted(
        Path(record.image).name for record in train + test
    )


def test_data_stage_same_seed_same_draw(coin_root, tmp_path):
    from drape.stages import stage_data

    params = benchmark_params(coin_root)
    params["stream"]["ground"]["data"].update(n_train=2)
    ctx = stage_context(tmp_path, params)
    stage_data(ctx, "ground")
    first = (ctx.paths.stream / "ground" / "train.jsonl").read_text()
    stage_data(ctx, "ground")
    assert (ctx.paths.stream / "ground" / "train.jsonl").read_text() == first


def test_data_stage_missing_root_names_expected_file(tmp_path):
    from drape.stages import stage_data

    missing = tmp_path / "nowhere"
    ctx = stage_context(tmp_path, benchmark_params(missing))
    with pytest.raises(ConfigError) as caught:
        stage_data(ctx, "sqa")
    message = str(caught.value)
    assert message.startswith(f"stream.sqa.data.root: data root {missing} not found")
    assert str(missing / "playground/Instructions/ScienceQA/train.json") in message
    assert not (ctx.paths.stream / "sqa").exists()


def test_data_stage_missing_test_file_names_override(coin_root, tmp_path):
    from drape.stages import stage_data

    (coin_root / "playground/Instructions/ScienceQA/test.json").unlink()
    ctx = stage_context(tmp_path, benchmark_params(coin_root))
    with pytest.raises(ConfigError, match=r"stream.sqa.data.test_file: record file not found: .*ScienceQA/test.json"):
        stage_data(ctx, "sqa")


def test_data_stage_file_overrides(coin_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    save_png(elsewhere / "pics" / "x.png", (5, 5, 5))
    write_jsonl(elsewhere / "mine.jsonl", [conversation("own", "x.png", "<image>\nWhich? A. a B. b", "A")])
    settings = BenchmarkDataConfig(
        kind="benchmark", benchmark="coin", task="scienceqa", root=str(coin_root),
        train_file=str(elsewhere / "mine.jsonl"), image_root=str(elsewhere / "pics"),
        test_file=str(elsewhere / "mine.jsonl"),
    )
    out_dir = tmp_path / "out" / "sqa"
    summary = build_benchmark_task(settings, out_dir, seed=0, key="stream.sqa.data")
    assert summary["train_file"] == str(elsewhere / "mine.jsonl")
    assert summary["scorer"] == "choice_letter"
    assert [record.id for record in read_records(out_dir / "train.jsonl", image_root=out_dir)] == ["own"]


def test_data_stage_too_many_requested(coin_root, tmp_path):
    from drape.stages import stage_data

    params = benchmark_params(coin_root)
    params["stream"]["ground"]["data"].update(n_train=5)
    ctx = stage_context(tmp_path, params)
    with pytest.raises(ConfigError, match=r"stream.ground.data.n_train: requested 5 records but .* has 3 usable"):
        stage_data(ctx, "ground")


def test_data_stage_bad_record_leaves_no_output(coin_root, tmp_path):
    from drape.stages import stage_data

    params = benchmark_params(coin_root)
    ctx = stage_context(tmp_path, params)
    stage_data(ctx, "ground")
    before = (ctx.paths.stream / "ground" / "train.jsonl").read_text()

    train = coin_root / "playground/Instructions/Grounding/train.json"
    records = json.loads(train.read_text())
    records.append({"id": "g-bad", "image": "COCO2014/train2014/0.png"})
    records.append(conversation("g-gone", "COCO2014/train2014/99.png", "<image>\nWhere?", "[0.1, 0.1, 0.2, 0.2]"))
    write_json(train, records)
    with pytest.raises(BenchmarkRecordError) as caught:
        stage_data(ctx, "ground")
    assert [problem.index for problem in caught.value.problems] == [3, 4]
    assert (ctx.paths.stream / "ground" / "train.jsonl").read_text() == before
    assert not list(ctx.paths.stream.glob(".ground.*"))

    params_skip = copy.deepcopy(params)
    params_skip["stream"]["ground"]["data"]["skip_invalid"] = True
    ctx = stage_context(tmp_path, params_skip)
    stage_data(ctx, "ground")
    assert len(read_records(ctx.paths.stream / "ground" / "train.jsonl", image_root=ctx.paths.stream / "ground")) == 3
