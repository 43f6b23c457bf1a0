"""Tests for the embedded mini-stream builders, using the real packaged images."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from drape.data import stream
from drape.data.records import read_records
from drape.data.stream import (
    FASHION_CLASSES,
    TASK_KINDS,
    Example,
    MissingSourceError,
    TaskKind,
    build_task,
    get_kind,
    register_kind,
)
from drape.scorers import SCORERS

BUILT_IN_KINDS = [
    "digits-classify", "digits-parity", "fashion-classify", "fashion-choice", "shapes-color", "shapes-choice", "shapes-vqa"
]
N_TRAIN, N_TEST = 6, 4

COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}
CHOICE_PATTERN = re.compile(
    r"Which item is shown\?\nA\. (\w+)\nB\. (\w+)\nC\. (\w+)\nD\. (\w+)\nAnswer with the option's letter\."
)


def pixel_digest(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def split_digests(out_dir: Path, split: str) -> list[str]:
    digests = []
    for record in read_records(out_dir / f"{split}.jsonl"):
        with Image.open(out_dir / record.image) as image:
            digests.append(pixel_digest(image))
    return digests


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each built-in kind built once with seed 0 into its own directory."""
    root = tmp_path_factory.mktemp("stream")
    return {kind: (root / kind, build_task(kind, root / kind, N_TRAIN, N_TEST, seed=0)) for kind in BUILT_IN_KINDS}


# ---------------------------------------------------------------------------
# Output layout


def test_registry_holds_built_in_kinds():
    for kind in BUILT_IN_KINDS:
        task_kind = get_kind(kind)
        assert task_kind.name == kind
        assert task_kind.scorer in SCORERS
        assert task_kind.max_answer_words == 1
        assert task_kind.description


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_build_writes_readable_splits(built, kind):
    out_dir, summary = built[kind]

    train = read_records(out_dir / "train.jsonl")
    test = read_records(out_dir / "test.jsonl")

    assert sorted(p.name for p in out_dir.iterdir()) == ["images", "test.jsonl", "train.jsonl"]
    assert len(train) == N_TRAIN
    assert len(test) == N_TEST
    assert [r.id for r in train] == [f"{kind}-train-{i:05d}" for i in range(N_TRAIN)]
    assert [r.id for r in test] == [f"{kind}-test-{i:05d}" for i in range(N_TEST)]
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == sorted(f"{r.id}.png" for r in train + test)
    for record in train + test:
        assert record.image == f"images/{record.id}.png"
        assert len(record.answer.split()) <= TASK_KINDS[kind].max_answer_words


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_summary_matches_records(built, kind):
    out_dir, summary = built[kind]
    train = read_records(out_dir / "train.jsonl")
    test = read_records(out_dir / "test.jsonl")

    assert summary["kind"] == kind
    assert summary["out_dir"] == str(out_dir)
    assert summary["seed"] == 0
    assert summary["n_train"] == N_TRAIN
    assert summary["n_test"] == N_TEST
    assert summary["scorer"] == TASK_KINDS[kind].scorer
    assert summary["max_answer_words"] == 1
    assert summary["train_answers"] == dict(Counter(r.answer for r in train))
    assert summary["test_answers"] == dict(Counter(r.answer for r in test))
    json.dumps(summary)


# ---------------------------------------------------------------------------
# Instructions and answers


def test_digits_classify_text(built):
    out_dir, _ = built["digits-classify"]
    for record in read_records(out_dir / "train.jsonl") + read_records(out_dir / "test.jsonl"):
        assert record.instruction == "What digit is written in the image? Answer with a single digit."
        assert record.answer in set("0123456789")


def test_digits_parity_text(built):
    out_dir, _ = built["digits-parity"]
    for record in read_records(out_dir / "train.jsonl") + read_records(out_dir / "test.jsonl"):
        assert record.instruction == "Is the digit in the image even? Answer yes or no."
        assert record.answer in {"yes", "no"}


def test_fashion_classify_text(built):
    out_dir, _ = built["fashion-classify"]
    for record in read_records(out_dir / "train.jsonl") + read_records(out_dir / "test.jsonl"):
        assert record.instruction == "What kind of clothing item is shown? Answer with one word."
        assert record.answer in FASHION_CLASSES


def test_fashion_choice_text(built):
    out_dir, _ = built["fashion-choice"]
    for record in read_records(out_dir / "train.jsonl") + read_records(out_dir / "test.jsonl"):
        match = CHOICE_PATTERN.fullmatch(record.instruction)
        assert match, record.instruction
        options = match.groups()
        assert len(set(options)) == 4
        assert set(options) <= set(FASHION_CLASSES)
        assert record.answer in {"A", "B", "C", "D"}


@pytest.mark.parametrize("kind", ["shapes-color", "shapes-vqa"])
def test_shapes_text(built, kind):
    out_dir, _ = built[kind]
    for record in read_records(out_dir / "train.jsonl") + read_records(out_dir / "test.jsonl"):
        assert record.instruction.endswith("? Answer with one word.")
        assert record.instruction[0].isupper()
        allowed = COLORS if kind == "shapes-color" else COLORS | SHAPES
        assert record.answer in allowed
        if record.answer in COLORS:
            assert "color" in record.instruction
        else:
            assert "shape" in record.instruction


def test_shapes_choice_text(built):
    out_dir, _ = built["shapes-choice"]
    records = read_records(out_dir / "train.jsonl") + read_records(out_dir / "test.jsonl")
    for record in records:
        assert record.instruction == stream.SHAPE_CHOICE_INSTRUCTION
        assert record.answer in {"A", "B", "C"}
    assert "A. circle\nB. rectangle\nC. triangle" in stream.SHAPE_CHOICE_INSTRUCTION


# ---------------------------------------------------------------------------
# Answers agree with the source labels


def test_digits_answers_match_source(built):
    images, labels = stream._load_digits()
    label_by_pixels = {images[i].tobytes(): int(labels[i]) for i in range(len(labels))}
    for kind in ("digits-classify", "digits-parity"):
        out_dir, _ = built[kind]
        for split in ("train", "test"):
            for record in read_records(out_dir / f"{split}.jsonl"):
                pixels = np.asarray(Image.open(out_dir / record.image))
                assert pixels.shape == (64, 64)
                # Nearest-neighbour upscaling by 8 makes every 8x8 block one source pixel.
                digit = label_by_pixels[pixels[4::8, 4::8].tobytes()]
                if kind == "digits-classify":
                    assert record.answer == str(digit)
                else:
                    assert record.answer == ("yes" if digit % 2 == 0 else "no")


def test_fashion_answers_match_source(built):
    for split in ("train", "test"):
        images, labels = stream._load_fashion(str(stream.fashion_dir()), split)
        label_by_pixels = {images[i].tobytes(): int(labels[i]) for i in range(len(labels))}
        classify_dir, _ = built["fashion-classify"]
        for record in read_records(classify_dir / f"{split}.jsonl"):
            pixels = np.asarray(Image.open(classify_dir / record.image))
            assert record.answer == FASHION_CLASSES[label_by_pixels[pixels.tobytes()]]

        choice_dir, _ = built["fashion-choice"]
        for record in read_records(choice_dir / f"{split}.jsonl"):
            pixels = np.asarray(Image.open(choice_dir / record.image))
            options = CHOICE_PATTERN.fullmatch(record.instruction).groups()
            assert options["ABCD".index(record.answer)] == FASHION_CLASSES[label_by_pixels[pixels.tobytes()]]


def test_shapes_answers_match_source(built):
    for split, get_questions, get_paths in (
        ("train", easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        ("test", easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    ):
        id_by_pixels = {}
        for image_id, path in get_paths().items():
            with Image.open(path) as image:
                id_by_pixels[pixel_digest(image.convert("RGB"))] = image_id
        answers_by_question = {(image_id, text): answer for text, answer, image_id in zip(*get_questions())}
        for kind in ("shapes-color", "shapes-vqa"):
            out_dir, _ = built[kind]
            for record in read_records(out_dir / f"{split}.jsonl"):
                with Image.open(out_dir / record.image) as image:
                    image_id = id_by_pixels[pixel_digest(image)]
                question = record.instruction.removesuffix(" Answer with one word.").lower()
                assert answers_by_question[(image_id, question)] == record.answer


# ---------------------------------------------------------------------------
# Determinism and disjoint splits


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_build_is_deterministic(built, tmp_path, kind):
    out_dir, _ = built[kind]
    build_task(kind, tmp_path / "again", N_TRAIN, N_TEST, seed=0)
    build_task(kind, tmp_path / "other", N_TRAIN, N_TEST, seed=1)

    assert directory_bytes(tmp_path / "again") == directory_bytes(out_dir)
    assert directory_bytes(tmp_path / "other") != directory_bytes(out_dir)


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_train_test_images_disjoint(built, kind):
    out_dir, _ = built[kind]
    train = split_digests(out_dir, "train")
    test = split_digests(out_dir, "test")

    assert len(set(train)) == N_TRAIN
    assert len(set(test)) == N_TEST
    assert not set(train) & set(test)


@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_test_pool_disjoint_across_seeds(kind):
    builder = TASK_KINDS[kind].builder
    train_digests = set()
    test_digests = set()
    for seed in range(3):
        train, test = builder(40, 20, seed)
        train_digests |= {pixel_digest(stream._to_pil(e.image, kind)) for e in train}
        test_digests |= {pixel_digest(stream._to_pil(e.image, kind)) for e in test}

    assert not train_digests & test_digests


# ---------------------------------------------------------------------------
# Class balance


@pytest.mark.parametrize(
    ("kind", "n", "expected"),
    [
        ("digits-classify", 20, {str(d): 2 for d in range(10)}),
        ("digits-parity", 10, {"yes": 5, "no": 5}),
        ("fashion-classify", 20, {name: 2 for name in FASHION_CLASSES}),
        ("fashion-choice", 16, {letter: 4 for letter in "ABCD"}),
        ("shapes-color", 16, {color: 2 for color in COLORS}),
    ],
)
def test_answers_are_balanced(kind, n, expected):
    train, test = TASK_KINDS[kind].builder(n, n, 7)
    assert dict(Counter(e.answer for e in train)) == expected
    assert dict(Counter(e.answer for e in test)) == expected


def test_shapes_vqa_balances_question_types():
    train, test = TASK_KINDS["shapes-vqa"].builder(22, 22, 7)
    for examples in (train, test):
        counts = Counter(e.answer for e in examples)
        color_counts = [counts[color] for color in COLORS]
        shape_counts = [counts[shape] for shape in SHAPES]
        # 11 colour questions over 8 colours and 11 shape questions over 3 shapes.
        assert sum(color_counts) == 11
        assert sum(shape_counts) == 11
        assert max(color_counts) - min(color_counts) <= 1
        assert max(shape_counts) - min(shape_counts) <= 1


@pytest.mark.parametrize("kinds", [("fashion-classify", "fashion-choice"), ("digits-classify", "digits-parity"),
                                   ("shapes-color", "shapes-vqa")])
def test_kinds_of_one_source_draw_different_images(kinds):
    first, second = (TASK_KINDS[kind].builder(20, 10, 0) for kind in kinds)
    for split in (0, 1):
        first_digests = [pixel_digest(stream._to_pil(e.image, kinds[0])) for e in first[split]]
        second_digests = [pixel_digest(stream._to_pil(e.image, kinds[1])) for e in second[split]]
        assert first_digests != second_digests


def test_fashion_choice_options_shuffled():
    train, _ = TASK_KINDS["fashion-choice"].builder(40, 1, 3)
    option_lists = [CHOICE_PATTERN.fullmatch(e.instruction).groups() for e in train]
    assert len(set(option_lists)) > 30


# ---------------------------------------------------------------------------
# Invalid requests


def test_unknown_kind_lists_known(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown task kind 'digits'; known kinds: .*digits-classify.*shapes-vqa"):
        build_task("digits", tmp_path / "out", N_TRAIN, N_TEST, seed=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("n_train", "n_test"), [(0, 4), (6, -1), (6, 2.5), (True, 4)])
def test_invalid_sizes_rejected(tmp_path, n_train, n_test):
    with pytest.raises(ValueError, match="must be a positive integer"):
        build_task("digits-parity", tmp_path / "out", n_train, n_test, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_request_larger_than_pool_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"digits-classify test \(scikit-learn digits\): requested 361 examples but the pool contains only 360"):
        build_task("digits-classify", tmp_path / "out", 5, 361, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_missing_fashion_data_names_package(tmp_path, monkeypatch):
    monkeypatch.setenv(stream.FASHION_DIR_ENV, str(tmp_path / "empty"))

    with pytest.raises(MissingSourceError) as info:
        build_task("fashion-classify", tmp_path / "out", N_TRAIN, N_TEST, seed=0)

    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "empty" / "train-images-idx3-ubyte.gz") in message
    assert not (tmp_path / "out").exists()


def test_corrupt_fashion_file_is_named(tmp_path, monkeypatch):
    for image_name, label_name in stream.FASHION_FILES.values():
        for name in (image_name, label_name):
            (tmp_path / name).write_bytes(b"not gzip")
    monkeypatch.setenv(stream.FASHION_DIR_ENV, str(tmp_path))

    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: cannot decompress"):
        TASK_KINDS["fashion-classify"].builder(N_TRAIN, N_TEST, 0)


# ---------------------------------------------------------------------------
# Atomic output


@pytest.fixture
def broken_kind():
    """A registered kind whose second example of `split` cannot be saved as PNG (CMYK)."""
    names = []

    def register(split: str) -> str:
        def builder(n_train, n_test, seed):
            grey = [Example(Image.new("L", (8, 8), color=i), "Which shade?", str(i)) for i in range(4)]
            broken = Example(Image.new("CMYK", (8, 8)), "Which shade?", "cmyk")
            train, test = grey[:2], grey[2:]
            (train if split == "train" else test).insert(1, broken)
            return train, test

        name = f"broken-{split}"
        register_kind(TaskKind(name, "exact_match", builder, 1, "fails while writing its images"))
        names.append(name)
        return name

    yield register
    for name in names:
        del TASK_KINDS[name]


@pytest.mark.parametrize("split", ["train", "test"])
def test_failed_build_leaves_nothing(tmp_path, broken_kind, split):
    kind = broken_kind(split)
    n_train, n_test = (3, 2) if split == "train" else (2, 3)

    with pytest.raises(OSError, match="cannot write mode CMYK as PNG"):
        build_task(kind, tmp_path / "out", n_train, n_test, seed=0)

    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_previous_build(tmp_path, broken_kind):
    out_dir = tmp_path / "out"
    build_task("digits-parity", out_dir, N_TRAIN, N_TEST, seed=0)
    before = directory_bytes(out_dir)

    with pytest.raises(OSError):
        build_task(broken_kind("test"), out_dir, 2, 3, seed=0)

    assert directory_bytes(out_dir) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_rebuild_replaces_previous_build(tmp_path):
    out_dir = tmp_path / "out"
    build_task("digits-parity", out_dir, N_TRAIN, N_TEST, seed=0)
    build_task("digits-classify", out_dir, 3, 2, seed=0)

    assert len(read_records(out_dir / "train.jsonl")) == 3
    assert len(list((out_dir / "images").iterdir())) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_dir_without_overwrite_rejected(tmp_path):
    out_dir = tmp_path / "out"
    build_task("digits-parity", out_dir, N_TRAIN, N_TEST, seed=0)
    before = directory_bytes(out_dir)

    with pytest.raises(FileExistsError, match="already exists; delete it or pass overwrite=True"):
        build_task("digits-parity", out_dir, N_TRAIN, N_TEST, seed=1, overwrite=False)

    assert directory_bytes(out_dir) == before


def test_foreign_dir_is_not_replaced(tmp_path):
    out_dir = tmp_path / "notes"
    out_dir.mkdir()
    (out_dir / "thesis.tex").write_text("keep me")

    with pytest.raises(FileExistsError, match=r"contains files that build_task does not write \(thesis\.tex\)"):
        build_task("digits-parity", out_dir, N_TRAIN, N_TEST, seed=0)

    assert (out_dir / "thesis.tex").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]
