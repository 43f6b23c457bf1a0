"""Build the embedded mini-stream: small instruction tasks from images shipped in installed packages.

Each task kind draws real images from a local source and never downloads:

- scikit-learn's bundled ``load_digits`` (1797 handwritten 8x8 digits),
- the Debian package ``dataset-fashion-mnist`` (70000 28x28 product photos as idx files),
- the PyPI package ``easy-vqa`` (5000 64x64 images of one coloured shape, with questions).

Every source is split into a train pool and a test pool that do not depend on the
seed, so no test image of a source appears in any train split, whatever the seeds
and kinds of the stream's tasks. The seed only chooses which examples are drawn.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Hashable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from drape.data.records import Record, read_records, write_records

logger = logging.getLogger(__name__)


class Example(NamedTuple):
    """One built example before it is written to disk."""

    # PIL image, or a uint8 array of shape (H, W) or (H, W, 3).
    image: Image.Image | np.ndarray
    instruction: str
    answer: str


Builder = Callable[[int, int, int], tuple[list[Example], list[Example]]]


@dataclass(frozen=True)
class TaskKind:
    """A registered task kind of the mini-stream."""

    # Registry key; also the prefix of every record id the kind writes.
    name: str
    # Key of drape.scorers.SCORERS that scores predictions for this kind.
    scorer: str
    # Function (n_train, n_test, seed) -> (train examples, test examples).
    builder: Builder
    # Max number of words in a correct answer, which bounds the generation length.
    max_answer_words: int
    # One-line summary of the task for logs and reports.
    description: str


class MissingSourceError(FileNotFoundError):
    """An image source package is not installed; the message names the install command."""


# ---------------------------------------------------------------------------
# Sampling helpers


def _check_sizes(kind: str, n_train: int, n_test: int) -> None:
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{kind}: {name} must be a positive integer, got {value!r}")


def _balanced_indices(labels: Sequence[Hashable], n: int, rng: np.random.Generator, pool_name: str) -> list[int]:
    """Draw `n` distinct indices into `labels` whose label counts differ by at most one.

    Labels are visited round-robin in a seeded order, so when a label runs out of
    items the remaining labels keep receiving draws. The result is shuffled.
    Raises ValueError naming `pool_name` when `labels` has fewer than `n` items.
    """
    if n > len(labels):
        raise ValueError(f"{pool_name}: requested {n} examples but the pool contains only {len(labels)}; request fewer")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        groups[label].append(index)
    keys = sorted(groups, key=str)
    queues = [list(rng.permutation(groups[keys[k]])) for k in rng.permutation(len(keys))]

    picked: list[int] = []
    while len(picked) < n:
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop()))
    rng.shuffle(picked)
    return picked


def _split_rngs(kind: str, seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Return independent generators for the train and the test draw of one kind and seed.

    The kind name is part of the entropy, so two kinds of one source (fashion-classify
    and fashion-choice) built with the same seed draw different examples.
    """
    kind_key = zlib.crc32(kind.encode("utf-8"))
    train_seed, test_seed = np.random.SeedSequence([seed, kind_key]).spawn(2)
    return np.random.default_rng(train_seed), np.random.default_rng(test_seed)


# ---------------------------------------------------------------------------
# scikit-learn digits

DIGITS_IMAGE_SIZE = 64
DIGITS_TEST_EVERY = 5  # every 5th digit (index % 5 == 0) is in the test pool: 360 test, 1437 train
DIGIT_INSTRUCTION = "What digit is written in the image? Answer with a single digit."
PARITY_INSTRUCTION = "Is the digit in the image even? Answer yes or no."


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as uint8 images (N, 8, 8) in 0..255 and int labels."""
    from sklearn.datasets import load_digits  # reads a CSV bundled with scikit-learn

    digits = load_digits()
    # Pixel values are ink counts 0..16; scale them to the 0..255 grey range.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _digits_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _load_digits()
    in_test = np.arange(len(labels)) % DIGITS_TEST_EVERY == 0
    mask = in_test if split == "test" else ~in_test
    return images[mask], labels[mask]


def _digit_image(pixels: np.ndarray) -> Image.Image:
    """Upscale an 8x8 digit to a DIGITS_IMAGE_SIZE square greyscale image (white ink on black)."""
    return Image.fromarray(pixels).resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.Resampling.NEAREST)


def _build_digits(
    kind: str, n_train: int, n_test: int, seed: int, answer_for: Callable[[int], str], instruction: str
) -> tuple[list[Example], list[Example]]:
    _check_sizes(kind, n_train, n_test)
    splits = []
    for split, n, rng in zip(("train", "test"), (n_train, n_test), _split_rngs(kind, seed)):
        images, labels = _digits_pool(split)
        answers = [answer_for(int(label)) for label in labels]
        # Balancing on the answer keeps yes/no even for parity and every digit even for classification.
        indices = _balanced_indices(answers, n, rng, f"{kind} {split} (scikit-learn digits)")
        splits.append([Example(_digit_image(images[i]), instruction, answers[i]) for i in indices])
    return splits[0], splits[1]


def build_digits_classify(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build 'What digit is written in the image?' examples answered with the digit."""
    return _build_digits("digits-classify", n_train, n_test, seed, str, DIGIT_INSTRUCTION)


def build_digits_parity(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build 'Is the digit in the image even?' examples answered with yes or no."""
    return _build_digits(
        "digits-parity", n_train, n_test, seed, lambda digit: "yes" if digit % 2 == 0 else "no", PARITY_INSTRUCTION
    )


# ---------------------------------------------------------------------------
# Fashion-MNIST from the Debian package dataset-fashion-mnist

FASHION_DIR_ENV = "DRAPE_FASHION_MNIST_DIR"
FASHION_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# One-word names for labels 0..9 (T-shirt/top, Trouser, Pullover, Dress, Coat,
# Sandal, Shirt, Sneaker, Bag, Ankle boot in the Fashion-MNIST README).
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FASHION_INSTRUCTION = "What kind of clothing item is shown? Answer with one word."
CHOICE_LETTERS = ("A", "B", "C", "D")


def fashion_dir() -> Path:
    """Return the Fashion-MNIST directory: $DRAPE_FASHION_MNIST_DIR, else the Debian package's path."""
    return Path(os.environ.get(FASHION_DIR_ENV, FASHION_DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed idx file of unsigned bytes (the MNIST file format).

    The header is two zero bytes, the type code 0x08 (unsigned byte), the number
    of dimensions, and then each dimension as a big-endian uint32.
    """
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: cannot decompress ({error}); reinstall dataset-fashion-mnist") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (header {data[:4].hex()}); reinstall dataset-fashion-mnist")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = int(np.prod(dims))
    if len(data) - header_size != expected:
        raise ValueError(
            f"{path}: header declares shape {dims} ({expected} bytes) but contains {len(data) - header_size}; "
            "reinstall dataset-fashion-mnist"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


@lru_cache(maxsize=4)
def _load_fashion(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return Fashion-MNIST images (N, 28, 28) uint8 and labels for the 'train' or 'test' file pair."""
    image_name, label_name = FASHION_FILES[split]
    image_path, label_path = Path(directory) / image_name, Path(directory) / label_name
    for path in (image_path, label_path):
        if not path.is_file():
            raise MissingSourceError(
                f"Fashion-MNIST file not found: {path}. Install the Debian package dataset-fashion-mnist "
                f"with `apt-get install dataset-fashion-mnist`, or set {FASHION_DIR_ENV} to a directory "
                "holding the four idx .gz files"
            )
    images, labels = _read_idx(image_path), _read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{image_path}: expected images (N, H, W) and N labels in {label_path}, "
            f"got {images.shape} and {labels.shape}; reinstall dataset-fashion-mnist"
        )
    if labels.max() >= len(FASHION_CLASSES):
        raise ValueError(f"{label_path}: label {labels.max()} is outside 0..9; reinstall dataset-fashion-mnist")
    logger.debug("Loaded %d Fashion-MNIST %s images from %s", len(labels), split, directory)
    return images, labels


def _fashion_draws(kind: str, n_train: int, n_test: int, seed: int):
    """Yield (rng, images, labels, indices) for the train and then the test split, balanced by class."""
    _check_sizes(kind, n_train, n_test)
    for split, n, rng in zip(("train", "test"), (n_train, n_test), _split_rngs(kind, seed)):
        images, labels = _load_fashion(str(fashion_dir()), split)
        indices = _balanced_indices(labels.tolist(), n, rng, f"{kind} {split} (Fashion-MNIST)")
        yield rng, images, labels, indices


def build_fashion_classify(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build Fashion-MNIST examples answered with a one-word class name."""
    splits = []
    for _, images, labels, indices in _fashion_draws("fashion-classify", n_train, n_test, seed):
        splits.append(
            [Example(Image.fromarray(images[i]), FASHION_INSTRUCTION, FASHION_CLASSES[labels[i]]) for i in indices]
        )
    return splits[0], splits[1]


def choice_instruction(options: Sequence[str]) -> str:
    """Format the fashion-choice question with options lettered A, B, ..."""
    lines = ["Which item is shown?"]
    lines += [f"{letter}. {option}" for letter, option in zip(CHOICE_LETTERS, options)]
    lines.append("Answer with the option's letter.")
    return "\n".join(lines)


def build_fashion_choice(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build four-option multiple-choice Fashion-MNIST examples answered with a letter.

    The options are the true class and three distinct distractor classes. Correct
    letters are assigned in equal shares (up to one) and shuffled, so A..D are balanced.
    """
    splits = []
    for rng, images, labels, indices in _fashion_draws("fashion-choice", n_train, n_test, seed):
        letters = [CHOICE_LETTERS[k % len(CHOICE_LETTERS)] for k in range(len(indices))]
        rng.shuffle(letters)
        examples = []
        for i, letter in zip(indices, letters):
            true_class = int(labels[i])
            others = [c for c in range(len(FASHION_CLASSES)) if c != true_class]
            distractors = [FASHION_CLASSES[c] for c in rng.choice(others, size=len(CHOICE_LETTERS) - 1, replace=False)]
            distractors.insert(CHOICE_LETTERS.index(letter), FASHION_CLASSES[true_class])
            examples.append(Example(Image.fromarray(images[i]), choice_instruction(distractors), letter))
        splits.append(examples)
    return splits[0], splits[1]


# ---------------------------------------------------------------------------
# easy-vqa shapes

SHAPE_COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
SHAPE_NAMES = frozenset({"circle", "rectangle", "triangle"})
SHAPES_SUFFIX = " Answer with one word."


@lru_cache(maxsize=2)
def _load_shapes(split: str) -> tuple[dict[int, str], dict[int, dict[str, list[tuple[str, str]]]]]:
    """Return easy-vqa image paths and, per image id, its 'color' and 'shape' (question, answer) pairs.

    Yes/no questions are dropped. Every easy-vqa image contains a single shape, so all
    colour questions about one image share one answer, and so do all shape questions.
    """
    try:
        import easy_vqa
    except ImportError as error:
        raise MissingSourceError("easy-vqa is not installed; install it with `pip install easy-vqa`") from error

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()

    questions: dict[int, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: {"color": [], "shape": []})
    for text, answer, image_id in zip(texts, answers, image_ids):
        if answer in SHAPE_COLORS:
            questions[image_id]["color"].append((text, answer))
        elif answer in SHAPE_NAMES:
            questions[image_id]["shape"].append((text, answer))
    return paths, dict(questions)


def _shapes_instruction(question: str) -> str:
    # easy-vqa questions are all lower case, e.g. "what color is the shape?".
    return question[:1].upper() + question[1:] + SHAPES_SUFFIX


def _open_shape_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _draw_shape_questions(
    kind: str, split: str, question_type: str, image_ids: list[int], n: int, rng: np.random.Generator
) -> list[Example]:
    """Draw `n` images from `image_ids`, balanced by answer, each with one random `question_type` question."""
    paths, questions = _load_shapes(split)
    answers = [questions[image_id][question_type][0][1] for image_id in image_ids]
    picked = _balanced_indices(answers, n, rng, f"{kind} {split} {question_type} questions (easy-vqa)")
    examples = []
    for index in picked:
        image_id = image_ids[index]
        candidates = questions[image_id][question_type]
        question, answer = candidates[int(rng.integers(len(candidates)))]
        examples.append(Example(_open_shape_image(paths[image_id]), _shapes_instruction(question), answer))
    return examples


def build_shapes_color(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build easy-vqa colour questions ('What color is the shape?') balanced over the 8 colours."""
    _check_sizes("shapes-color", n_train, n_test)
    splits = []
    for split, n, rng in zip(("train", "test"), (n_train, n_test), _split_rngs("shapes-color", seed)):
        _, questions = _load_shapes(split)
        image_ids = sorted(image_id for image_id, by_type in questions.items() if by_type["color"])
        splits.append(_draw_shape_questions("shapes-color", split, "color", image_ids, n, rng))
    return splits[0], splits[1]


def build_shapes_vqa(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build easy-vqa colour and shape questions, half of each, one question per image.

    Each image that has both question types is assigned one type at random, so no
    image appears twice in a split. Colour questions are balanced over the colours
    and shape questions over circle, rectangle and triangle.
    """
    _check_sizes("shapes-vqa", n_train, n_test)
    splits = []
    for split, n, rng in zip(("train", "test"), (n_train, n_test), _split_rngs("shapes-vqa", seed)):
        _, questions = _load_shapes(split)
        by_type: dict[str, list[int]] = {"color": [], "shape": []}
        for image_id in sorted(questions):
            available = [question_type for question_type in ("color", "shape") if questions[image_id][question_type]]
            by_type[available[int(rng.integers(len(available)))]].append(image_id)
        n_color = (n + 1) // 2
        examples = _draw_shape_questions("shapes-vqa", split, "color", by_type["color"], n_color, rng)
        examples += _draw_shape_questions("shapes-vqa", split, "shape", by_type["shape"], n - n_color, rng)
        order = rng.permutation(len(examples))
        splits.append([examples[i] for i in order])
    return splits[0], splits[1]


SHAPE_CHOICE_OPTIONS = ("circle", "rectangle", "triangle")
SHAPE_CHOICE_INSTRUCTION = (
    "Which shape is in the image?\n"
    + "\n".join(f"{letter}. {shape}" for letter, shape in zip(CHOICE_LETTERS, SHAPE_CHOICE_OPTIONS))
    + "\nAnswer with the option's letter."
)


def build_shapes_choice(n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Build easy-vqa multiple-choice shape questions answered with a letter, balanced over the shapes.

    The options are always circle, rectangle, triangle in that order, so the letter is a
    function of the shape. Unlike fashion-choice, whose options change per sample, the
    task is learnable by a small frozen LLM within a few hundred samples.
    """
    _check_sizes("shapes-choice", n_train, n_test)
    splits = []
    for split, n, rng in zip(("train", "test"), (n_train, n_test), _split_rngs("shapes-choice", seed)):
        _, questions = _load_shapes(split)
        image_ids = sorted(image_id for image_id, by_type in questions.items() if by_type["shape"])
        drawn = _draw_shape_questions("shapes-choice", split, "shape", image_ids, n, rng)
        splits.append(
            [
                Example(example.image, SHAPE_CHOICE_INSTRUCTION, CHOICE_LETTERS[SHAPE_CHOICE_OPTIONS.index(example.answer)])
                for example in drawn
            ]
        )
    return splits[0], splits[1]


# ---------------------------------------------------------------------------
# Registry

TASK_KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind, replace: bool = False) -> None:
    """Add `kind` to TASK_KINDS; raise ValueError if the name is taken, unless `replace`."""
    if kind.name in TASK_KINDS and not replace:
        raise ValueError(f"Task kind {kind.name!r} is already registered; pass replace=True to override it")
    TASK_KINDS[kind.name] = kind


def get_kind(name: str) -> TaskKind:
    """Return the registered TaskKind called `name`, or raise ValueError listing the known kinds."""
    try:
        return TASK_KINDS[name]
    except KeyError:
        known = ", ".join(sorted(TASK_KINDS))
        raise ValueError(f"Unknown task kind {name!r}; known kinds: {known}") from None


for _kind in (
    TaskKind(
        "digits-classify", "exact_match", build_digits_classify, 1,
        "scikit-learn 8x8 handwritten digits upscaled to 64x64; answer the digit 0-9",
    ),
    TaskKind(
        "digits-parity", "yes_no", build_digits_parity, 1,
        "scikit-learn 8x8 handwritten digits upscaled to 64x64; answer whether the digit is even",
    ),
    TaskKind(
        "fashion-classify", "exact_match", build_fashion_classify, 1,
        "Fashion-MNIST 28x28 product photos; answer one of 10 one-word class names",
    ),
    TaskKind(
        "fashion-choice", "choice_letter", build_fashion_choice, 1,
        "Fashion-MNIST 28x28 product photos; pick the class among 4 lettered options",
    ),
    TaskKind(
        "shapes-color", "exact_match", build_shapes_color, 1,
        "easy-vqa 64x64 shape images; answer the colour of the shape (8 colours)",
    ),
    TaskKind(
        "shapes-choice", "choice_letter", build_shapes_choice, 1,
        "easy-vqa 64x64 shape images; pick the shape among 3 lettered options in a fixed order",
    ),
    TaskKind(
        "shapes-vqa", "exact_match", build_shapes_vqa, 1,
        "easy-vqa 64x64 shape images; half colour questions, half shape questions",
    ),
):
    register_kind(_kind)


# ---------------------------------------------------------------------------
# Writing a task to disk


def _to_pil(image: Image.Image | np.ndarray, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(f"{where}: image must be a PIL image or a numpy array, got {type(image).__name__}")


def _pixel_digest(image: Image.Image) -> bytes:
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).digest()


def _write_split(kind: str, split: str, examples: list[Example], staging: Path) -> list[Record]:
    """Save each example's image as images/<id>.png under `staging` and return its records."""
    records = []
    for index, example in enumerate(examples):
        record_id = f"{kind}-{split}-{index:05d}"
        image_path = f"images/{record_id}.png"
        _to_pil(example.image, f"{kind} {split} example {index}").save(staging / image_path, format="PNG")
        records.append(Record(id=record_id, image=image_path, instruction=example.instruction, answer=example.answer))
    return records


def _check_disjoint(kind: str, train: list[Example], test: list[Example]) -> None:
    train_digests = {_pixel_digest(_to_pil(e.image, f"{kind} train")) for e in train}
    shared = sum(_pixel_digest(_to_pil(e.image, f"{kind} test")) in train_digests for e in test)
    if shared:
        raise ValueError(
            f"{kind}: {shared} test images have the same pixels as a train image; "
            "the builder must draw train and test examples from disjoint image pools"
        )


def build_task(kind: str, out_dir: Path, n_train: int, n_test: int, seed: int, *, overwrite: bool = True) -> dict:
    """Build one task of the mini-stream into `out_dir`.

    Writes out_dir/train.jsonl, out_dir/test.jsonl (LLaVA format, image root
    `out_dir`) and out_dir/images/<id>.png. The files are built in a hidden
    staging directory next to `out_dir`, read back with read_records, and only
    then renamed to `out_dir`, so a failed build leaves no `out_dir` and no
    staging directory. With `overwrite`, an existing `out_dir` containing nothing
    but an earlier build's files is replaced after the new build succeeds. Any
    other existing `out_dir`, or any existing one without `overwrite`, raises
    FileExistsError before anything is written.

    Returns a summary with the counts, scorer, max answer words and the answer
    distribution of each split.
    """
    task_kind = get_kind(kind)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, kind, overwrite)

    train, test = task_kind.builder(n_train, n_test, seed)
    if len(train) != n_train or len(test) != n_test:
        raise ValueError(
            f"{kind}: builder returned {len(train)} train and {len(test)} test examples, "
            f"expected {n_train} and {n_test}"
        )
    _check_disjoint(kind, train, test)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        staging.chmod(0o755)  # mkdtemp creates mode 0700; the built task is meant to be shared
        (staging / "images").mkdir()
        for split, examples in (("train", train), ("test", test)):
            records = _write_split(kind, split, examples, staging)
            write_records(staging / f"{split}.jsonl", records)
            read_records(staging / f"{split}.jsonl", image_root=staging, check_images=True)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    summary = {
        "kind": kind,
        "out_dir": str(out_dir),
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "scorer": task_kind.scorer,
        "max_answer_words": task_kind.max_answer_words,
        "train_answers": dict(sorted(Counter(e.answer for e in train).items())),
        "test_answers": dict(sorted(Counter(e.answer for e in test).items())),
    }
    logger.info("Built %s in %s: %d train, %d test examples (seed %d)", kind, out_dir, n_train, n_test, seed)
    return summary


BUILD_ENTRIES = frozenset({"train.jsonl", "test.jsonl", "images"})


def _check_replaceable(out_dir: Path, kind: str, overwrite: bool) -> None:
    """Raise FileExistsError unless `out_dir` is absent or, with `overwrite`, an earlier build."""
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists; delete it or pass overwrite=True to rebuild {kind}")
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output directory")
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in BUILD_ENTRIES)
    if foreign:
        # Guards against deleting a directory that build_task did not write, e.g. a mistyped path.
        raise FileExistsError(
            f"{out_dir} contains files that build_task does not write ({', '.join(foreign[:5])}); "
            "delete the directory yourself or choose another output directory"
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`, moving an existing `out_dir` aside first and deleting it after."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    # NOTE: between the two renames `out_dir` is briefly missing; the old tree then
    # sits in a hidden .<name>.old-* directory next to it.
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, old / "tree")
    os.rename(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
