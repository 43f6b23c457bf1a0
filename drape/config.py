"""Typed configuration of a pipeline run, validated from ``params.yaml``.

``params.yaml`` is grouped by stage, the way ``dvc.yaml`` reads it:

* ``seed``: the seed of every random choice (data sampling, initialisation, batching).
* ``models``: which preset of frozen encoders and LLM the ``models`` stage materialises.
* ``stream``: the task stream in training order. Each task names the task trained before
  it in ``after`` (``init`` for the first one) so that ``dvc.yaml`` can chain the
  per-task stages. It carries its own ``data`` and ``train`` settings, so changing one
  task re-runs that task and the later ones only.
* ``method``: the continual-learning method (``drape`` or a baseline of ``drape.methods``).
* one section per method, named like it (``drape``, ``l2p``, ``o_lora``, ...): its
  architecture and continual-learning settings. Only the selected method's section is
  read, and ``dvc.yaml`` tracks only that one.
* ``evaluate``: decoding and scoring settings of the evaluation stages.
* ``tracking``: where MLflow records runs.

Errors name the key path (``stream.digits.train.epochs``) and the allowed values.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML, YAMLError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drape.benchmarks.config import BENCHMARK_KIND, BenchmarkDataConfig
from drape.scorers.caption import CAPTION_METRICS
from drape.methods import (
    METHODS,
    CodaPromptConfig,
    DrapeConfig,
    DualPromptConfig,
    HideLoraConfig,
    JointConfig,
    L2PConfig,
    ModalPromptConfig,
    OLoraConfig,
    SeqFtConfig,
    SeqLoraConfig,
    ZeroShotConfig,
)

logger = logging.getLogger(__name__)

# Name of the state before the first task: the freshly initialised projector, no
# prototypes and no null-space constraint.
INIT_STAGE = "init"
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """An invalid ``params.yaml``; the message names the file, the key and the fix."""


class _Section(BaseModel):
    # strict: a YAML boolean is not silently read as the integer 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WeightsConfig(_Section):
    """Local weight files of the ``llava-7b`` preset; other presets ignore them.

    A path given here takes precedence over its environment variable
    (``DRAPE_LLAVA_CLIP_WEIGHTS``, ``DRAPE_LLAVA_LLM_DIR``, ``DRAPE_LLAVA_PROJECTOR``). With
    null and no variable set, the file is looked up in the local Hugging Face cache.
    Relative paths are relative to the repository root.
    """

    clip: str | None = None
    """open_clip checkpoint of ViT-L-14-336 with OpenAI weights (``open_clip_model.safetensors``)."""
    llm: str | None = None
    """Directory of Vicuna-7B-v1.5: ``config.json``, the tokenizer and the weight shards."""
    projector: str | None = None
    """LLaVA-1.5's pretrained projector, ``mm_projector.bin``."""


class ModelsConfig(_Section):
    preset: Literal["embedded", "tiny", "llava-7b", "llava-7b-scaled"] = "embedded"
    """``embedded``: SmolLM2-135M-Instruct and the EfficientNet-Lite0/MiniLM open_clip
    model, real pretrained weights shipped in packages. ``tiny``: randomly initialised
    models of the same classes, for plumbing tests. ``llava-7b``: LLaVA-1.5-7B's CLIP
    ViT-L/14-336, Vicuna-7B-v1.5 and pretrained projector, read from ``weights``.
    ``llava-7b-scaled``: the same classes with small, seeded random weights, for CPU tests."""
    patch_grid: int = Field(4, ge=1, le=16)
    """The vision trunk's final feature map is average-pooled to a grid of this side,
    so each image gives ``patch_grid**2`` visual tokens. The llava presets ignore it: they
    pass every ViT patch token on (576 for ``llava-7b``, as LLaVA-1.5 does)."""
    weights: WeightsConfig = WeightsConfig()


class TaskDataConfig(_Section):
    kind: str
    """A task kind of ``drape.data.stream`` (image source, instruction and scorer)."""
    n_train: int = Field(ge=1)
    n_test: int = Field(ge=1)


class TaskTrainConfig(_Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    generator_lr: float = Field(1e-3, gt=0)
    projector_lr: float = Field(1e-4, ge=0)
    """0 freezes the shared projector while this task trains."""
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    """Stops training after this many optimizer steps (None: run all epochs)."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clips the total L2 norm of the trainable parameters' gradient to this value before
    each step, as LLaVA's training does with 1.0 (None: no clipping)."""


class TaskConfig(_Section):
    after: str
    """The task trained just before this one, or ``init`` for the first task."""
    data: TaskDataConfig | BenchmarkDataConfig
    """An embedded task kind, or with ``kind: benchmark`` a task of CoIN or UCIT."""
    train: TaskTrainConfig = TaskTrainConfig()

    @field_validator("data", mode="wrap")
    @classmethod
    def _data_by_kind(cls, value: Any, handler: Any) -> TaskDataConfig | BenchmarkDataConfig:
        # Validate against the one model that `kind` selects, so errors name that model's keys
        # only, not every member of the union.
        if isinstance(value, (TaskDataConfig, BenchmarkDataConfig)):
            return handler(value)
        if isinstance(value, dict) and value.get("kind") == BENCHMARK_KIND:
            return BenchmarkDataConfig.model_validate(value)
        return TaskDataConfig.model_validate(value)


class EvaluateConfig(_Section):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(6, ge=1)
    forward_transfer: bool = True
    """Also evaluate the tasks not trained yet (the matrix above the diagonal). MFN, MFT,
    MAA, BWT and forgetting do not use those entries, so switching it off saves time."""
    caption_metric: Literal[CAPTION_METRICS] = "CIDEr"  # type: ignore[valid-type]
    """The corpus metric of a caption task's whole test split that its accuracy-matrix
    entry shows, times 100 (CIDEr 0.57 gives 57.0). Every metric is in ``scores.json``."""


class TrackingConfig(_Section):
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "drape-mini-stream"
    run_name: str | None = None
    """Name of the MLflow parent run (default: ``<method>-seed<seed>``)."""


class PipelineConfig(_Section):
    seed: int = 0
    method: Literal[tuple(METHODS)] = "drape"  # type: ignore[valid-type]
    """The continual-learning method; its settings are the section of the same name."""
    models: ModelsConfig = ModelsConfig()
    stream: dict[str, TaskConfig]
    drape: DrapeConfig = DrapeConfig()
    zero_shot: ZeroShotConfig = ZeroShotConfig()
    seq_ft: SeqFtConfig = SeqFtConfig()
    joint: JointConfig = JointConfig()
    l2p: L2PConfig = L2PConfig()
    dualprompt: DualPromptConfig = DualPromptConfig()
    coda_prompt: CodaPromptConfig = CodaPromptConfig()
    modalprompt: ModalPromptConfig = ModalPromptConfig()
    seq_lora: SeqLoraConfig = SeqLoraConfig()
    o_lora: OLoraConfig = OLoraConfig()
    hide_lora: HideLoraConfig = HideLoraConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("stream")
    @classmethod
    def _stream_is_chained(cls, stream: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        if not stream:
            raise ValueError("the stream needs at least one task")
        previous = INIT_STAGE
        for name, task in stream.items():
            # Task names become folder names and DVC stage names, and dvc.yaml reads
            # stream.<name>.train as a dotted path, so they cannot hold '/', '.' or '@'.
            if not TASK_NAME.fullmatch(name):
                raise ValueError(
                    f"stream.{name}: invalid task name {name!r}; use letters, digits, '-' and '_', "
                    "starting with a letter or digit"
                )
            if name == INIT_STAGE:
                raise ValueError(
                    f"stream.{name}: the task name '{INIT_STAGE}' is reserved for the state before the "
                    "first task; rename the task"
                )
            if task.after != previous:
                raise ValueError(
                    f"stream.{name}.after is '{task.after}' but must be '{previous}', "
                    "the task listed just before it"
                )
            previous = name
        return stream

    @property
    def method_config(self) -> BaseModel:
        """The settings of the selected method."""
        return getattr(self, self.method)

    @property
    def task_names(self) -> list[str]:
        """The tasks in training order."""
        return list(self.stream)

    def task(self, name: str) -> TaskConfig:
        """Return task ``name``'s settings; raise ConfigError for a task not in the stream."""
        if name not in self.stream:
            raise ConfigError(
                f"unknown task '{name}'; the stream in params.yaml has: {', '.join(self.stream)}"
            )
        return self.stream[name]


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "value_error":
            # The validators' own text, without pydantic's "Value error, " prefix.
            message = str(item.get("ctx", {}).get("error", message))
            if message.startswith(f"{key}."):
                # The message already names a longer key path (stream.parity.after).
                lines.append(f"  {message}")
                continue
        elif item["type"] == "literal_error":
            allowed = item.get("ctx", {}).get("expected", "")
            message = f"got {item['input']!r}; allowed values: {allowed}"
        elif item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling"
        elif item["type"] != "missing":
            message = f"{message}, got {item['input']!r}"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], path: Path = Path("params.yaml")) -> PipelineConfig:
    """Validate a parsed ``params.yaml`` mapping; raise ConfigError naming each bad key."""
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(path, error)) from None

    # Task kinds are registered in the data package. Checking them here makes a typo fail
    # before any stage runs, not in the middle of the stream.
    from drape.data.stream import TASK_KINDS

    for name, task in config.stream.items():
        if isinstance(task.data, BenchmarkDataConfig):
            continue  # its benchmark and task keys were checked by BenchmarkDataConfig
        if task.data.kind not in TASK_KINDS:
            raise ConfigError(
                f"{path}: stream.{name}.data.kind: got '{task.data.kind}'; "
                f"allowed values: {', '.join(sorted(TASK_KINDS))}, or {BENCHMARK_KIND} for a CoIN or UCIT task"
            )
    return config


def load_config(path: Path | str = "params.yaml") -> PipelineConfig:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from None
    try:
        # YAML 1.2, as DVC reads params.yaml, so ``1e-3`` is a number for both.
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as error:
        # ruamel names the text "<unicode string>" and ends duplicate-key errors with how
        # to turn the check off in its API, which does not apply to params.yaml.
        detail = str(error).replace('"<unicode string>"', f'"{path}"').split("\nTo suppress this check")[0].strip()
        raise ConfigError(f"{path}: not valid YAML: {detail}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(raw, path)
