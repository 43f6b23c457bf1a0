"""Settings of joint multitask training, the upper bound."""

from drape.methods.drape.config import GeneratorConfig


class JointConfig(GeneratorConfig):
    """The generator's shape (the same fields as DRAPE's)."""
