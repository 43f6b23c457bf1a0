"""Settings of DRAPE: the prompt generator, the null-space protection and the routing."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DrapeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    hidden: int = Field(256, ge=8)
    """H, the width of the prompt generator's attention."""
    prompt_length: int = Field(10, ge=1)
    """L_p, the number of soft prompts prepended to the LLM input."""
    heads: int = Field(4, ge=1)
    """Attention heads of the generator; must divide ``hidden``."""
    nullspace: bool = True
    """Project the shared projector's updates onto the null space of earlier tasks."""
    nullspace_threshold: float = Field(0.99, gt=0, le=1)
    """Fraction of the covariance's trace that the protected subspace keeps."""
    routing_alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the image similarity in the routing score; text gets ``1 - alpha``."""
    oracle_routing: bool = False
    """Use the true task label instead of prototype routing (an ablation only)."""

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> DrapeConfig:
        if self.hidden % self.heads:
            divisors = [str(n) for n in range(1, self.hidden + 1) if self.hidden % n == 0]
            raise ValueError(
                f"heads ({self.heads}) must divide hidden ({self.hidden}); "
                f"allowed heads for hidden {self.hidden}: {', '.join(divisors)}"
            )
        return self
