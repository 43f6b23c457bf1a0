"""Settings shared by the LoRA-based methods."""

from pydantic import BaseModel, ConfigDict, Field


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rank: int = Field(8, ge=1)
    """r, the rank of each adapter."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: the update is ``(alpha / rank) * B A``."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    """Names of the LLM's Linear layers that get adapters."""
    lr: float | None = Field(None, gt=0)
    """Learning rate of the adapters; null takes the stream's ``generator_lr``."""
