"""Pieces shared by the prompt-based methods: visual tokens, key matching and initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_INIT_STD = 0.002
"""Initial scale of learned prompts: small, so the frozen LLM starts close to its pretrained behaviour."""


def visual_tokens(projector: nn.Module, llm, batch) -> torch.Tensor:
    """Apply the shared projector to the batch's patch features: (B, N_p, d_llm)."""
    return projector(batch.patches.to(llm.device))


def prepend(prompts: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``[prompts; visual]`` for every sample; ``prompts`` is (L, d) or (B, L, d)."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(visual.shape[0], -1, -1)
    return torch.cat([prompts, visual], dim=1)


def new_prompt(length: int, llm_dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(length, llm_dim) * PROMPT_INIT_STD)


def new_keys(count: int, width: int) -> nn.Parameter:
    """Random keys of norm about 0.6 whatever the width, so a short training run can align them."""
    return nn.Parameter(torch.empty(count, width).uniform_(-1, 1) / width**0.5)


def cosine(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query (B, d) with each key (M, d): (B, M)."""
    return F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def key_matching_loss(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(query, key)``: pulls each selected key (B, d) toward its query (B, d)."""
    return (1 - F.cosine_similarity(query.float(), keys.float(), dim=-1)).mean()
