"""The feature cache: frozen-encoder outputs of every sample, stored as Parquet.

Each split of a task is one Parquet file with a row per sample: its id, instruction and
answer(s), the patch features (float16, flattened ``num_patches x image_dim``), the pooled
image embedding and the instruction's text embedding. The schema metadata records the
encoder that produced them, and readers compare it with the current models so that a
cache built by another encoder is rejected instead of silently mis-shaped.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from drape.data.records import Record, load_image, read_records
from drape.progress import progress

logger = logging.getLogger(__name__)

ENCODER_METADATA_KEY = b"drape.encoder"
# Encoder fields that must match between a feature file and the models reading it.
_ENCODER_FIELDS = ("name", "image_dim", "text_dim", "num_patches")


class FeatureError(ValueError):
    """A feature file that is missing, unreadable or from another encoder."""


@dataclass
class FeatureSet:
    ids: list[str]
    instructions: list[str]
    answers: list[str]
    answer_lists: list[list[str] | None]
    patches: torch.Tensor  # (N, num_patches, image_dim) float32
    pooled: torch.Tensor  # (N, image_dim)
    text: torch.Tensor  # (N, text_dim)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, indices: list[int]) -> FeatureSet:
        return FeatureSet(
            ids=[self.ids[i] for i in indices],
            instructions=[self.instructions[i] for i in indices],
            answers=[self.answers[i] for i in indices],
            answer_lists=[self.answer_lists[i] for i in indices],
            patches=self.patches[indices],
            pooled=self.pooled[indices],
            text=self.text[indices],
        )

    def record(self, i: int) -> Record:
        answers = tuple(self.answer_lists[i]) if self.answer_lists[i] else None
        return Record(id=self.ids[i], image=None, instruction=self.instructions[i], answer=self.answers[i], answers=answers)


def concatenate(parts: list[FeatureSet]) -> FeatureSet:
    """Join several feature sets into one, keeping their order."""
    return FeatureSet(
        ids=[i for part in parts for i in part.ids],
        instructions=[text for part in parts for text in part.instructions],
        answers=[answer for part in parts for answer in part.answers],
        answer_lists=[answers for part in parts for answers in part.answer_lists],
        patches=torch.cat([part.patches for part in parts]),
        pooled=torch.cat([part.pooled for part in parts]),
        text=torch.cat([part.text for part in parts]),
    )


def _fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    flat = values.reshape(values.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1).astype(dtype.to_pandas_dtype())), flat.shape[1])


def extract_split(encoder, records_path: Path, image_root: Path, out_path: Path, batch_size: int = 32) -> int:
    """Encode every record of ``records_path`` and write its Parquet file; return the sample count."""
    records = read_records(records_path, image_root=image_root)
    patches, pooled, text = [], [], []
    for start in progress(range(0, len(records), batch_size), desc=f"features {records_path.parent.name}/{records_path.stem}"):
        batch = records[start : start + batch_size]
        # A text-only record is encoded from all-zero pixels (see drape.encoders.stack_pixels).
        images = [None if record.image is None else load_image(image_root / record.image) for record in batch]
        with torch.no_grad():
            batch_patches, batch_pooled = encoder.encode_images(images)
            batch_text = encoder.encode_texts([record.instruction for record in batch])
        patches.append(batch_patches.float().numpy())
        pooled.append(batch_pooled.float().numpy())
        text.append(batch_text.float().numpy())

    table = pa.table(
        {
            "id": pa.array([record.id for record in records], pa.string()),
            "instruction": pa.array([record.instruction for record in records], pa.string()),
            "answer": pa.array([record.answer for record in records], pa.string()),
            "answers": pa.array([list(record.answers) if record.answers else None for record in records], pa.list_(pa.string())),
            "patches": _fixed_list(np.concatenate(patches), pa.float16()),
            "pooled": _fixed_list(np.concatenate(pooled), pa.float32()),
            "text": _fixed_list(np.concatenate(text), pa.float32()),
        }
    )
    info = {field: getattr(encoder.info, field) for field in _ENCODER_FIELDS}
    table = table.replace_schema_metadata({ENCODER_METADATA_KEY: json.dumps(info).encode()})
    pq.write_table(table, out_path)
    return len(records)


def extract_task_features(encoder, task_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write ``out_dir/{train,test}.parquet`` for the task stored in ``task_dir``.

    Both files are written into a temporary folder that replaces ``out_dir`` only when
    both are complete, so a failure leaves no partial cache behind.
    """
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        counts = {
            split: extract_split(encoder, task_dir / f"{split}.jsonl", task_dir, staging / f"{split}.parquet")
            for split in ("train", "test")
        }
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return counts


def _column_matrix(table: pa.Table, name: str, path: Path, width: int) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if column.type.list_size != width:
        raise FeatureError(
            f"{path}: column '{name}' has {column.type.list_size} values per sample but the current "
            f"encoder gives {width}; the file was built by another encoder, so re-run its features stage "
            f"(dvc repro features@{path.parent.name})"
        )
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)


def load_features(path: Path, encoder_info: dict) -> FeatureSet:
    """Read one Parquet split and check it against ``encoder_info`` (the models' manifest)."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise FeatureError(f"{path}: feature file not found; run its features stage (dvc repro)") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise FeatureError(f"{path}: not a readable Parquet file ({error}); delete it and re-run its features stage") from None

    metadata = table.schema.metadata or {}
    stored = json.loads(metadata.get(ENCODER_METADATA_KEY, b"{}"))
    for field in _ENCODER_FIELDS:
        if stored.get(field) != encoder_info.get(field):
            raise FeatureError(
                f"{path}: features come from encoder {field}={stored.get(field)!r} but the models in use have "
                f"{field}={encoder_info.get(field)!r}; re-run the features stage for this task "
                f"(dvc repro features@{path.parent.name})"
            )

    num_patches, image_dim = encoder_info["num_patches"], encoder_info["image_dim"]
    patches = _column_matrix(table, "patches", path, num_patches * image_dim).astype(np.float32)
    return FeatureSet(
        ids=table.column("id").to_pylist(),
        instructions=table.column("instruction").to_pylist(),
        answers=table.column("answer").to_pylist(),
        answer_lists=table.column("answers").to_pylist(),
        patches=torch.from_numpy(patches.reshape(-1, num_patches, image_dim)),
        pooled=torch.from_numpy(_column_matrix(table, "pooled", path, image_dim).copy()),
        text=torch.from_numpy(_column_matrix(table, "text", path, encoder_info["text_dim"]).copy()),
    )
