"""Evaluation after a stage: every task's test split, answered without the task label.

Each test sample is routed by the method: DRAPE and the prototype-routed baselines pick a
trained task by image and text prototypes, key-based prompt methods by their keys, and
methods without task-specific parts do not route. Only oracle variants read the true
task label. The frozen LLM then greedily decodes the answer and the task's scorer
compares it with the reference. Tasks not trained yet are evaluated too (forward
transfer).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from drape.distributed import processes
from drape.features import FeatureSet
from drape.methods.base import ContinualMethod
from drape.mllm import FrozenLLM
from drape.progress import progress
from drape.routing import Prototypes

logger = logging.getLogger(__name__)


@dataclass
class TaskEvaluation:
    task: str
    score: float
    """Mean scorer value in percent."""
    predictions: list[dict] = field(default_factory=list)
    routed: Counter = field(default_factory=Counter)
    """How many samples were routed to each trained task (key ``None``: not routed)."""
    seconds: float = 0.0
    """Wall time of routing and decoding the split."""


@torch.no_grad()
def evaluate_task(
    state: ContinualMethod,
    llm: FrozenLLM,
    prototypes: Prototypes,
    task: str,
    features: FeatureSet,
    scorer,
    batch_size: int,
    max_new_tokens: int,
) -> TaskEvaluation:
    """Score ``task``'s test split with the model after the current stage.

    Under data parallelism every process routes the whole split, decodes every
    ``num_processes``-th batch of it and gathers the other processes' predictions. The
    batches, and so their padding and predictions, are those of a single process.
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

    rows, total = [], 0.0
    for i, prediction in enumerate(predictions):
        value = float(scorer(prediction, features.record(i)))
        total += value
        rows.append(
            {
                "task": task,
                "id": features.ids[i],
                "instruction": features.instructions[i],
                "prediction": prediction,
                "answer": features.answers[i],
                "routed_task": routes[i],
                "score": value,
            }
        )
    score = 100.0 * total / max(1, len(features))
    logger.info("task %s: %.1f%% over %d samples in %.1f s", task, score, len(features), seconds)
    return TaskEvaluation(task=task, score=score, predictions=rows, routed=Counter(routes), seconds=seconds)
