"""Writing output files that other users and processes read."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    """Save ``tensors`` as a safetensors file readable like any file this process creates.

    safetensors 0.8.0 writes its files with mode 0600, which other users of a shared
    workspace or DVC cache cannot read. So the mode is set from the umask afterwards.
    """
    save_file(tensors, str(path))
    os.chmod(path, 0o666 & ~_umask())
