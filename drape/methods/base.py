"""What every continual-learning method of the pipeline provides, and its checkpoint format.

A method is the trainable state that sits around the frozen LLM: the shared visual
projector (every method has one, so that all of them see the image the same way) plus
the method's own parts (prompt generators, prompt pools, LoRA adapters). The training
loop (``drape.train``) and the evaluation (``drape.evaluate``) only talk to a method
through the interface below, so a new method is a new folder under ``drape.methods``
with a config and a subclass of ``ContinualMethod``.

A checkpoint folder holds

* ``projector.safetensors``: the shared projector;
* ``parameters.safetensors``: every other tensor of the method (generators, prompts,
  keys, LoRA adapters), named by their module path;
* ``nullspace.safetensors``: the accumulated projector input covariances, only for
  methods that protect the projector with null-space updates;
* ``state.json``: the method's fingerprint and the tasks trained so far.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel
from safetensors.torch import load_file
from torch import nn

from drape.files import save_tensors
from drape.methods.drape.model import Projector
from drape.nullspace import NullSpaceProjector

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or was written under another configuration."""


@dataclass(frozen=True)
class ModelDims:
    """Widths of the frozen encoders and the LLM that a method's tensors depend on."""

    encoder: str
    """Fingerprint name of the frozen image/text encoder."""
    vision_dim: int
    """Width of a patch feature and of the pooled image embedding."""
    text_dim: int
    """Width of the instruction's text embedding."""
    llm_dim: int
    """Width of the LLM's input embeddings."""
    projector_input_norm: bool = True
    """Whether the projector normalises its input; False for a pretrained LLaVA projector,
    which has no input LayerNorm. The encoder name already separates the presets, so this
    is not part of a checkpoint's fingerprint."""


class ContinualMethod(nn.Module):
    """Base class of the methods: the shared projector, per-task parts and their checkpoint.

    Subclasses set ``name`` and override ``add_task`` (create the new task's modules),
    ``content`` (the soft tokens the LLM reads before the instruction) and, where the
    method needs them, ``route``, ``regularizer``, ``attach`` and the optimizer hooks.
    """

    name: ClassVar[str]
    routing: ClassVar[str] = "none"
    """How a test sample picks task-specific parts without its label: ``prototypes``
    (image and text prototypes), ``keys`` (learned keys matched by the image feature),
    ``none`` (nothing task-specific is chosen), or ``oracle`` (the true task label; only
    for variants named as oracles)."""

    def __init__(self, config: BaseModel, dims: ModelDims):
        super().__init__()
        self.config = config
        self.dims = dims
        self.projector = Projector(dims.vision_dim, dims.llm_dim, input_norm=dims.projector_input_norm)
        self.task_names: list[str] = []
        self.nullspace: NullSpaceProjector | None = None

    # ----- structure -------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        """The tasks trained so far, in training order."""
        return list(self.task_names)

    def fingerprint(self) -> dict:
        """Settings that fix the shapes and meaning of the checkpoint's tensors."""
        architecture = {key: value for key, value in self.config.model_dump(mode="json").items() if key in self.architecture_keys}
        return {
            "method": self.name,
            "encoder": self.dims.encoder,
            "vision_dim": self.dims.vision_dim,
            "llm_dim": self.dims.llm_dim,
            **architecture,
        }

    architecture_keys: ClassVar[tuple[str, ...]] = ()
    """Config fields that change tensor shapes; a checkpoint must match them to load."""

    def add_task(self, task: str) -> None:
        """Register ``task`` and create its modules; a task is learned once per stream."""
        if task in self.task_names:
            raise CheckpointError(f"task '{task}' is already trained in this checkpoint; each task is trained once")
        self.task_names.append(task)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters trained for ``task`` besides the shared projector."""
        return []

    def trains_projector(self) -> bool:
        """Return whether the shared projector trains during the current task."""
        return True

    def learning_rate(self, generator_lr: float) -> float:
        """Learning rate of the task parameters; a method config's ``lr`` overrides the stream's."""
        return getattr(self.config, "lr", None) or generator_lr

    def attach(self, llm) -> None:
        """Connect the method to the frozen LLM (LoRA methods insert their adapters here)."""

    # ----- forward ---------------------------------------------------------------

    def route(self, pooled: torch.Tensor, text: torch.Tensor, prototypes, task: str) -> list[str | None]:
        """Choose, for each test sample, the trained task whose parts answer it.

        ``task`` is the true task of the samples. Only oracle variants read it; every
        other method routes from the features alone or returns ``None`` for each sample.
        """
        return [None] * len(pooled)

    def content(self, llm, batch, route: str | None) -> torch.Tensor:
        """Build the embeddings the LLM reads before the instruction: (B, K, d_llm).

        ``route`` is the task chosen for the batch: the task being trained during training,
        the routed task at evaluation (``None`` for methods that do not route).
        """
        raise NotImplementedError

    def regularizer(self, batch, task: str) -> torch.Tensor | None:
        """An extra training loss term of the method (key matching, orthogonality), or None."""
        return None

    # ----- optimizer hooks ---------------------------------------------------------

    def before_optimizer_step(self) -> None:
        """Called after the backward pass, before ``optimizer.step()``."""

    def after_optimizer_step(self) -> None:
        """Called after ``optimizer.step()``, before the gradients are cleared."""

    def end_task(self, task: str, features, device: torch.device) -> dict:
        """Finish ``task`` after its last step; return values for the training log."""
        return {}

    # ----- accounting ----------------------------------------------------------------

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the method except the projector and the null-space state."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith("projector.")}

    def stored_parameters(self) -> int:
        """Number of values the method keeps to run inference after the stream (projector included)."""
        projector = sum(value.numel() for value in self.projector.state_dict().values())
        return projector + sum(value.numel() for value in self.stored_tensors().values())

    # ----- checkpoint ------------------------------------------------------------------

    def save(self, out_dir: Path, extra_files: dict[str, str] | None = None) -> None:
        """Write the checkpoint folder atomically (a temporary folder renamed at the end).

        ``extra_files`` maps file names to text written into the folder with the tensors.
        """
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_tensors({k: v.detach().contiguous() for k, v in self.projector.state_dict().items()}, staging / "projector.safetensors")
        save_tensors({k: v.detach().contiguous() for k, v in self.stored_tensors().items()}, staging / "parameters.safetensors")
        if self.nullspace is not None:
            save_tensors(self.nullspace.state_dict(), staging / "nullspace.safetensors")
        state = {"fingerprint": self.fingerprint(), "tasks": self.tasks}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)

    def load(self, checkpoint_dir: Path) -> ContinualMethod:
        """Load a checkpoint folder written by ``save`` into this fresh method."""
        state_path = checkpoint_dir / STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: checkpoint not found; run the stage that writes it (dvc repro)")
        try:
            stored = json.loads(state_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{state_path}:{error.lineno}: not valid JSON ({error.msg}); re-run the stage that writes it") from None
        found_fingerprint = stored.get("fingerprint", {})
        for key, expected in self.fingerprint().items():
            found = found_fingerprint.get(key)
            if found != expected:
                raise CheckpointError(
                    f"{state_path}: checkpoint was written with {key}={found!r} but the configuration has "
                    f"{key}={expected!r}; re-run the stream from its first task (dvc repro) or restore the settings"
                )

        self.projector.load_state_dict(load_file(checkpoint_dir / "projector.safetensors"))
        for task in stored["tasks"]:
            self.add_task(task)
        self.load_stored_tensors(load_file(checkpoint_dir / "parameters.safetensors"))
        if self.nullspace is not None:
            self.nullspace.load_state_dict(load_file(checkpoint_dir / "nullspace.safetensors"))
        return self

    def load_stored_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the tensors written by ``stored_tensors`` (the projector is loaded already)."""
        tensors = {**tensors, **{f"projector.{k}": v for k, v in self.projector.state_dict().items()}}
        self.load_state_dict(tensors)


def count_parameters(parameters) -> int:
    """Number of values in an iterable of tensors."""
    return sum(parameter.numel() for parameter in parameters)


def load_projector_output(
    checkpoint_dir: Path, patches: torch.Tensor, vision_dim: int, llm_dim: int, input_norm: bool = True
) -> torch.Tensor:
    """Apply the projector stored in ``checkpoint_dir`` to ``patches``."""
    projector = Projector(vision_dim, llm_dim, input_norm=input_norm)
    projector.load_state_dict(load_file(checkpoint_dir / "projector.safetensors"))
    with torch.no_grad():
        return projector(patches)
