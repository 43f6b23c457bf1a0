"""DRAPE: dynamic cross-modal prompt generation for multimodal continual instruction tuning."""

from drape.telemetry import disable_telemetry

disable_telemetry()

__version__ = "0.1.0"
