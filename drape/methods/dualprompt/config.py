"""Settings of DualPrompt on the frozen LLM."""

from pydantic import BaseModel, ConfigDict, Field


class DualPromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    general_length: int = Field(5, ge=1)
    """Soft tokens of the G-prompt, shared by all tasks."""
    expert_length: int = Field(5, ge=1)
    """Soft tokens of each task's E-prompt."""
    key_loss_weight: float = Field(0.5, ge=0)
    """Weight of the loss that pulls the task's key toward its image features."""
    lr: float | None = Field(1.0e-2, gt=0)
    """Learning rate of the prompts and keys; null takes the stream's ``generator_lr``."""
