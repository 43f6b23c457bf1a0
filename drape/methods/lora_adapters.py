"""LoRA adapters on the frozen LLM through peft, shared by the LoRA-based methods.

The adapters live inside the LLM (peft injects them into its attention projections), not
inside the method module, so the method keeps their tensors in its checkpoint under
``lora.<adapter>.<peft key>`` and re-creates the adapters when it is attached to a freshly
loaded LLM.
"""

from __future__ import annotations

import logging

import torch
from drape.methods.base import ContinualMethod
from drape.methods.prompting import visual_tokens

logger = logging.getLogger(__name__)

LORA_PREFIX = "lora."


class LoraMethod(ContinualMethod):
    """A method whose task parameters are LoRA adapters of the LLM; visual tokens come from the projector."""

    architecture_keys = ("rank", "alpha", "target_modules")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self._peft = None
        self._pending: dict[str, torch.Tensor] = {}

    # Which adapter a task trains, and which adapters are active while it trains or answers.
    def adapter_of(self, task: str) -> str:
        # peft warns about adapter names that are substrings of its "lora_" parameter prefix
        # (a task called "a" or "ra"), so per-task adapters carry a prefix.
        return f"task_{task}"

    def adapters(self) -> list[str]:
        return list(dict.fromkeys(self.adapter_of(task) for task in self.task_names))

    def active_for(self, route: str | None) -> list[str]:
        raise NotImplementedError

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.alpha,
            lora_dropout=0.0,
            target_modules=list(self.config.target_modules),
            bias="none",
        )

    def _ensure_adapter(self, name: str) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        if self._peft is None:
            # A plain attribute, not a submodule, so the LLM's weights stay out of the method's state_dict.
            object.__setattr__(self, "_peft", get_peft_model(self._llm.model, self._lora_config(), adapter_name=name))
        elif name not in self._peft.peft_config:
            self._peft.add_adapter(name, self._lora_config())
        else:
            return
        stored = {key[len(f"{LORA_PREFIX}{name}.") :]: value for key, value in self._pending.items() if key.startswith(f"{LORA_PREFIX}{name}.")}
        if stored:
            result = set_peft_model_state_dict(self._peft, stored, adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"LoRA adapter '{name}': unexpected tensors in the checkpoint: {result.unexpected_keys[:3]}")
        self._peft.to(self._llm.device)

    def attach(self, llm) -> None:
        # A plain attribute, not a submodule: the LLM's weights are not part of the method's state.
        object.__setattr__(self, "_llm", llm)
        for name in self.adapters():
            self._ensure_adapter(name)

    def add_task(self, task):
        super().add_task(task)
        if getattr(self, "_llm", None) is not None:
            self._ensure_adapter(self.adapter_of(task))

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        marker = f".{name}."
        return [parameter for key, parameter in self._peft.named_parameters() if "lora_" in key and marker in key]

    def task_parameters(self, task):
        return self.adapter_parameters(self.adapter_of(task))

    def activate(self, names: list[str], trainable: str | None = None) -> None:
        """Make ``names`` the active adapters; only ``trainable`` (if any) keeps gradients."""
        self._peft.base_model.set_adapter(names, inference_mode=True)
        if trainable is not None:
            for parameter in self.adapter_parameters(trainable):
                parameter.requires_grad_(True)

    def content(self, llm, batch, route):
        # Selects the adapters for this batch: the LLM forward that follows runs through them.
        trainable = self.adapter_of(self.task_names[-1]) if self.training else None
        self.activate(self.active_for(route), trainable=trainable)
        return visual_tokens(self.projector, llm, batch)

    def stored_tensors(self):
        from peft import get_peft_model_state_dict

        tensors = super().stored_tensors()
        if self._peft is None:
            # Not attached (nothing trained yet, or loaded and saved without an LLM).
            return {**tensors, **self._pending}
        for name in self.adapters():
            for key, value in get_peft_model_state_dict(self._peft, adapter_name=name).items():
                tensors[f"{LORA_PREFIX}{name}.{key}"] = value
        return tensors

    def load_stored_tensors(self, tensors):
        self._pending = {key: value for key, value in tensors.items() if key.startswith(LORA_PREFIX)}
        super().load_stored_tensors({key: value for key, value in tensors.items() if not key.startswith(LORA_PREFIX)})

    def lora_layers(self):
        """Return the LLM's LoRA-wrapped Linear layers."""
        from peft.tuners.lora import LoraLayer

        return [module for module in self._peft.modules() if isinstance(module, LoraLayer)]
