"""Settings of the ModalPrompt baseline: task-level prompts chosen by image and text prototypes."""

from pydantic import BaseModel, ConfigDict, Field


class ModalPromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt_length: int = Field(10, ge=1)
    """Soft tokens of each task's prompt."""
    routing_alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the image similarity in the routing score; text gets ``1 - alpha``."""
    lr: float | None = Field(1.0e-2, gt=0)
    """Learning rate of the task prompts; null takes the stream's ``generator_lr``."""
