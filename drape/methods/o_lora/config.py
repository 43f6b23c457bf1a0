"""Settings of O-LoRA (orthogonal subspace learning)."""

from pydantic import Field

from drape.methods.lora_settings import LoraSettings


class OLoraConfig(LoraSettings):
    orthogonal_weight: float = Field(0.5, ge=0)
    """lambda_1, the weight of ``sum |A_old A_new^T|`` over earlier tasks' adapters."""
    l2_weight: float = Field(0.0, ge=0)
    """lambda_2, the weight of the squared norm of the new adapter's parameters."""
