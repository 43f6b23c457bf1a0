"""The zero-shot reference: the frozen LLM with no continual training at all."""

from __future__ import annotations

from drape.methods.base import ContinualMethod
from drape.methods.prompting import visual_tokens


class ZeroShot(ContinualMethod):
    name = "zero_shot"
    architecture_keys = ("visual_tokens",)

    def trains_projector(self) -> bool:
        return False

    def content(self, llm, batch, route):
        visual = visual_tokens(self.projector, llm, batch)
        return visual if self.config.visual_tokens else visual[:, :0]
