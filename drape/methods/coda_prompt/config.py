"""Settings of CODA-Prompt on the frozen LLM."""

from pydantic import BaseModel, ConfigDict, Field


class CodaPromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    components_per_task: int = Field(4, ge=1)
    """Prompt components added for each task (each with a key and an attention vector)."""
    prompt_length: int = Field(10, ge=1)
    """Soft tokens of the assembled prompt (and of each component)."""
    lr: float | None = Field(1.0e-2, gt=0)
    """Learning rate of the new components; null takes the stream's ``generator_lr``."""
