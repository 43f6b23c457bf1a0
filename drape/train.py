"""Training of one task of the stream, the same loop for every method.

The method supplies the trainable parameters (its task parameters and, unless it freezes
it, the shared projector), the soft tokens the frozen LLM reads, an optional extra loss
term, and hooks around the optimizer step (DRAPE projects the projector's update onto
the null space of earlier tasks' inputs there). Training runs through ``accelerate``, so
the same code runs on a CPU, one GPU or several.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from drape.config import TaskTrainConfig
from drape.distributed import all_reduce_sum, shard_bounds
from drape.features import FeatureSet
from drape.methods.base import ContinualMethod, count_parameters
from drape.mllm import FrozenLLM
from drape.progress import progress

logger = logging.getLogger(__name__)


@dataclass
class TrainLog:
    task: str
    losses: list[float] = field(default_factory=list)
    """Training loss of every optimizer step (the method's regularizer included)."""
    regularizer: list[float] = field(default_factory=list)
    """The method's extra loss term at every step, when it has one."""
    gradient_norms: list[float] = field(default_factory=list)
    """L2 norm of the gradient of every trainable parameter at every step, before the optimizer hooks."""
    steps: int = 0
    samples_seen: int = 0
    seconds: float = 0.0
    nullspace_rank: dict[str, int] = field(default_factory=dict)
    """Rank of the protected subspace of each projector layer after this task."""
    protected_rank_during_training: dict[str, int] = field(default_factory=dict)
    """Rank of the subspace that constrained this task's updates (earlier tasks')."""
    trainable_parameters: int = 0
    processes: int = 1
    """Number of data-parallel processes that trained the task (``samples_per_second`` is their total)."""
    extra: dict = field(default_factory=dict)
    """Method-specific values reported at the end of the task."""

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "losses": self.losses,
            "regularizer": self.regularizer,
            "gradient_norms": self.gradient_norms,
            "steps": self.steps,
            "samples_seen": self.samples_seen,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples_per_second, 3),
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "nullspace_rank": self.nullspace_rank,
            "protected_rank_during_training": self.protected_rank_during_training,
            "trainable_parameters": self.trainable_parameters,
            "processes": self.processes,
            **self.extra,
        }


def planned_steps(samples: int, settings: TaskTrainConfig) -> int:
    """Optimizer steps of a task: every epoch over ``samples``, capped by ``max_steps``."""
    steps = settings.epochs * math.ceil(samples / settings.batch_size)
    return min(steps, settings.max_steps) if settings.max_steps is not None else steps


def train_task(
    state: ContinualMethod,
    llm: FrozenLLM,
    task: str,
    features: FeatureSet,
    settings: TaskTrainConfig,
    seed: int,
    accelerator: Accelerator | None = None,
    steps: int | None = None,
) -> TrainLog:
    """Train task ``task`` in place on ``state`` and return its log.

    ``features`` are the samples the task trains on (the joint reference passes every task
    seen so far). ``steps`` overrides the number of optimizer steps given by ``settings``.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    state.add_task(task)
    log = TrainLog(
        task=task,
        protected_rank_during_training=state.nullspace.ranks() if state.nullspace else {},
        processes=accelerator.num_processes,
    )

    groups = []
    task_parameters = state.task_parameters(task)
    if task_parameters:
        groups.append({"params": task_parameters, "lr": state.learning_rate(settings.generator_lr)})
    if settings.projector_lr > 0 and state.trains_projector():
        groups.append({"params": list(state.projector.parameters()), "lr": settings.projector_lr})
    else:
        state.projector.requires_grad_(False)
    log.trainable_parameters = count_parameters(p for group in groups for p in group["params"])

    state.to(accelerator.device)
    llm.to(accelerator.device)
    total_steps = planned_steps(len(features), settings) if steps is None else steps
    if not groups:
        logger.info("task %s: the method trains nothing; its state is saved as it is", task)
        total_steps = 0
    logger.info("training task %s: %d samples, %d steps, %d trainable parameters", task, len(features), total_steps, log.trainable_parameters)

    if total_steps:
        _run_steps(state, llm, task, features, settings, seed, accelerator, groups, total_steps, log)

    state.eval()
    state.projector.requires_grad_(True)
    extra = state.end_task(task, features, accelerator.device)
    log.nullspace_rank = extra.pop("nullspace_rank", {})
    log.extra = extra
    logger.info("task %s done in %.1f s; protected ranks %s", task, log.seconds, log.nullspace_rank)
    return log


def _run_steps(state, llm, task, features, settings, seed, accelerator, groups, total_steps, log) -> None:
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    parallel = accelerator.num_processes > 1
    if parallel:
        # No DDP wrapper: LoRA adapters live in the LLM, outside the method module, so the
        # gradients of every trainable parameter are summed by ``_sum_over_processes``.
        optimizer = accelerator.prepare_optimizer(optimizer)
        model = state
        _broadcast_from_main(parameters)
    else:
        prepared, optimizer = accelerator.prepare(state, optimizer)
        model = accelerator.unwrap_model(prepared)
    model.train()

    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    bar = progress(range(total_steps), desc=f"train {task}")
    batches = _batches(len(features), settings.batch_size, generator)
    for step in bar:
        indices = next(batches)
        batch = features.select(indices)
        if parallel:
            loss, extra = _data_parallel_backward(model, llm, task, batch, accelerator, parameters)
        else:
            # bf16 autocast when accelerate's mixed precision is set (ACCELERATE_MIXED_PRECISION=bf16).
            with accelerator.autocast():
                content = model.content(llm, batch, task)
                loss = llm.loss(content, batch.instructions, batch.answers)
                extra = model.regularizer(batch, task)
                if extra is not None:
                    loss = loss + extra
            accelerator.backward(loss)
            loss = float(loss.detach())
        if extra is not None:
            log.regularizer.append(float(extra.detach()))
        log.gradient_norms.append(_gradient_norm(parameters))
        if settings.max_grad_norm is not None:
            # After the sum over processes, so every process clips the same gradient.
            torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], settings.max_grad_norm)

        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)

        log.losses.append(loss)
        log.steps += 1
        log.samples_seen += len(indices)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}")
        if step % max(1, total_steps // 5) == 0 or step == total_steps - 1:
            logger.info("task %s step %d/%d loss %.4f", task, step + 1, total_steps, log.losses[-1])
    log.seconds = time.perf_counter() - started
    if parallel:
        _check_identical(parameters)


def _data_parallel_backward(model, llm, task, batch, accelerator, parameters) -> tuple[float, torch.Tensor | None]:
    """Backpropagate this process's share of ``batch`` and sum the gradients over the processes.

    Every process draws the same mini-batch and takes a contiguous share of it. Its loss is
    the sum of its answer-token losses divided by the whole batch's token count, so the
    summed gradients equal the gradient of the whole batch's mean token loss. Every process
    computes the regularizer on the whole batch, but only the main process backpropagates
    it, so it is counted once. Returns the whole batch's loss and the regularizer.
    """
    start, end = shard_bounds(len(batch), accelerator.process_index, accelerator.num_processes)
    shard = batch.select(list(range(start, end)))
    loss = None
    with accelerator.autocast():
        if len(shard):
            # content() comes first, as in a single process: LoRA methods switch their trainable adapter on there.
            content = model.content(llm, shard, task)
            loss = llm.loss(content, shard.instructions, shard.answers, tokens=llm.answer_tokens(batch.answers))
        regularizer = model.regularizer(batch, task)
    if regularizer is not None and accelerator.is_main_process:
        loss = regularizer if loss is None else loss + regularizer
    if loss is not None:
        accelerator.backward(loss)
    return _sum_over_processes(parameters, 0.0 if loss is None else float(loss.detach())), regularizer


def _sum_over_processes(parameters: list[torch.nn.Parameter], loss: float) -> float:
    """Replace each gradient by its sum over the processes; return the summed ``loss``.

    A parameter that has no gradient on any process keeps ``None``, so AdamW skips it (no
    weight decay) exactly as it does in a single process.
    """
    # One collective for the per-parameter counts of processes with a gradient, and the loss.
    totals = torch.tensor([p.grad is not None for p in parameters] + [loss], dtype=torch.float64)
    totals = all_reduce_sum(totals)
    has_gradient = [bool(count) for count in totals[:-1].tolist()]

    summed = [p for p, flag in zip(parameters, has_gradient) if flag]
    if summed:
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in summed), torch.float32)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in summed])
        flat = all_reduce_sum(flat)
        offset = 0
        for p in summed:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
    return float(totals[-1])


def _gradient_norm(parameters: list[torch.nn.Parameter]) -> float:
    norms = [p.grad.detach().norm().to(torch.float64).cpu() for p in parameters if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _broadcast_from_main(parameters: list[torch.nn.Parameter]) -> None:
    """Copy the main process's values of ``parameters`` to every process."""
    with torch.no_grad():
        for p in parameters:
            torch.distributed.broadcast(p.data, src=0)


def _check_identical(parameters: list[torch.nn.Parameter]) -> None:
    """Raise if a process's trained parameters differ from the main process's."""
    with torch.no_grad():
        for index, p in enumerate(parameters):
            main = p.detach().clone()
            torch.distributed.broadcast(main, src=0)
            if not torch.equal(main, p.detach()):
                raise RuntimeError(
                    f"trainable parameter {index} ({tuple(p.shape)}) differs between processes after training; "
                    "the data-parallel steps were not identical"
                )


def _batches(size: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches of indices, reshuffled every epoch."""
    while True:
        order = torch.randperm(size, generator=generator).tolist()
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]
