"""DualPrompt adapted to the frozen multimodal LLM.

A G-prompt shared by all tasks and one E-prompt per task, each E-prompt with a learned key.
Training task t uses its own E-prompt (the task identity is known while training, as in
the original) and pulls its key toward the task's frozen image features. At inference the
key closest to the sample's image feature picks the E-prompt, so no task label is used.
The LLM reads ``[G-prompt; E-prompt; visual tokens]``; the original inserts them as prefixes
into chosen layers of a frozen ViT.
"""

from __future__ import annotations

import torch
from torch import nn

from drape.methods.base import ContinualMethod
from drape.methods.prompting import cosine, key_matching_loss, new_keys, new_prompt, prepend, visual_tokens


class DualPrompt(ContinualMethod):
    name = "dualprompt"
    routing = "keys"
    architecture_keys = ("general_length", "expert_length")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.general = new_prompt(config.general_length, dims.llm_dim)
        self.experts = nn.ParameterDict()
        self.keys = nn.ParameterDict()

    def add_task(self, task):
        super().add_task(task)
        self.experts[task] = new_prompt(self.config.expert_length, self.dims.llm_dim)
        self.keys[task] = nn.Parameter(new_keys(1, self.dims.vision_dim).data[0])

    def task_parameters(self, task):
        return [self.general, self.experts[task], self.keys[task]]

    def route(self, pooled, text, prototypes, task):
        keys = torch.stack([self.keys[name] for name in self.task_names])
        best = cosine(pooled.to(keys.device), keys).argmax(dim=-1)
        return [self.task_names[i] for i in best.tolist()]

    def content(self, llm, batch, route):
        visual = visual_tokens(self.projector, llm, batch)
        return prepend(torch.cat([self.general, self.experts[route]]), visual)

    def regularizer(self, batch, task):
        pooled = batch.pooled.to(self.keys[task].device)
        return self.config.key_loss_weight * key_matching_loss(pooled, self.keys[task].expand_as(pooled))
