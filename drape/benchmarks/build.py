"""Build a benchmark task into the pipeline's task folder, ``data/stream/<task>/``.

The folder gets the same files as an embedded task: ``train.jsonl`` and ``test.jsonl``
in LLaVA format with the folder as image root, and ``images/``. Each record's image is
at ``images/<path relative to the benchmark's image root>``, as a symlink to the source
file or as a copy. The features, train and evaluate stages read the folder unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from drape.benchmarks import get_benchmark
from drape.benchmarks.config import BenchmarkDataConfig
from drape.benchmarks.reader import read_benchmark_records
from drape.config import ConfigError
from drape.data.records import Record, read_records, write_records
from drape.data.stream import _check_replaceable, _replace_dir

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"


def _resolve(root: Path, value: str) -> Path:
    # An absolute override replaces the root: Path("/data") / "/other/x" is "/other/x".
    return root / Path(value).expanduser()


def resolve_task_files(settings: BenchmarkDataConfig, key: str) -> tuple[Path, Path, Path]:
    """Return the task's (train file, test file, image root); raise ConfigError naming the missing path.

    `key` is the settings' key path in params.yaml (``stream.textvqa.data``).
    """
    definition = get_benchmark(settings.benchmark).task(settings.task)
    root = Path(settings.root).expanduser()
    expected = _resolve(root, settings.train_file or definition.train)
    if not root.is_dir():
        raise ConfigError(
            f"{key}.root: data root {root} not found; set it to the folder that contains "
            f"{settings.train_file or definition.train} (expected {expected})"
        )

    paths = {}
    for field, default in (("train_file", definition.train), ("test_file", definition.test)):
        path = _resolve(root, getattr(settings, field) or default)
        if not path.is_file():
            raise ConfigError(
                f"{key}.{field}: record file not found: {path}; download the {definition.name} records of "
                f"{settings.benchmark} there, or set {key}.{field} to the file's path"
            )
        paths[field] = path
    image_root = _resolve(root, settings.image_root or definition.image_root)
    if not image_root.is_dir():
        raise ConfigError(
            f"{key}.image_root: image folder not found: {image_root}; put the {settings.benchmark} images "
            f"there, or set {key}.image_root to their folder"
        )
    return paths["train_file"], paths["test_file"], image_root


def _draw(records: list[Record], n: int | None, rng: np.random.Generator, key: str, field: str, path: Path) -> list[Record]:
    """Return `n` records drawn without replacement in file order, or all of them when `n` is None."""
    if n is None:
        return records
    if n > len(records):
        raise ConfigError(
            f"{key}.{field}: requested {n} records but {path} has {len(records)} usable records; "
            f"request at most {len(records)}, or null for all"
        )
    picked = np.sort(rng.choice(len(records), size=n, replace=False))
    return [records[i] for i in picked]


def _place_image(source: Path, target: Path, mode: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(source.resolve(), target)
    else:
        shutil.copy2(source, target)


def build_benchmark_task(settings: BenchmarkDataConfig, out_dir: Path, seed: int, key: str) -> dict:
    """Read the selected benchmark task's records and write them as the pipeline's task folder `out_dir`.

    Text-only records are kept (the feature stage encodes them from a blank image) or,
    with ``text_only: drop``, left out with a logged count. `n_train`/`n_test` records are drawn with `seed`
    (every record when null). The folder is built in a hidden staging folder next to
    `out_dir`, read back with read_records, and then renamed, so a failed build leaves
    `out_dir` as it was. Raises ConfigError for missing paths or too few records, and
    BenchmarkRecordError listing every unusable record unless ``skip_invalid`` is set.
    Returns a summary with the counts and the scorer.
    """
    definition = get_benchmark(settings.benchmark).task(settings.task)
    train_path, test_path, image_root = resolve_task_files(settings, key)
    label = f"{settings.benchmark}/{settings.task}"
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, label, overwrite=True)

    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, zlib.crc32(label.encode())]).spawn(2)]
    splits: dict[str, list[Record]] = {}
    summary: dict = {"benchmark": settings.benchmark, "task": settings.task, "scorer": definition.scorer}
    for split, path, n, rng in (("train", train_path, settings.n_train, rngs[0]), ("test", test_path, settings.n_test, rngs[1])):
        records = read_benchmark_records(
            path, image_root, turns=settings.turns, check_images=True, skip_invalid=settings.skip_invalid
        )
        text_only = sum(record.image is None for record in records)
        if text_only and settings.text_only == "drop":
            logger.warning("%s: left out %d text-only records of %d (text_only: drop)", path, text_only, len(records))
            records = [record for record in records if record.image is not None]
        elif text_only:
            logger.info("%s: %d of %d records are text-only; they are encoded from a blank image", path, text_only, len(records))
        if not records:
            raise ConfigError(f"{key}: {path} has no usable records; check the file, the task key and text_only")
        splits[split] = _draw(records, n, rng, key, f"n_{split}", path)
        summary[f"{split}_file"] = str(path)
        summary[f"n_{split}"] = len(splits[split])
        summary[f"{split}_text_only"] = sum(record.image is None for record in splits[split])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        staging.chmod(0o755)  # mkdtemp creates mode 0700; the built task is meant to be shared
        (staging / IMAGES_DIR).mkdir()
        placed: set[str] = set()
        for split, records in splits.items():
            for record in records:
                if record.image is not None and record.image not in placed:
                    _place_image(image_root / record.image, staging / IMAGES_DIR / record.image, settings.images)
                    placed.add(record.image)
            rebased = [record if record.image is None else replace(record, image=f"{IMAGES_DIR}/{record.image}") for record in records]
            write_records(staging / f"{split}.jsonl", rebased)
            read_records(staging / f"{split}.jsonl", image_root=staging, check_images=True)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    summary["images"] = len(placed)
    logger.info(
        "Built %s in %s: %d train, %d test records, %d images (%s)",
        label, out_dir, summary["n_train"], summary["n_test"], len(placed), settings.images,
    )
    return summary


__all__ = ["build_benchmark_task", "resolve_task_files"]
