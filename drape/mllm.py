"""The frozen LLM with visual and soft-prompt tokens spliced into its chat template.

Every method feeds the LLM the same way: a user turn whose content starts with a block of
continuous embeddings (soft prompts, then visual tokens) followed by the instruction
tokens, and an assistant turn holding the answer. Loss is cross-entropy on the answer
tokens (and the end-of-turn token) only.

The template around the user content is the tokenizer's own chat template
(``template="chat_template"``) or LLaVA's Vicuna v1 conversation (``template="vicuna_v1"``,
:mod:`drape.presets.conversation`), which the llava presets select in their manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEMPLATES = ("chat_template", "vicuna_v1")
SYSTEM_PROMPT = "Answer the question about the image briefly."
_CONTENT_MARK = "\u2063CONTENT\u2063"


@dataclass
class LLMBatch:
    inputs_embeds: torch.Tensor  # (B, S, d_llm)
    attention_mask: torch.Tensor  # (B, S)
    labels: torch.Tensor | None  # (B, S), IGNORE_INDEX outside the answer


class FrozenLLM(nn.Module):
    """A causal LLM whose weights never train, with the chat template split around the user content.

    The model stays in eval mode (no dropout) whatever the caller's mode is, with one
    exception: when gradient checkpointing is enabled on it, :meth:`loss` runs the forward
    pass in train mode while gradients are recorded, because transformers checkpoints
    decoder layers only in train mode. This is accepted only for a model without attention
    dropout (Llama and Vicuna have ``attention_dropout=0``), so train mode changes nothing
    else. The method's tensors stay in float32: the embeddings this class returns are
    float32, and the assembled input is cast to the model's dtype (bfloat16 for llava-7b)
    only when it enters the model.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: str = "chat_template"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()
        # transformers 5.25 renamed is_gradient_checkpointing to is_activation_checkpointing.
        flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
        self.checkpointing = bool(getattr(model, flag, False))
        dropout = getattr(model.config, "attention_dropout", 0.0)
        if self.checkpointing and dropout:
            raise ValueError(
                f"gradient checkpointing needs train mode, which would enable the LLM's attention dropout "
                f"({dropout}); set attention_dropout to 0 in its config or disable checkpointing"
            )

        before, after = self._split_template(tokenizer, template)
        self.template = template
        self.prefix_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
        self.suffix_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM's tokenizer has no end-of-sequence token; it cannot mark the answer's end")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @staticmethod
    def _split_template(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str]:
        """Return the text before and after the user content of a one-turn generation prompt."""
        if template == "vicuna_v1":
            from drape.presets.conversation import VICUNA_V1

            return VICUNA_V1.split(bos_token=tokenizer.bos_token or "")
        if template != "chat_template":
            raise ValueError(f"unknown template {template!r}; use one of: {', '.join(TEMPLATES)}")
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": _CONTENT_MARK}],
            tokenize=False,
            add_generation_prompt=True,
        )
        before, after = rendered.split(_CONTENT_MARK)
        return before, after

    def train(self, mode: bool = True) -> FrozenLLM:
        # The LLM stays in eval mode (no dropout) whatever the caller's mode is.
        super().train(mode)
        self.model.eval()
        return self

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """Embed token ids with the frozen embedding table: (len(ids), d_llm), float32."""
        table = self.model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device)).float()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def embed_instructions(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of instructions, right-padded: (B, T, d_llm) and a (B, T) bool mask."""
        ids = self.tokenize(instructions)
        length = max(1, max(len(row) for row in ids))
        padded = torch.full((len(ids), length), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(ids), length), dtype=torch.bool, device=self.device)
        for i, row in enumerate(ids):
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return self.model.get_input_embeddings()(padded).float(), mask

    def build_batch(
        self,
        content_embeds: torch.Tensor,
        instructions: list[str],
        answers: list[str] | None = None,
    ) -> LLMBatch:
        """Assemble the LLM input around ``content_embeds`` (B, K, d_llm).

        With ``answers`` the sequences are right-padded and carry labels for training.
        Without, they are left-padded and end at the assistant turn, ready for generation.
        """
        batch = content_embeds.shape[0]
        assert len(instructions) == batch, f"{len(instructions)} instructions for {batch} samples"
        prefix = self.embed_ids(self.prefix_ids)
        suffix = self.embed_ids(self.suffix_ids)
        instruction_ids = self.tokenize(instructions)
        answer_ids = self.tokenize(answers) if answers is not None else None

        sequences, label_rows = [], []
        for i in range(batch):
            parts = [prefix, content_embeds[i], self.embed_ids(instruction_ids[i]) if instruction_ids[i] else None, suffix]
            labels = [IGNORE_INDEX] * (len(self.prefix_ids) + content_embeds.shape[1] + len(instruction_ids[i]) + len(self.suffix_ids))
            if answer_ids is not None:
                target = answer_ids[i] + [self.eos_id]
                parts.append(self.embed_ids(target))
                labels += target
            sequences.append(torch.cat([part for part in parts if part is not None]))
            label_rows.append(labels)

        length = max(seq.shape[0] for seq in sequences)
        embeds = content_embeds.new_zeros((batch, length, content_embeds.shape[-1]))
        mask = torch.zeros((batch, length), dtype=torch.long, device=content_embeds.device)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=content_embeds.device)
        left_pad = answers is None
        for i, seq in enumerate(sequences):
            span = slice(length - seq.shape[0], length) if left_pad else slice(0, seq.shape[0])
            embeds[i, span] = seq
            mask[i, span] = 1
            labels[i, span] = torch.tensor(label_rows[i], dtype=torch.long)
        return LLMBatch(embeds, mask, labels if answers is not None else None)

    def loss(self, content_embeds: torch.Tensor, instructions: list[str], answers: list[str], tokens: int | None = None) -> torch.Tensor:
        """Cross-entropy over the answer tokens of the batch: their mean, or their sum divided by ``tokens``.

        Data-parallel training passes the whole batch's ``answer_tokens`` to every shard, so
        the shards' losses add up to the mean over the whole batch.
        """
        batch = self.build_batch(content_embeds, instructions, answers)
        checkpointing = self.checkpointing and torch.is_grad_enabled()
        if checkpointing:
            self.model.train()
        # transformers' causal-LM loss sums the token losses and divides by num_items_in_batch when it is given.
        normalizer = {} if tokens is None else {"num_items_in_batch": tokens}
        try:
            output = self.model(
                inputs_embeds=batch.inputs_embeds.to(self.model.dtype),
                attention_mask=batch.attention_mask,
                labels=batch.labels,
                **normalizer,
            )
        finally:
            if checkpointing:
                self.model.eval()
        return output.loss

    def answer_tokens(self, answers: list[str]) -> int:
        """Number of tokens that ``loss`` averages over for ``answers``: each answer and its end-of-sequence token."""
        return sum(len(ids) + 1 for ids in self.tokenize(answers))

    @torch.no_grad()
    def generate(self, content_embeds: torch.Tensor, instructions: list[str], max_new_tokens: int) -> list[str]:
        """Greedy-decode an answer for each sample."""
        batch = self.build_batch(content_embeds, instructions)
        # generate() derives position ids from the attention mask, so left padding is safe.
        output = self.model.generate(
            inputs_embeds=batch.inputs_embeds.to(self.model.dtype),
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
