"""Settings of L2P (Learning to Prompt) on the frozen LLM."""

from pydantic import BaseModel, ConfigDict, Field


class L2PConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    pool_size: int = Field(10, ge=1)
    """Prompts in the shared pool, each with a learned key."""
    prompt_length: int = Field(5, ge=1)
    """Soft tokens per pool prompt."""
    top_k: int = Field(2, ge=1)
    """Prompts selected per sample; the LLM reads ``top_k * prompt_length`` soft tokens."""
    key_loss_weight: float = Field(0.5, ge=0)
    """Weight of the surrogate loss that pulls the selected keys toward the image feature."""
    lr: float | None = Field(1.0e-2, gt=0)
    """Learning rate of the pool (prompt tuning needs a larger one than the generators);
    null takes the stream's ``generator_lr``."""
