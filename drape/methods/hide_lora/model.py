"""Per-task LoRA experts chosen by image and text prototypes (the HiDe-LLaVA idea).

Each task trains its own adapter with only that adapter active. At inference each sample
is routed by the prototypes (as DRAPE routes) and answered with the routed task's adapter.
HiDe-LLaVA also merges the lower layers' adapters into one shared adapter; here every
layer keeps per-task experts.
"""

from __future__ import annotations

from drape.methods.lora_adapters import LoraMethod


class HideLora(LoraMethod):
    name = "hide_lora"
    routing = "prototypes"

    def active_for(self, route):
        return [self.adapter_of(route)]

    def route(self, pooled, text, prototypes, task):
        return prototypes.route(pooled, text, self.config.routing_alpha)
