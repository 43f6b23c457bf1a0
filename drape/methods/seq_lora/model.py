"""Sequential LoRA fine-tuning: one LoRA adapter on the frozen LLM, trained task after task.

The projector trains with it (unprotected), so this is the LoRA counterpart of the
sequential fine-tuning reference.
"""

from __future__ import annotations

from drape.methods.lora_adapters import LoraMethod

SHARED = "shared"


class SequentialLora(LoraMethod):
    name = "seq_lora"

    def adapter_of(self, task):
        return SHARED

    def active_for(self, route):
        return [SHARED]
