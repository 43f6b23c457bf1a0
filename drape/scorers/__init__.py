"""Score a model's free-text predictions against records' reference answers.

A per-sample scorer takes (prediction, record) and returns a float in [0, 1];
the pipeline averages it over a task's test split. Caption tasks also have
corpus-level metrics (CIDEr needs n-gram frequencies over the whole test set),
which ``score_corpus`` computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

from drape.data.records import Record
from drape.scorers.caption import CAPTION_METRICS, caption_metrics, caption_rouge_l, tokenize_caption
from drape.scorers.grounding import box_iou, grounding_iou, parse_box
from drape.scorers.text import (
    choice_letter,
    exact_match,
    extract_choice_letter,
    normalize_answer,
    substring_match,
    yes_no,
)
from drape.scorers.vqa import normalize_vqa_answer, vqa_accuracy

Scorer = Callable[[str, Record], float]
CorpusScorer = Callable[[Sequence[str], Sequence[Record]], dict[str, float]]

SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "yes_no": yes_no,
    "choice_letter": choice_letter,
    "vqa_accuracy": vqa_accuracy,
    "substring_match": substring_match,
    "grounding_iou": grounding_iou,
    # Per sample, a caption scores its ROUGE-L; score_corpus gives every caption metric.
    "caption": caption_rouge_l,
}

# Scorers whose test-set result is more than the mean of the per-sample scores.
CORPUS_SCORERS: dict[str, CorpusScorer] = {
    "caption": caption_metrics,
}

__all__ = [
    "CAPTION_METRICS",
    "CORPUS_SCORERS",
    "SCORERS",
    "Scorer",
    "UnknownScorerError",
    "box_iou",
    "caption_metrics",
    "caption_rouge_l",
    "choice_letter",
    "exact_match",
    "extract_choice_letter",
    "get_scorer",
    "grounding_iou",
    "normalize_answer",
    "normalize_vqa_answer",
    "parse_box",
    "score_corpus",
    "substring_match",
    "tokenize_caption",
    "vqa_accuracy",
    "yes_no",
]


class UnknownScorerError(ValueError):
    """A scorer name that is not registered; the message lists the known names."""


def get_scorer(name: str) -> Scorer:
    """Return the scorer registered as `name`, or raise UnknownScorerError listing the known names."""
    try:
        return SCORERS[name]
    except KeyError:
        raise UnknownScorerError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}") from None


def score_corpus(name: str, predictions: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """Score a whole test split with scorer `name` and return its metrics.

    A caption scorer returns every metric of CAPTION_METRICS; any other scorer
    returns {name: mean per-sample score}. Values are fractions (CIDEr can
    exceed 1). Raises UnknownScorerError for an unknown name, and ValueError for
    mismatched or empty inputs or a record the scorer cannot score.
    """
    scorer = get_scorer(name)
    if name in CORPUS_SCORERS:
        return CORPUS_SCORERS[name](predictions, records)
    if len(predictions) != len(records):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(records)} records")
    if not records:
        raise ValueError(f"{name}: no predictions to score")
    total = sum(scorer(prediction, record) for prediction, record in zip(predictions, records))
    return {name: total / len(records)}
