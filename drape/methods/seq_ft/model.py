"""Sequential fine-tuning: the forgetting reference.

One prompt generator of DRAPE's architecture and the shared projector train on every
task in turn with no protection and no routing, so later tasks overwrite earlier ones.
"""

from __future__ import annotations

from torch import nn

from drape.methods.base import ContinualMethod
from drape.methods.drape.model import PromptGenerator
from drape.methods.drape.state import generated_content

SHARED = "shared"


class SequentialFineTuning(ContinualMethod):
    name = "seq_ft"
    architecture_keys = ("hidden", "prompt_length", "heads")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.generators = nn.ModuleDict({SHARED: PromptGenerator(dims.llm_dim, config)})

    def task_parameters(self, task):
        return list(self.generators[SHARED].parameters())

    def content(self, llm, batch, route):
        return generated_content(self.projector, self.generators[SHARED], llm, batch)
