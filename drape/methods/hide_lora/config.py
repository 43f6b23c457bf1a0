"""Settings of per-task LoRA experts routed by CLIP prototypes (the HiDe-LLaVA idea)."""

from pydantic import Field

from drape.methods.lora_settings import LoraSettings


class HideLoraConfig(LoraSettings):
    routing_alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the image similarity in the routing score; text gets ``1 - alpha``."""
