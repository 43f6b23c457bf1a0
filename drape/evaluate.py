"""Evaluation after a stage: every task's test split, answered without the task label.

Each test sample is routed by the method: DRAPE and the prototype-routed baselines pick a
trained task by image and text prototypes, key-based prompt methods by their keys, and
methods without task-specific parts do not route. Only oracle variants read the true
task label. The frozen LLM then greedily decodes the answer and the task's scorer
compares it with the reference. Tasks not trained yet are evaluated too (forward
transfer).

A task's accuracy-matrix value is the mean per-sample score in percent. A caption task
instead gets one corpus metric of its whole test split (``evaluate.caption_metric``,
CIDEr by default) times 100, because CIDEr and BLEU are defined over a test set, not
per caption.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from drape.distributed import processes
from drape.data.records import Record
from drape.features import FeatureSet
from drape.methods.base import ContinualMethod
from drape.mllm import FrozenLLM
from drape.progress import progress
from drape.routing import Prototypes
from drape.scorers import CORPUS_SCORERS, get_scorer

logger = logging.getLogger(__name__)


@dataclass
class SplitScore:
    """The scores of one test split's predictions."""

    score: float
    """The accuracy-matrix value: ``matrix_metric`` times 100 for a scorer with corpus
    metrics, else the mean per-sample score in percent."""
    values: list[float]
    """The per-sample scorer value of every prediction, in [0, 1] (ROUGE-L for captions)."""
    corpus_metrics: dict[str, float] | None = None
    """Every corpus metric times 100 (CIDEr 0.57 gives 57.0); None for per-sample scorers."""
    matrix_metric: str | None = None
    """The corpus metric that ``score`` is; None for per-sample scorers."""


def score_split(scorer: str, predictions: Sequence[str], records: Sequence[Record], caption_metric: str) -> SplitScore:
    """Score a test split's predictions with the registered scorer ``scorer``.

    Every prediction gets its per-sample score. For a scorer of ``CORPUS_SCORERS``
    (``caption``) the corpus metrics are computed over the whole split as well, and
    ``caption_metric`` picks the one that becomes the matrix value. Raises ValueError
    when ``caption_metric`` is not one of the scorer's corpus metrics, and the scorers'
    own errors for a record they cannot score.
    """
    per_sample = get_scorer(scorer)
    values, total = [], 0.0
    for prediction, record in zip(predictions, records, strict=True):
        value = float(per_sample(prediction, record))
        total += value
        values.append(value)
    if scorer not in CORPUS_SCORERS:
        return SplitScore(score=100.0 * total / max(1, len(values)), values=values)

    corpus = {name: 100.0 * value for name, value in CORPUS_SCORERS[scorer](predictions, records).items()}
    if caption_metric not in corpus:
        raise ValueError(
            f"evaluate.caption_metric: invalid value {caption_metric!r} for scorer {scorer!r}. "
            f"Set one of its corpus metrics: {', '.join(corpus)}"
        )
    return SplitScore(score=corpus[caption_metric], values=values, corpus_metrics=corpus, matrix_metric=caption_metric)


@dataclass
class TaskEvaluation:
    task: str
    score: float
    """The accuracy-matrix value (see ``SplitScore.score``)."""
    predictions: list[dict] = field(default_factory=list)
    routed: Counter = field(default_factory=Counter)
    """How many samples were routed to each trained task (key ``None``: not routed)."""
    seconds: float = 0.0
    """Wall time of routing and decoding the split."""
    corpus_metrics: dict[str, float] | None = None
    """Every corpus metric times 100 of a caption task; None for other tasks."""
    matrix_metric: str | None = None
    """The corpus metric that ``score`` is; None for other tasks."""


@torch.no_grad()
def evaluate_task(
    state: ContinualMethod,
    llm: FrozenLLM,
    prototypes: Prototypes,
    task: str,
    features: FeatureSet,
    scorer: str,
    batch_size: int,
    max_new_tokens: int,
    caption_metric: str,
) -> TaskEvaluation:
    """Score ``task``'s test split with the model after the current stage.

    ``scorer`` is the task's registered scorer name, and ``caption_metric`` the corpus
    metric that becomes a caption task's score. Under data parallelism every process
    routes the whole split, decodes every ``num_processes``-th batch of it and gathers
    the other processes' predictions. The batches, and so their padding and
    predictions, are those of a single process, and every process then scores the
    whole split the same way.
    """
    parallel = processes()
    state.to(parallel.device)
    llm.to(parallel.device)
    state.eval()
    started = time.perf_counter()
    routes = state.route(features.pooled, features.text, prototypes, task)
    # The same bf16 autocast as training when accelerate's mixed precision is bf16.
    bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"

    predictions: list[str | None] = [None] * len(features)
    starts = range(0, len(features), batch_size)[parallel.process_index :: parallel.num_processes]
    for start in progress(starts, desc=f"evaluate {task}"):
        indices = list(range(start, min(start + batch_size, len(features))))
        # Samples routed to different tasks run in separate groups (different generators or adapters).
        for routed in sorted({routes[i] for i in indices}, key=str):
            group = [i for i in indices if routes[i] == routed]
            batch = features.select(group)
            with torch.autocast(parallel.device.type, dtype=torch.bfloat16, enabled=bf16):
                content = state.content(llm, batch, routed)
                texts = llm.generate(content, batch.instructions, max_new_tokens)
            for i, text in zip(group, texts):
                predictions[i] = text
    if parallel.num_processes > 1:
        decoded = [(i, text) for i, text in enumerate(predictions) if text is not None]
        for i, text in gather_object(decoded):
            predictions[i] = text
    seconds = time.perf_counter() - started

    records = [features.record(i) for i in range(len(features))]
    scored = score_split(scorer, predictions, records, caption_metric)
    rows = []
    for i, (prediction, value) in enumerate(zip(predictions, scored.values)):
        row = {
            "task": task,
            "id": features.ids[i],
            "instruction": features.instructions[i],
            "prediction": prediction,
            "answer": features.answers[i],
        }
        # The annotators' answers or reference captions, so `drape score` on this file
        # scores VQA accuracy and caption metrics as this stage does.
        if records[i].answers:
            row["answers"] = list(records[i].answers)
        row.update(routed_task=routes[i], score=value)
        rows.append(row)
    if scored.matrix_metric is None:
        logger.info("task %s: %.1f%% over %d samples in %.1f s", task, scored.score, len(features), seconds)
    else:
        logger.info(
            "task %s: %s x 100 = %.1f over %d samples in %.1f s (corpus metrics x 100: %s)",
            task, scored.matrix_metric, scored.score, len(features), seconds,
            ", ".join(f"{name} {value:.1f}" for name, value in scored.corpus_metrics.items()),
        )
    return TaskEvaluation(
        task=task,
        score=scored.score,
        predictions=rows,
        routed=Counter(routes),
        seconds=seconds,
        corpus_metrics=scored.corpus_metrics,
        matrix_metric=scored.matrix_metric,
    )
