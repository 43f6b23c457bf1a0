"""Data parallelism over the processes that ``accelerate launch`` (or ``torchrun``) starts.

Every process reads the same inputs and loads the same state. The helpers here split
work by sample, combine the partial results with collectives, and let only the main
process write outputs, so that every process ends a stage with what a single process
computes alone. Under a plain ``python``/``drape`` command there is one process, every
split is the whole input and every reduction returns its input unchanged.

CPU processes communicate through gloo, GPU processes through NCCL; ``accelerate``'s
``PartialState`` picks the backend from the launcher's environment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import PartialState


def processes() -> PartialState:
    """Return the distributed state of this run (a singleton), with CPU processes when no GPU is visible.

    ``cpu=True`` is what makes processes started by ``accelerate launch --multi_gpu`` or
    ``torchrun`` on a machine without GPUs join one gloo group (accelerate 1.16 otherwise
    treats each of them as a separate single-process run).
    """
    return PartialState(cpu=not torch.cuda.is_available())


def shard_bounds(count: int, rank: int, world: int) -> tuple[int, int]:
    """Start and end of process ``rank``'s contiguous share of ``count`` items.

    The first ``count % world`` processes take one item more, so the shares differ by at
    most one and, concatenated in rank order, give the items in their original order.
    """
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Return the sum of ``tensor`` over the processes (``tensor`` itself on a single process).

    The sum is taken on this process's device, because NCCL reduces GPU tensors only, and
    is returned on ``tensor``'s device; ``tensor`` is left unchanged.
    """
    state = processes()
    if state.num_processes == 1:
        return tensor
    total = tensor.to(state.device, copy=True)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total.to(tensor.device)


def write_on_main_process(write: Callable[[], None]) -> None:
    """Run ``write`` on the main process only, between barriers.

    The first barrier keeps the main process from replacing outputs that another process
    may still be reading. The second keeps every process from finishing before the
    outputs exist. If ``write`` raises, ``torchrun`` stops the other processes.
    """
    state = processes()
    state.wait_for_everyone()
    if state.is_main_process:
        write()
    state.wait_for_everyone()
