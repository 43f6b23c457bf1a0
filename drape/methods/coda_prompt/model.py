"""CODA-Prompt adapted to the frozen multimodal LLM.

Every task adds ``components_per_task`` prompt components P_m, each with a key K_m and an
attention vector A_m. A sample's prompt is the weighted sum ``sum_m alpha_m P_m`` over all
components learned so far, with ``alpha_m = cos(q * A_m, K_m)`` for the sample's frozen
pooled image feature q, so the prompt is assembled per sample without a task label.
Components of earlier tasks are frozen, and new ones are initialised orthogonal to them
(Gram-Schmidt), as in the original. The assembled prompt is prepended to the visual tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drape.methods.base import ContinualMethod
from drape.methods.prompting import PROMPT_INIT_STD, prepend, visual_tokens


def orthogonal_rows(previous: torch.Tensor, count: int, scale: float) -> torch.Tensor:
    """``count`` random rows orthogonal to each other and to the rows of ``previous`` (n, d)."""
    width = previous.shape[1]
    if previous.shape[0] + count > width:
        raise ValueError(f"{previous.shape[0] + count} orthogonal components do not fit in width {width}")
    candidates = torch.randn(count, width)
    basis = torch.linalg.qr(torch.cat([previous, candidates]).T).Q.T  # (n + count, d), orthonormal rows
    return basis[previous.shape[0] :] * scale * width**0.5


class CodaPrompt(ContinualMethod):
    name = "coda_prompt"
    architecture_keys = ("components_per_task", "prompt_length")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.components = nn.ParameterDict()  # task -> (M, L, d_llm)
        self.component_keys = nn.ParameterDict()  # task -> (M, d_v)
        self.attention = nn.ParameterDict()  # task -> (M, d_v)

    def add_task(self, task):
        super().add_task(task)
        count, length, llm_dim = self.config.components_per_task, self.config.prompt_length, self.dims.llm_dim
        for table in (self.components, self.component_keys, self.attention):
            for earlier in table.values():
                earlier.requires_grad_(False)

        def grow(table: nn.ParameterDict, width: int, scale: float) -> torch.Tensor:
            previous = torch.cat([value.detach().reshape(-1, width).cpu() for value in table.values()]) if len(table) else torch.zeros(0, width)
            return orthogonal_rows(F.normalize(previous, dim=-1) if len(previous) else previous, count, scale)

        self.components[task] = nn.Parameter(grow(self.components, length * llm_dim, PROMPT_INIT_STD).reshape(count, length, llm_dim))
        self.component_keys[task] = nn.Parameter(grow(self.component_keys, self.dims.vision_dim, 1.0 / self.dims.vision_dim**0.5))
        self.attention[task] = nn.Parameter(grow(self.attention, self.dims.vision_dim, 1.0 / self.dims.vision_dim**0.5))

    def task_parameters(self, task):
        return [self.components[task], self.component_keys[task], self.attention[task]]

    def weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """Component weights alpha (B, M_total) of each sample."""
        keys = torch.cat(list(self.component_keys.values()))  # (M, d_v)
        attention = torch.cat(list(self.attention.values()))  # (M, d_v)
        attended = pooled.to(keys.device).unsqueeze(1) * attention.unsqueeze(0)  # (B, M, d_v)
        return F.cosine_similarity(attended, keys.unsqueeze(0), dim=-1)

    def content(self, llm, batch, route):
        visual = visual_tokens(self.projector, llm, batch)
        components = torch.cat(list(self.components.values()))  # (M, L, d_llm)
        prompts = torch.einsum("bm,mld->bld", self.weights(batch.pooled), components)
        return prepend(prompts, visual)
