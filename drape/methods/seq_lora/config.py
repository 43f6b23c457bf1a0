"""Settings of sequential LoRA fine-tuning."""

from drape.methods.lora_settings import LoraSettings


class SeqLoraConfig(LoraSettings):
    """One adapter trained on every task in turn."""
