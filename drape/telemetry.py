"""Opt-outs of the telemetry that Prefect, MLflow and DVC send by default, and offline model loading."""

from __future__ import annotations

import os

# Each variable is the tool's documented opt-out; HF_HUB_OFFLINE keeps transformers and
# open_clip from reaching a model hub, since every weight comes from a local folder.
TELEMETRY_OPT_OUTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def disable_telemetry() -> None:
    """Set every opt-out that the environment does not set already."""
    for key, value in TELEMETRY_OPT_OUTS.items():
        os.environ.setdefault(key, value)
