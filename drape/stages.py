"""Pipeline stages: the entry points that ``dvc.yaml`` runs.

Each stage reads ``params.yaml``, calls the library and writes its declared outputs under
``data/``, ``models/`` or ``results/``. Outputs are written to a temporary path and renamed
into place at the end, so a failed stage leaves nothing that a later ``dvc repro`` would
trust.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

from drape.benchmarks import BENCHMARK_KIND, task_scorer
from drape.config import INIT_STAGE, ConfigError, PipelineConfig, load_config
from drape.distributed import write_on_main_process
from drape.files import save_tensors

logger = logging.getLogger(__name__)


class Layout:
    """Paths of every stage's inputs and outputs, relative to the repository root."""

    def __init__(self, root: Path):
        self.root = root
        self.stream = root / "data" / "stream"
        self.features = root / "data" / "features"
        self.models = root / "models"
        self.train = root / "results" / "train"
        self.prototypes = root / "results" / "prototypes"
        self.eval = root / "results" / "eval"
        self.report = root / "results" / "report"


class StageContext:
    """The configuration, the paths and the lazily loaded frozen models of one stage run."""

    def __init__(self, params: Path | str = "params.yaml", root: Path | str = "."):
        self.params_path = Path(params)
        self.config: PipelineConfig = load_config(self.params_path)
        self.paths = Layout(Path(root))
        torch.manual_seed(self.config.seed)

    @cached_property
    def manifest(self) -> dict:
        path = self.paths.models / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run the models stage first (dvc repro models)")
        return json.loads(path.read_text())

    @property
    def encoder_info(self) -> dict:
        """The frozen encoders' fingerprint and dimensions.

        Patch tokens follow ``models.patch_grid``, except for the llava presets, which
        keep every ViT patch token (the manifest's ``num_patches``).
        """
        from drape.presets.llava_models import LLAVA_PRESETS

        if self.manifest.get("preset") in LLAVA_PRESETS:
            return dict(self.manifest["encoder"])
        return {**self.manifest["encoder"], "num_patches": self.config.models.patch_grid**2}

    @cached_property
    def llm_dim(self) -> int:
        config = json.loads((self.paths.models / "llm" / "config.json").read_text())
        return int(config["hidden_size"])

    @cached_property
    def llm(self):
        from drape.encoders import load_llm
        from drape.mllm import FrozenLLM

        return FrozenLLM(*load_llm(self.paths.models / "llm"), template=self.manifest.get("template", "chat_template"))

    @cached_property
    def clip(self):
        from drape.encoders import load_clip

        return load_clip(self.paths.models / "clip", patch_grid=self.config.models.patch_grid)

    @property
    def dims(self):
        from drape.methods.base import ModelDims

        info = self.encoder_info
        input_norm = self.manifest.get("projector", {}).get("input_norm", True)
        return ModelDims(
            encoder=info["name"], vision_dim=info["image_dim"], text_dim=info["text_dim"], llm_dim=self.llm_dim,
            projector_input_norm=input_norm,
        )

    def new_state(self):
        """A fresh instance of the configured method."""
        from drape.methods import create_method

        try:
            return create_method(self.config.method, self.config.method_config, self.dims)
        except ValueError as error:
            raise ConfigError(f"{self.params_path}: {self.config.method}: {error}") from None

    def load_state(self, stage: str, attach: bool = True):
        """Load the method's state after ``stage`` and connect it to the frozen LLM unless ``attach`` is false."""
        state = self.new_state().load(self.paths.train / stage)
        if attach:
            state.attach(self.llm)
        return state

    def features(self, task: str, split: str):
        from drape.features import load_features

        self.config.task(task)
        return load_features(self.paths.features / task / f"{split}.parquet", self.encoder_info)

    def load_prototypes(self, stage: str):
        from drape.routing import Prototypes

        folder = self.paths.prototypes / stage
        if not (folder / "prototypes.json").is_file():
            raise FileNotFoundError(f"{folder / 'prototypes.json'}: prototypes not found; run the stage that writes them (dvc repro)")
        tasks = json.loads((folder / "prototypes.json").read_text())["tasks"]
        tensors = load_file(folder / "prototypes.safetensors")
        return Prototypes(tasks, tensors["image"], tensors["text"])


def _replace_dir(staging: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _staging_dir(target: Path) -> Path:
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def stage_data(ctx: StageContext, task: str) -> None:
    """Build task ``task``'s train and test records and images from packaged data or a benchmark's files."""
    from drape.data.stream import build_task

    settings = ctx.config.task(task).data
    if settings.kind == BENCHMARK_KIND:
        from drape.benchmarks.build import build_benchmark_task

        summary = build_benchmark_task(settings, ctx.paths.stream / task, ctx.config.seed, key=f"stream.{task}.data")
        logger.info("task %s: %s", task, summary)
        return
    try:
        summary = build_task(settings.kind, ctx.paths.stream / task, settings.n_train, settings.n_test, ctx.config.seed)
    except ValueError as error:
        # The builders reject sizes their image source cannot supply.
        raise ConfigError(f"{ctx.params_path}: stream.{task}.data: {error}") from None
    logger.info("task %s: %s", task, summary)


def stage_models(ctx: StageContext) -> None:
    """Materialise the frozen encoders and LLM of the configured preset into ``models/``."""
    from drape.encoders import materialize_models

    # Relative weight paths in params.yaml are relative to the repository root.
    weights = {
        name: str(ctx.paths.root / path) if path is not None else None
        for name, path in ctx.config.models.weights.model_dump().items()
    }
    manifest = materialize_models(ctx.paths.models, ctx.config.models.preset, weights=weights)
    logger.info("models ready: %s", json.dumps(manifest.get("checks", {})))


def stage_features(ctx: StageContext, task: str) -> None:
    """Encode task ``task``'s images and instructions once with the frozen encoders."""
    from drape.features import extract_task_features

    ctx.config.task(task)
    counts = extract_task_features(ctx.clip, ctx.paths.stream / task, ctx.paths.features / task)
    logger.info("task %s features: %s", task, counts)


def _check_lora_targets(ctx: StageContext) -> None:
    """Raise ConfigError when the method's ``target_modules`` name no Linear layer of the LLM.

    peft would otherwise fail only when the first task's adapters are attached.
    """
    targets = getattr(ctx.config.method_config, "target_modules", None)
    if not targets:
        return
    names = [name for name, module in ctx.llm.model.named_modules() if isinstance(module, torch.nn.Linear)]
    # peft matches a target against a module's full name or its trailing dotted components.
    missing = [target for target in targets if not any(name == target or name.endswith(f".{target}") for name in names)]
    if missing:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ConfigError(
            f"{ctx.config.method}.target_modules: {', '.join(map(repr, missing))} not found among the LLM's "
            f"Linear layers; use some of: {', '.join(suffixes)}"
        )


def stage_init(ctx: StageContext) -> None:
    """Write the state before the first task: the initial projector, no prototypes.

    The projector is freshly initialised, or for the llava presets LLaVA-1.5's pretrained
    ``mm_projector.bin`` that the models manifest names.
    """
    from drape.presets.llava_models import import_pretrained_projector
    from drape.routing import Prototypes

    _check_lora_targets(ctx)
    state = ctx.new_state()
    if import_pretrained_projector(ctx.manifest, ctx.paths.models, state.projector):
        logger.info("init: projector imported from %s", ctx.manifest["projector"]["path"])
    state.save(ctx.paths.train / INIT_STAGE)
    empty = Prototypes.empty(ctx.encoder_info["image_dim"], ctx.encoder_info["text_dim"])
    _save_prototypes(empty, ctx.paths.prototypes / INIT_STAGE)


def stage_train(ctx: StageContext, task: str) -> None:
    """Train task ``task`` from the state after the previous task and save the new state."""
    from drape.train import train_task

    settings = ctx.config.task(task)
    state = ctx.load_state(settings.after)
    features = ctx.features(task, "train")
    if settings.train.batch_size > len(features):
        logger.warning(
            "stream.%s.train.batch_size is %d but the task has %d training samples; every step "
            "takes all %d, so an epoch is one step",
            task, settings.train.batch_size, len(features), len(features),
        )
    steps = None
    if getattr(state, "trains_on_seen_tasks", False):
        # The joint reference trains on every task seen so far, for the new task's step budget.
        from drape.features import concatenate
        from drape.train import planned_steps

        seen = ctx.config.task_names[: ctx.config.task_names.index(task) + 1]
        steps = planned_steps(len(features), settings.train)
        features = concatenate([ctx.features(name, "train") for name in seen])
    log = train_task(state, ctx.llm, task, features, settings.train, ctx.config.seed, steps=steps)

    extra_files = {"train_log.json": json.dumps(log.as_dict(), indent=2)}
    write_on_main_process(lambda: state.save(ctx.paths.train / task, extra_files=extra_files))


def _save_prototypes(prototypes, target: Path, statistics: dict | None = None) -> None:
    staging = _staging_dir(target)
    save_tensors(prototypes.state_dict(), staging / "prototypes.safetensors")
    summary = {"tasks": prototypes.tasks, "statistics": statistics or {}}
    (staging / "prototypes.json").write_text(json.dumps(summary, indent=2))
    _replace_dir(staging, target)


def stage_prototypes(ctx: StageContext, task: str) -> None:
    """Add task ``task``'s image and text prototypes to those of the earlier tasks.

    The means are cheap, so under data parallelism every process computes them over all
    samples, which gives a single process's values exactly, and the main process writes them.
    """
    settings = ctx.config.task(task)
    features = ctx.features(task, "train")
    earlier = ctx.load_prototypes(settings.after)
    previous = json.loads((ctx.paths.prototypes / settings.after / "prototypes.json").read_text())
    prototypes = earlier.add(task, features.pooled, features.text)
    statistics = {**previous.get("statistics", {}), task: prototypes.statistics(task, features.pooled, features.text)}
    write_on_main_process(lambda: _save_prototypes(prototypes, ctx.paths.prototypes / task, statistics))
    logger.info("prototypes of %s; statistics of %s: %s", prototypes.tasks, task, statistics[task])


def stage_evaluate(ctx: StageContext, task: str) -> None:
    """Evaluate the state after training ``task`` on every task's test split.

    Writes ``results/eval/<task>/``: ``scores.json`` with the matrix row (``scores``) and
    the timing, ``routing.json``, and ``predictions.jsonl`` with every sample's
    per-sample ``score`` (ROUGE-L for a caption). When caption tasks were evaluated,
    ``scores.json`` also maps each of them to every corpus metric times 100
    (``corpus_metrics``) and to the one its ``scores`` value is (``matrix_metric``).
    """
    from drape.evaluate import evaluate_task

    ctx.config.task(task)
    state = ctx.load_state(task)
    prototypes = ctx.load_prototypes(task)
    settings = ctx.config.evaluate

    scores, predictions, routing, seconds = {}, [], {}, 0.0
    corpus_metrics, matrix_metric = {}, {}
    names = ctx.config.task_names
    evaluated = names if settings.forward_transfer else names[: names.index(task) + 1]
    for name in evaluated:
        task_config = ctx.config.stream[name]
        result = evaluate_task(
            state,
            ctx.llm,
            prototypes,
            name,
            ctx.features(name, "test"),
            task_scorer(task_config.data),
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            caption_metric=settings.caption_metric,
        )
        scores[name] = result.score
        predictions.extend(result.predictions)
        routing[name] = {str(key): count for key, count in result.routed.items()}
        seconds += result.seconds
        if result.corpus_metrics is not None:
            corpus_metrics[name] = result.corpus_metrics
            matrix_metric[name] = result.matrix_metric

    timing = {"samples": len(predictions), "seconds": round(seconds, 3), "batch_size": settings.batch_size}
    summary = {"trained": task, "scores": scores, "timing": timing}
    if corpus_metrics:
        # Only caption tasks add these keys, so other tasks' scores.json is unchanged.
        summary.update(corpus_metrics=corpus_metrics, matrix_metric=matrix_metric)
    routing_summary = {"method": ctx.config.method, "routing": state.routing, "trained_tasks": state.tasks, "routed": routing}

    def write() -> None:
        staging = _staging_dir(ctx.paths.eval / task)
        (staging / "scores.json").write_text(json.dumps(summary, indent=2))
        (staging / "routing.json").write_text(json.dumps(routing_summary, indent=2))
        with (staging / "predictions.jsonl").open("w") as handle:
            for row in predictions:
                handle.write(json.dumps(row) + "\n")
        _replace_dir(staging, ctx.paths.eval / task)

    write_on_main_process(write)


def train_alone(ctx: StageContext, task: str) -> dict:
    """Train task ``task`` alone from the initial state and score its own test split.

    This is the learnability check of a task: the same settings as in the stream, but no
    earlier tasks, so the score is what the frozen LLM can reach on it within the budget.
    Nothing is written to the pipeline's outputs.
    """
    from drape.evaluate import evaluate_task
    from drape.routing import Prototypes
    from drape.train import train_task

    settings = ctx.config.task(task)
    state = ctx.load_state(INIT_STAGE)
    train = ctx.features(task, "train")
    log = train_task(state, ctx.llm, task, train, settings.train, ctx.config.seed)
    prototypes = Prototypes.empty(ctx.encoder_info["image_dim"], ctx.encoder_info["text_dim"]).add(task, train.pooled, train.text)
    result = evaluate_task(
        state,
        ctx.llm,
        prototypes,
        task,
        ctx.features(task, "test"),
        task_scorer(settings.data),
        batch_size=ctx.config.evaluate.batch_size,
        max_new_tokens=ctx.config.evaluate.max_new_tokens,
        caption_metric=ctx.config.evaluate.caption_metric,
    )
    return {"task": task, "score": result.score, "final_loss": log.losses[-1], "train_seconds": round(log.seconds, 1)}


def stage_report(ctx: StageContext, launcher: str = "dvc", log_to_mlflow: bool = True) -> dict:
    """Assemble the accuracy matrix and metrics, write the plots, and log the run to MLflow."""
    from drape.report import build_report

    return build_report(ctx, launcher=launcher, log_to_mlflow=log_to_mlflow)
