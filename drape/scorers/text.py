"""Short-answer scorers: exact match, yes/no, option letter and mutual substring match."""

from __future__ import annotations

import re

from drape.data.records import Record

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Straight and typographic quotes that may wrap a whole answer.
_QUOTES = "\"'`\u2018\u2019\u201c\u201d"
_TRAILING_PUNCTUATION = ".,!?;:"


def normalize_answer(text: str) -> str:
    """Normalise an answer for comparison.

    Lowercases, strips whitespace, removes trailing punctuation and surrounding
    quotes, collapses runs of whitespace, drops the articles a/an/the and maps the
    number words zero..ten to digits. An answer made only of articles ("A") is
    kept, because removing them would leave it empty. Punctuation inside the text
    ("t-shirt") is kept.
    """
    text = text.lower().strip()
    # Quotes and punctuation can nest in either order ('"blue".' or '"blue."'), so strip until stable.
    previous = None
    while text != previous:
        previous = text
        text = text.rstrip(_TRAILING_PUNCTUATION).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()

    words = text.split()
    without_articles = [word for word in words if word not in _ARTICLES]
    if without_articles:
        words = without_articles
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words)


def exact_match(prediction: str, record: Record) -> float:
    """Return 1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(bool(predicted) and predicted == normalize_answer(record.answer))


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _first_yes_no(text: str) -> str | None:
    match = _YES_NO.search(text)
    return match.group(1).lower() if match else None


def yes_no(prediction: str, record: Record) -> float:
    """Compare the first standalone 'yes' or 'no' in the prediction with the answer.

    A prediction without either word scores 0. Raises ValueError when the record's
    answer is not yes or no, because the task was given the wrong scorer.
    """
    expected = normalize_answer(record.answer)
    if expected not in ("yes", "no"):
        raise ValueError(
            f"yes_no scorer: record {record.id!r} has answer {record.answer!r}, not yes/no; "
            "score this task with exact_match instead"
        )
    return float(_first_yes_no(prediction) == expected)


_CHOICE_LETTERS = "ABCDE"
# The whole prediction is one letter, optionally as "(b)", "b.", "b)" or "b:".
_ONLY_LETTER = re.compile(r"^\(?([a-e])\)?[.):]?$", re.IGNORECASE)
# A capital A-E not touching another letter: "B", "(B)", "B.", "B) sneaker", "is B".
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
# Lower-case letter after "answer", as in "the answer is b" or "answer: (c)".
_ANSWER_IS_LETTER = re.compile(r"\banswer\s*(?:is\s*|:\s*)?\(?([a-e])\b", re.IGNORECASE)
# An option line of the instruction, "A. sneaker".
_OPTION_LINE = re.compile(r"^\s*([A-E])[.)]\s+(.+?)\s*$", re.MULTILINE)


def extract_choice_letter(prediction: str, instruction: str = "") -> str | None:
    """Return the option letter A-E that a prediction chooses, or None.

    The rules are tried in this order:

    1. The whole prediction is one letter in any case: "b", "(B)", "B.".
    2. The first capital A-E not touching another letter: "The answer is B", "(C) dress".
    3. A lower-case letter after "answer": "answer: c".
    4. The normalised prediction equals an option's text in `instruction`:
       "sneaker" when the instruction lists "B. sneaker".

    NOTE: rule 2 reads a capital "A" used as an article ("A dress") as option A.
    """
    text = prediction.strip()
    match = _ONLY_LETTER.match(text)
    if match:
        return match.group(1).upper()
    match = _STANDALONE_CAPITAL.search(text)
    if match:
        return match.group(1)
    match = _ANSWER_IS_LETTER.search(text)
    if match:
        return match.group(1).upper()
    predicted_text = normalize_answer(text)
    for letter, option in _OPTION_LINE.findall(instruction):
        if predicted_text and predicted_text == normalize_answer(option):
            return letter
    return None


def choice_letter(prediction: str, record: Record) -> float:
    """Compare the option letter the prediction chooses with the answer letter.

    Raises ValueError when the record's answer is not a single letter A-E.
    """
    expected = record.answer.strip().strip("().").upper()
    if len(expected) != 1 or expected not in _CHOICE_LETTERS:
        raise ValueError(
            f"choice_letter scorer: record {record.id!r} has answer {record.answer!r}, not a letter A-E; "
            f"score this task with {'yes_no' if normalize_answer(record.answer) in ('yes', 'no') else 'exact_match'} instead"
        )
    return float(extract_choice_letter(prediction, record.instruction) == expected)


def substring_match(prediction: str, record: Record) -> float:
    """Return 1.0 when either normalised text contains the other, else 0.0.

    This is the rule of UCIT's ImageNet-R evaluation: a prediction such as
    "a goldfish in a bowl" is right for the class "goldfish", and so is "fish"
    for "goldfish". The test is on characters, so "cat" also matches "bobcat".
    An empty prediction scores 0.
    """
    predicted = normalize_answer(prediction)
    expected = normalize_answer(record.answer)
    if not predicted or not expected:
        return 0.0
    return float(expected in predicted or predicted in expected)
