"""Settings of the zero-shot reference: the frozen model, never trained."""

from pydantic import BaseModel, ConfigDict


class ZeroShotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    visual_tokens: bool = False
    """Feed the initial (untrained) projector's visual tokens. Its output means nothing to
    the LLM yet, so by default the LLM answers from the instruction alone."""
