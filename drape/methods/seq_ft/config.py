"""Settings of sequential fine-tuning: one prompt generator and the projector, unprotected."""

from drape.methods.drape.config import GeneratorConfig


class SeqFtConfig(GeneratorConfig):
    """The generator's shape (the same fields as DRAPE's)."""
