"""The ``data`` settings of a stream task that is a benchmark task (``kind: benchmark``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drape.benchmarks import BENCHMARK_KIND, get_benchmark


class BenchmarkDataConfig(BaseModel):
    """Selects one task of a registered benchmark and where its files are.

    Relative paths in ``train_file``, ``test_file`` and ``image_root`` are relative to
    ``root``; absolute paths are used as they are.
    """

    # Same settings as drape.config's sections: unknown keys and YAML booleans as numbers are rejected.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["benchmark"]
    benchmark: str
    """Name of a benchmark definition (``coin``, ``ucit``)."""
    task: str
    """Task key within the benchmark (``textvqa``)."""
    root: str
    """Data root that the definition's paths are relative to."""
    n_train: int | None = Field(None, ge=1)
    """Train records drawn with the pipeline seed (null: every record, in file order)."""
    n_test: int | None = Field(None, ge=1)
    """Test records drawn with the pipeline seed (null: every record, in file order)."""
    train_file: str | None = None
    """Overrides the definition's train record file."""
    test_file: str | None = None
    """Overrides the definition's test record file."""
    image_root: str | None = None
    """Overrides the definition's image folder."""
    turns: Literal["first", "all"] = "first"
    """``first``: a multi-turn conversation gives its first human/gpt exchange only.
    ``all``: every exchange becomes a sample, with the earlier turns as context."""
    skip_invalid: bool = False
    """false: any unusable record fails the data stage with a list of all of them.
    true: unusable records are logged with their file and index and left out."""
    text_only: Literal["keep", "drop"] = "keep"
    """Records without an image. ``keep``: they join the splits and are encoded from a
    blank image (all-zero pixels). ``drop``: they are left out with a logged count."""
    images: Literal["symlink", "copy"] = "symlink"
    """Placement of the task's images in ``data/stream/<task>/images``: links or copies."""

    @field_validator("benchmark")
    @classmethod
    def _benchmark_is_registered(cls, name: str) -> str:
        try:
            get_benchmark(name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        return name

    @model_validator(mode="after")
    def _task_is_in_benchmark(self) -> BenchmarkDataConfig:
        try:
            get_benchmark(self.benchmark).task(self.task)
        except KeyError as error:
            raise ValueError(f"task: {error.args[0]}") from None
        return self


__all__ = ["BENCHMARK_KIND", "BenchmarkDataConfig"]
