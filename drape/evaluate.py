"""Evaluation after a stage: every task's test split, with prototype routing.

Each test sample is routed to a trained task by its prototypes, or by its true task
label in the oracle ablation only. That task's generator makes the prompts, the frozen
LLM greedily decodes the answer, and the task's scorer compares it with the reference. Tasks not trained yet are evaluated too (forward transfer); their samples are
routed among the trained tasks.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from drape.features import FeatureSet
from drape.methods.drape.state import DrapeState
from drape.mllm import FrozenLLM
from drape.progress import progress
from drape.routing import Prototypes
from drape.train import drape_content

logger = logging.getLogger(__name__)


@dataclass
class TaskEvaluation:
    task: str
    score: float
    """Mean scorer value in percent."""
    predictions: list[dict] = field(default_factory=list)
    routed: Counter = field(default_factory=Counter)
    """How many samples were routed to each trained task."""


@torch.no_grad()
def evaluate_task(
    state: DrapeState,
    llm: FrozenLLM,
    prototypes: Prototypes,
    task: str,
    features: FeatureSet,
    scorer,
    alpha: float,
    batch_size: int,
    max_new_tokens: int,
    oracle_routing: bool = False,
) -> TaskEvaluation:
    """Score ``task``'s test split with the model after the current stage."""
    state.eval()
    if oracle_routing:
        if task not in state.tasks:
            # The oracle has no generator for a task it has not learned; it falls back to routing.
            routes = prototypes.route(features.pooled, features.text, alpha)
        else:
            routes = [task] * len(features)
    else:
        routes = prototypes.route(features.pooled, features.text, alpha)

    predictions: list[str | None] = [None] * len(features)
    for start in progress(range(0, len(features), batch_size), desc=f"evaluate {task}"):
        indices = list(range(start, min(start + batch_size, len(features))))
        for routed in sorted({routes[i] for i in indices}):
            group = [i for i in indices if routes[i] == routed]
            batch = features.select(group)
            content = drape_content(state, llm, routed, batch.patches.to(llm.device), batch.instructions)
            for i, text in zip(group, llm.generate(content, batch.instructions, max_new_tokens)):
                predictions[i] = text

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
    logger.info("task %s: %.1f%% over %d samples", task, score, len(features))
    return TaskEvaluation(task=task, score=score, predictions=rows, routed=Counter(routes))
