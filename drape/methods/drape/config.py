"""Settings of DRAPE: the prompt generator, the null-space protection, the routing and the ablations."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GeneratorConfig(BaseModel):
    """Shape of DRAPE's prompt generator; the sequential and joint references reuse it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    hidden: int = Field(256, ge=8)
    """H, the width of the prompt generator's attention."""
    prompt_length: int = Field(10, ge=1)
    """L_p, the number of soft prompts prepended to the LLM input."""
    heads: int = Field(4, ge=1)
    """Attention heads of the generator; must divide ``hidden``."""

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> GeneratorConfig:
        if self.hidden % self.heads:
            divisors = [str(n) for n in range(1, self.hidden + 1) if self.hidden % n == 0]
            raise ValueError(
                f"heads ({self.heads}) must divide hidden ({self.hidden}); "
                f"allowed heads for hidden {self.hidden}: {', '.join(divisors)}"
            )
        return self


class DrapeConfig(GeneratorConfig):
    nullspace: bool = True
    """Project the shared projector's updates onto the null space of earlier tasks."""
    nullspace_threshold: float = Field(0.99, gt=0, le=1)
    """Fraction of the covariance's trace that the protected subspace keeps."""
    routing_alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the image similarity in the routing score; text gets ``1 - alpha``."""
    oracle_routing: bool = False
    """Use the true task label instead of prototype routing (an ablation only)."""
    prompts: Literal["generated", "fixed"] = "generated"
    """``generated``: instance-specific prompts from the generator (DRAPE). ``fixed``: one
    learned prompt per task, the same for every sample, routed the same way (an ablation)."""
    freeze_projector_after_first_task: bool = False
    """Train the shared projector on the first task only (an ablation)."""
