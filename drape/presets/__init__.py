"""Model presets described as data: architecture, weight sources and training settings."""
