"""Task-level prompts chosen by image-and-text prototypes (the ModalPrompt idea).

Each task learns one prompt, the same for all its samples. At inference the sample's image
and instruction embeddings are compared with every task's prototypes (as DRAPE routes)
and the best task's prompt is prepended to the visual tokens. Unlike DRAPE, the prompt does
not depend on the sample and the shared projector trains without null-space protection.
"""

from __future__ import annotations

from torch import nn

from drape.methods.base import ContinualMethod
from drape.methods.prompting import new_prompt, prepend, visual_tokens


class ModalPrompt(ContinualMethod):
    name = "modalprompt"
    routing = "prototypes"
    architecture_keys = ("prompt_length",)

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.task_prompts = nn.ParameterDict()

    def add_task(self, task):
        super().add_task(task)
        self.task_prompts[task] = new_prompt(self.config.prompt_length, self.dims.llm_dim)

    def task_parameters(self, task):
        return [self.task_prompts[task]]

    def route(self, pooled, text, prototypes, task):
        return prototypes.route(pooled, text, self.config.routing_alpha)

    def content(self, llm, batch, route):
        return prepend(self.task_prompts[route], visual_tokens(self.projector, llm, batch))
