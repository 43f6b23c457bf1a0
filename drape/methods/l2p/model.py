"""L2P adapted to the frozen multimodal LLM.

A pool of prompts, each paired with a learned key, is shared by all tasks. The query of a
sample is its frozen pooled image feature. The ``top_k`` keys closest to it (cosine) pick
the prompts that are prepended to the visual tokens. No task label is used, in training
or at inference. A surrogate loss ``1 - cos(query, key)`` pulls the selected keys toward
the queries that chose them. The original applies the prompts to a frozen ViT; here they
are soft tokens at the LLM's input.
"""

from __future__ import annotations

import torch
from torch import nn

from drape.methods.base import ContinualMethod
from drape.methods.prompting import cosine, key_matching_loss, new_keys, new_prompt, prepend, visual_tokens


class L2P(ContinualMethod):
    name = "l2p"
    architecture_keys = ("pool_size", "prompt_length")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        if config.top_k > config.pool_size:
            raise ValueError(f"l2p.top_k ({config.top_k}) must not exceed l2p.pool_size ({config.pool_size})")
        self.prompts = nn.Parameter(torch.stack([new_prompt(config.prompt_length, dims.llm_dim) for _ in range(config.pool_size)]))
        self.keys = new_keys(config.pool_size, dims.vision_dim)

    def task_parameters(self, task):
        return [self.prompts, self.keys]

    def select(self, pooled: torch.Tensor) -> torch.Tensor:
        """Indices (B, top_k) of the pool prompts whose keys best match the image features."""
        return cosine(pooled.to(self.keys.device), self.keys).topk(self.config.top_k, dim=-1).indices

    def content(self, llm, batch, route):
        visual = visual_tokens(self.projector, llm, batch)
        chosen = self.prompts[self.select(batch.pooled)]  # (B, top_k, L, d_llm)
        return prepend(chosen.flatten(1, 2), visual)

    def regularizer(self, batch, task):
        pooled = batch.pooled.to(self.keys.device)
        chosen = self.keys[self.select(pooled)]  # (B, top_k, d_v)
        query = pooled.unsqueeze(1).expand_as(chosen)
        return self.config.key_loss_weight * key_matching_loss(query.flatten(0, 1), chosen.flatten(0, 1))
