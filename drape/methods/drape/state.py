"""DRAPE as a continual-learning method: per-task prompt generators, a null-space protected
shared projector and prototype routing.

The ablations are settings of the same class: ``nullspace: false`` trains the projector
without protection, ``freeze_projector_after_first_task`` stops its training after the
first task, ``oracle_routing`` picks the generator by the true task label, and
``prompts: fixed`` replaces each generator by one learned prompt per task.
"""

from __future__ import annotations

import torch
from torch import nn

from drape.distributed import all_reduce_sum, processes, shard_bounds
from drape.methods.base import CheckpointError, ContinualMethod, ModelDims, load_projector_output
from drape.methods.drape.config import DrapeConfig
from drape.methods.drape.model import FixedPrompt, PromptGenerator
from drape.nullspace import NullSpaceProjector

__all__ = ["CheckpointError", "DrapeState", "load_projector_output"]


class DrapeState(ContinualMethod):
    """The shared projector, the generators of the tasks trained so far, and the null-space state."""

    name = "drape"
    architecture_keys = ("hidden", "prompt_length", "heads", "prompts")

    def __init__(self, config: DrapeConfig, dims: ModelDims):
        super().__init__(config, dims)
        self.generators = nn.ModuleDict()
        # The covariances are kept even with ``nullspace: false``, so the ranks are comparable
        # between DRAPE and the ablation. Only the projection is off.
        self.nullspace = NullSpaceProjector(self.projector, config.nullspace_threshold)

    @property
    def routing(self) -> str:  # type: ignore[override]
        return "oracle" if self.config.oracle_routing else "prototypes"

    def add_task(self, task: str) -> None:
        super().add_task(task)
        if self.config.prompts == "fixed":
            self.generators[task] = FixedPrompt(self.dims.llm_dim, self.config.prompt_length)
        else:
            self.generators[task] = PromptGenerator(self.dims.llm_dim, self.config)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.generators[task].parameters())

    def trains_projector(self) -> bool:
        return not (self.config.freeze_projector_after_first_task and len(self.task_names) > 1)

    def route(self, pooled, text, prototypes, task):
        if self.config.oracle_routing and task in self.generators:
            return [task] * len(pooled)
        # Without a generator for ``task`` (forward transfer), the oracle routes like DRAPE.
        return prototypes.route(pooled, text, self.config.routing_alpha)

    def content(self, llm, batch, route):
        return generated_content(self.projector, self.generators[route], llm, batch)

    def before_optimizer_step(self) -> None:
        if self.config.nullspace:
            self.nullspace.snapshot()

    def after_optimizer_step(self) -> None:
        if self.config.nullspace:
            self.nullspace.project_step()

    def end_task(self, task, features, device):
        accumulate_covariance(self.projector, self.nullspace, features, device)
        return {"nullspace_rank": self.nullspace.update_bases()}

    def stored_tensors(self):
        return {f"generators.{k}": v for k, v in self.generators.state_dict().items()}


def generated_content(projector, generator, llm, batch) -> torch.Tensor:
    """Soft prompts of ``generator`` followed by the visual tokens: (B, L_p + N_p, d_llm)."""
    visual = projector(batch.patches.to(llm.device))  # (B, N_p, d_llm)
    instruction, mask = llm.embed_instructions(batch.instructions)
    prompts = generator(instruction, mask, visual)  # (B, L_p, d_llm)
    return torch.cat([prompts, visual], dim=1)


@torch.no_grad()
def accumulate_covariance(projector, nullspace: NullSpaceProjector, features, device: torch.device, batch_size: int = 64) -> None:
    """Add the projector's layer inputs on ``features`` to the null-space covariances.

    Under data parallelism each process runs its contiguous share of the samples and the
    covariances are summed over the processes, so they equal a single process's up to the
    order of the float64 additions.
    """
    parallel = processes()
    first, last = shard_bounds(len(features), parallel.process_index, parallel.num_processes)
    reduce = all_reduce_sum if parallel.num_processes > 1 else None
    with nullspace.accumulating(reduce):
        for start in range(first, last, batch_size):
            projector(features.patches[start : min(start + batch_size, last)].to(device))
