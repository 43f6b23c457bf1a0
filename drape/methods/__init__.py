"""The continual-learning methods: DRAPE, its references and the baselines it is compared with.

Each method is a folder with ``config.py`` (its settings, the section of ``params.yaml``
named like the method) and its module. ``params.yaml``'s ``method`` key selects one.
"""

from __future__ import annotations

from importlib import import_module

from drape.methods.coda_prompt.config import CodaPromptConfig
from drape.methods.drape.config import DrapeConfig
from drape.methods.dualprompt.config import DualPromptConfig
from drape.methods.hide_lora.config import HideLoraConfig
from drape.methods.joint.config import JointConfig
from drape.methods.l2p.config import L2PConfig
from drape.methods.modalprompt.config import ModalPromptConfig
from drape.methods.o_lora.config import OLoraConfig
from drape.methods.seq_ft.config import SeqFtConfig
from drape.methods.seq_lora.config import SeqLoraConfig
from drape.methods.zero_shot.config import ZeroShotConfig

# name -> (config class, "module:class" of the method); the modules import torch and peft,
# so they load only when a method is built.
METHODS = {
    "drape": (DrapeConfig, "drape.methods.drape.state:DrapeState"),
    "zero_shot": (ZeroShotConfig, "drape.methods.zero_shot.model:ZeroShot"),
    "seq_ft": (SeqFtConfig, "drape.methods.seq_ft.model:SequentialFineTuning"),
    "joint": (JointConfig, "drape.methods.joint.model:JointTraining"),
    "l2p": (L2PConfig, "drape.methods.l2p.model:L2P"),
    "dualprompt": (DualPromptConfig, "drape.methods.dualprompt.model:DualPrompt"),
    "coda_prompt": (CodaPromptConfig, "drape.methods.coda_prompt.model:CodaPrompt"),
    "modalprompt": (ModalPromptConfig, "drape.methods.modalprompt.model:ModalPrompt"),
    "seq_lora": (SeqLoraConfig, "drape.methods.seq_lora.model:SequentialLora"),
    "o_lora": (OLoraConfig, "drape.methods.o_lora.model:OLora"),
    "hide_lora": (HideLoraConfig, "drape.methods.hide_lora.model:HideLora"),
}


def method_class(name: str):
    """Return the ``ContinualMethod`` subclass registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; allowed values: {', '.join(METHODS)}")
    module, cls = METHODS[name][1].split(":")
    return getattr(import_module(module), cls)


def create_method(name: str, config, dims):
    """Build method ``name`` with its settings ``config`` for encoders and an LLM of ``dims``."""
    return method_class(name)(config, dims)
