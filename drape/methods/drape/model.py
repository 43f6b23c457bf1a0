"""DRAPE's trainable parts: the shared visual projector and the per-task prompt generator.

For one sample the frozen encoders give patch features P (N_p x d_v) and the LLM's
embedding table gives the instruction's token embeddings E (T x d_llm). Then

    V = projector(P)                                   (N_p, d_llm) visual tokens
    X = LN(W_in E + SelfAttn(W_in E))                  (T, H) contextualised instruction
    Q = SegmentPool_{L_p}(X) + pos                     (L_p, H) instruction-derived queries
    Q = LN(Q + CrossAttn(Q, keys=V, values=V))         (L_p, H) queries that looked at the image
    prompts = MLP(Q)                                   (L_p, d_llm) soft prompts

and the LLM reads ``[prompts; V; instruction; answer]``, so the prompts differ for every
image-instruction pair.
"""

from __future__ import annotations

import torch
from torch import nn

from drape.methods.drape.config import DrapeConfig


class Projector(nn.Module):
    """LLaVA-style two-layer MLP from vision features to the LLM's embedding space.

    The input LayerNorm has no learnable parameters, so the only trained weights are the
    two Linear layers and both are covered by the null-space protection.
    ``input_norm=False`` replaces the LayerNorm with an identity, which makes the module
    LLaVA-1.5's ``mlp2x_gelu`` projector, so LLaVA's pretrained weights load unchanged.
    """

    def __init__(self, vision_dim: int, llm_dim: int, input_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim, elementwise_affine=False) if input_norm else nn.Identity()
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # (B, N_p, d_v) -> (B, N_p, d_llm)
        return self.fc2(self.act(self.fc1(self.norm(patches))))


def segment_pool(tokens: torch.Tensor, mask: torch.Tensor, segments: int) -> torch.Tensor:
    """Masked mean of ``tokens`` (B, T, H) over ``segments`` contiguous spans: (B, segments, H).

    A sample with n valid tokens gives token i to segment ``floor(i * segments / n)``. When
    n < segments some segments would be empty; those take token ``floor(j * n / segments)``.
    """
    batch, length, _ = tokens.shape
    lengths = mask.sum(dim=1).clamp(min=1)  # (B,)
    positions = torch.arange(length, device=tokens.device)
    owner = (positions[None, :] * segments) // lengths[:, None]  # (B, T) segment of each token
    weights = (owner[:, None, :] == torch.arange(segments, device=tokens.device)[None, :, None]) & mask[:, None, :]
    empty = weights.sum(dim=-1) == 0  # (B, L_p)
    fallback = (torch.arange(segments, device=tokens.device)[None, :] * lengths[:, None]) // segments  # (B, L_p)
    fallback_weights = positions[None, None, :] == fallback[:, :, None]
    weights = torch.where(empty[:, :, None], fallback_weights, weights).to(tokens.dtype)  # (B, L_p, T)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ tokens


class PromptGenerator(nn.Module):
    """Generates ``prompt_length`` soft prompts from an instruction and its visual tokens."""

    def __init__(self, llm_dim: int, config: DrapeConfig):
        super().__init__()
        hidden, heads = config.hidden, config.heads
        self.prompt_length = config.prompt_length
        self.instruction_in = nn.Linear(llm_dim, hidden)
        self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(hidden)
        self.positions = nn.Parameter(torch.randn(config.prompt_length, hidden) * 0.02)
        self.cross_attention = nn.MultiheadAttention(hidden, heads, kdim=llm_dim, vdim=llm_dim, batch_first=True)
        self.cross_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, llm_dim))
        # Small initial prompts keep the frozen LLM's behaviour close to its pretrained one
        # at the start of training.
        nn.init.normal_(self.mlp[-1].weight, std=0.002)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, instruction: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Args: instruction (B, T, d_llm) token embeddings, mask (B, T) bool, visual (B, N_p, d_llm).

        Returns: (B, L_p, d_llm) soft prompts.
        """
        x = self.instruction_in(instruction)  # (B, T, H)
        attended, _ = self.self_attention(x, x, x, key_padding_mask=~mask, need_weights=False)
        x = self.self_norm(x + attended)
        queries = segment_pool(x, mask, self.prompt_length) + self.positions  # (B, L_p, H)
        looked, _ = self.cross_attention(queries, visual, visual, need_weights=False)
        queries = self.cross_norm(queries + looked)
        return self.mlp(queries)  # (B, L_p, d_llm)


class FixedPrompt(nn.Module):
    """One learned prompt for every sample of a task: the ablation of the generator.

    It takes the generator's inputs and ignores them, so both plug into the same place.
    """

    def __init__(self, llm_dim: int, prompt_length: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(prompt_length, llm_dim) * 0.002)

    def forward(self, instruction: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(visual.shape[0], -1, -1)  # (B, L_p, d_llm)
