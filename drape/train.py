"""Training of one task of the stream: a new prompt generator and the shared projector.

The shared projector's updates are projected onto the null space of the earlier tasks'
inputs (see ``drape.nullspace``). After the task, its inputs are added to the covariances,
so the next task protects this one too. Training runs through ``accelerate``, so the
same code runs on a CPU, one GPU or several.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from drape.config import TaskTrainConfig
from drape.features import FeatureSet
from drape.methods.drape.state import DrapeState
from drape.mllm import FrozenLLM
from drape.progress import progress

logger = logging.getLogger(__name__)


@dataclass
class TrainLog:
    task: str
    losses: list[float] = field(default_factory=list)
    """Training loss of every optimizer step."""
    steps: int = 0
    samples_seen: int = 0
    seconds: float = 0.0
    nullspace_rank: dict[str, int] = field(default_factory=dict)
    """Rank of the protected subspace of each projector layer after this task."""
    protected_rank_during_training: dict[str, int] = field(default_factory=dict)
    """Rank of the subspace that constrained this task's updates (earlier tasks')."""
    trainable_parameters: int = 0

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "losses": self.losses,
            "steps": self.steps,
            "samples_seen": self.samples_seen,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples_per_second, 3),
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "nullspace_rank": self.nullspace_rank,
            "protected_rank_during_training": self.protected_rank_during_training,
            "trainable_parameters": self.trainable_parameters,
        }


def drape_content(state: DrapeState, llm: FrozenLLM, task: str, patches: torch.Tensor, instructions: list[str]) -> torch.Tensor:
    """Soft prompts of ``task``'s generator followed by the visual tokens: (B, L_p + N_p, d_llm)."""
    visual = state.projector(patches)  # (B, N_p, d_llm)
    instruction, mask = llm.embed_instructions(instructions)
    prompts = state.generators[task](instruction, mask, visual)  # (B, L_p, d_llm)
    return torch.cat([prompts, visual], dim=1)


def train_task(
    state: DrapeState,
    llm: FrozenLLM,
    task: str,
    features: FeatureSet,
    settings: TaskTrainConfig,
    seed: int,
    use_nullspace: bool = True,
    accelerator: Accelerator | None = None,
) -> TrainLog:
    """Train task ``task`` in place on ``state`` and return its log."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    generator_module = state.add_task(task)
    log = TrainLog(task=task, protected_rank_during_training=state.nullspace.ranks())
    if not use_nullspace:
        logger.info("null-space protection is off: the projector trains without constraint")

    groups = [{"params": list(generator_module.parameters()), "lr": settings.generator_lr}]
    if settings.projector_lr > 0:
        groups.append({"params": list(state.projector.parameters()), "lr": settings.projector_lr})
    else:
        state.projector.requires_grad_(False)
    log.trainable_parameters = sum(p.numel() for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)

    state.to(accelerator.device)
    llm.to(accelerator.device)
    state, optimizer = accelerator.prepare(state, optimizer)
    model = accelerator.unwrap_model(state)
    model.train()

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(features) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    logger.info("training task %s: %d samples, %d steps, %d trainable parameters", task, len(features), total_steps, log.trainable_parameters)

    started = time.perf_counter()
    bar = progress(range(total_steps), desc=f"train {task}")
    batches = _batches(len(features), settings.batch_size, generator)
    for step in bar:
        indices = next(batches)
        batch = features.select(indices)
        content = drape_content(model, llm, task, batch.patches.to(accelerator.device), batch.instructions)
        loss = llm.loss(content, batch.instructions, batch.answers)

        accelerator.backward(loss)
        if use_nullspace:
            model.nullspace.snapshot()
        optimizer.step()
        if use_nullspace:
            model.nullspace.project_step()
        optimizer.zero_grad(set_to_none=True)

        log.losses.append(float(loss.detach()))
        log.steps += 1
        log.samples_seen += len(indices)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{log.losses[-1]:.3f}")
        if step % max(1, total_steps // 5) == 0 or step == total_steps - 1:
            logger.info("task %s step %d/%d loss %.4f", task, step + 1, total_steps, log.losses[-1])
    log.seconds = time.perf_counter() - started

    model.eval()
    state.projector.requires_grad_(True)
    accumulate_covariance(model, features, accelerator.device)
    log.nullspace_rank = model.nullspace.update_bases()
    logger.info("task %s done in %.1f s; protected ranks %s", task, log.seconds, log.nullspace_rank)
    return log


@torch.no_grad()
def accumulate_covariance(state: DrapeState, features: FeatureSet, device: torch.device, batch_size: int = 64) -> None:
    """Add the projector's layer inputs on ``features`` to the null-space covariances."""
    with state.nullspace.accumulating():
        for start in range(0, len(features), batch_size):
            state.projector(features.patches[start : start + batch_size].to(device))


def _batches(size: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches of indices, reshuffled every epoch."""
    while True:
        order = torch.randperm(size, generator=generator).tolist()
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]
