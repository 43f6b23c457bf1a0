"""Progress bars for long loops, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar on a terminal; plain iteration under CI, DVC logs or pipes."""
    return tqdm(items, desc=desc, total=total, disable=not sys.stderr.isatty(), leave=False)
