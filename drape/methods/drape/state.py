"""The DRAPE model state after a stage of the stream, and its safetensors checkpoint.

A checkpoint folder contains everything that the evaluation after that stage and the
training of the next task need:

* ``projector.safetensors``: the shared projector;
* ``generators.safetensors``: one prompt generator per task trained so far;
* ``nullspace.safetensors``: the accumulated input covariances of the projector's layers;
* ``state.json``: the configuration fingerprint, the trained tasks and the generator names.

Loading compares the fingerprint with the current configuration, so a checkpoint from a
projector or generator of another shape stops with a message instead of a shape error
deep inside torch.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from drape.methods.drape.config import DrapeConfig
from drape.methods.drape.model import Projector, PromptGenerator
from drape.nullspace import NullSpaceProjector

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or was written under another configuration."""


def fingerprint(config: DrapeConfig, vision_dim: int, llm_dim: int, encoder: str) -> dict:
    """Collect the settings that fix the shapes and meaning of a checkpoint's tensors."""
    return {
        "method": "drape",
        "encoder": encoder,
        "vision_dim": vision_dim,
        "llm_dim": llm_dim,
        "hidden": config.hidden,
        "prompt_length": config.prompt_length,
        "heads": config.heads,
    }


class DrapeState(nn.Module):
    """The shared projector, the generators of the tasks trained so far, and the null-space state."""

    def __init__(self, config: DrapeConfig, vision_dim: int, llm_dim: int, encoder: str):
        super().__init__()
        self.config = config
        self.llm_dim = llm_dim
        self.fingerprint = fingerprint(config, vision_dim, llm_dim, encoder)
        self.projector = Projector(vision_dim, llm_dim)
        self.generators = nn.ModuleDict()
        self.nullspace = NullSpaceProjector(self.projector, config.nullspace_threshold)

    @property
    def tasks(self) -> list[str]:
        return list(self.generators)

    def add_task(self, task: str) -> PromptGenerator:
        """Create task ``task``'s generator; a task is learned once per stream."""
        if task in self.generators:
            raise CheckpointError(f"task '{task}' already has a generator in this checkpoint; each task is trained once")
        self.generators[task] = PromptGenerator(self.llm_dim, self.config)
        return self.generators[task]

    def save(self, out_dir: Path, extra_files: dict[str, str] | None = None) -> None:
        """Write the checkpoint folder atomically (a temporary folder renamed at the end).

        ``extra_files`` maps file names to text written into the folder with the tensors.
        """
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, staging / "projector.safetensors")
        generators = {f"{task}.{k}": v.contiguous() for task, gen in self.generators.items() for k, v in gen.state_dict().items()}
        save_file(generators, staging / "generators.safetensors")
        save_file(self.nullspace.state_dict(), staging / "nullspace.safetensors")
        (staging / STATE_FILE).write_text(json.dumps({"fingerprint": self.fingerprint, "tasks": self.tasks}, indent=2))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)

    def load(self, checkpoint_dir: Path) -> DrapeState:
        """Load a checkpoint folder written by ``save`` into this state."""
        state_path = checkpoint_dir / STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: checkpoint not found; run the stage that writes it (dvc repro)")
        try:
            stored = json.loads(state_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{state_path}:{error.lineno}: not valid JSON ({error.msg}); re-run the stage that writes it") from None
        for key, expected in self.fingerprint.items():
            found = stored["fingerprint"].get(key)
            if found != expected:
                raise CheckpointError(
                    f"{state_path}: checkpoint was written with {key}={found!r} but the configuration has "
                    f"{key}={expected!r}; re-run the stream from its first task (dvc repro) or restore the settings"
                )

        self.projector.load_state_dict(load_file(checkpoint_dir / "projector.safetensors"))
        generators = load_file(checkpoint_dir / "generators.safetensors")
        for task in stored["tasks"]:
            generator = self.add_task(task)
            prefix = f"{task}."
            generator.load_state_dict({k[len(prefix) :]: v for k, v in generators.items() if k.startswith(prefix)})
        self.nullspace.load_state_dict(load_file(checkpoint_dir / "nullspace.safetensors"))
        return self


def load_projector_output(checkpoint_dir: Path, patches: torch.Tensor, vision_dim: int, llm_dim: int) -> torch.Tensor:
    """Apply the projector stored in ``checkpoint_dir`` to ``patches``."""
    projector = Projector(vision_dim, llm_dim)
    projector.load_state_dict(load_file(checkpoint_dir / "projector.safetensors"))
    with torch.no_grad():
        return projector(patches)
