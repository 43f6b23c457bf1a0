"""Hand-computed cases for answer normalisation and every scorer."""

from __future__ import annotations

import pytest

from drape.data.records import Record
from drape.scorers import (
    SCORERS,
    choice_letter,
    exact_match,
    extract_choice_letter,
    get_scorer,
    normalize_answer,
    vqa_accuracy,
    yes_no,
)

CHOICE_INSTRUCTION = "Which item is shown?\nA. sneaker\nB. bag\nC. dress\nD. coat\nAnswer with the option's letter."


def make_record(answer: str, answers: tuple[str, ...] | None = None, instruction: str = "Question?") -> Record:
    return Record(id="r", image="r.png", instruction=instruction, answer=answer, answers=answers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Blue", "blue"),
        ("  blue.  ", "blue"),
        ("Yes.", "yes"),
        ("no!", "no"),
        ('"blue"', "blue"),
        ("'blue'.", "blue"),
        ('"blue."', "blue"),
        ("\u201cred\u201d", "red"),
        ("seven", "7"),
        ("Ten", "10"),
        ("zero", "0"),
        ("eleven", "eleven"),
        ("The sneaker", "sneaker"),
        ("a   red\t circle", "red circle"),
        ("an apple", "apple"),
        ("two dogs", "2 dogs"),
        ("t-shirt", "t-shirt"),
        ("3.5", "3.5"),
        ("A", "a"),
        ("the", "the"),
        ("", ""),
        ("  ...  ", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("blue", "blue", 1.0),
        ("Blue.", "blue", 1.0),
        ("seven", "7", 1.0),
        ("7", "seven", 1.0),
        ("The boot", "boot", 1.0),
        ('"bag"', "bag", 1.0),
        ("blue shape", "blue", 0.0),
        ("green", "blue", 0.0),
        ("", "blue", 0.0),
        ("...", "blue", 0.0),
        ("t-shirt", "tshirt", 0.0),
        ("17", "7", 0.0),
    ],
)
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, make_record(answer)) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes.", "yes", 1.0),
        ("yes", "Yes", 1.0),
        ("NO", "no", 1.0),
        ("No, it is odd.", "no", 1.0),
        ("I think yes", "yes", 1.0),
        ("Yes, no doubt", "yes", 1.0),
        ("No. Yes.", "yes", 0.0),
        ("nope", "no", 0.0),
        ("It is not even", "no", 0.0),
        ("eyes", "yes", 0.0),
        ("", "yes", 0.0),
        ("maybe", "no", 0.0),
    ],
)
def test_yes_no(prediction, answer, expected):
    assert yes_no(prediction, make_record(answer)) == expected


def test_yes_no_rejects_non_binary_answer():
    with pytest.raises(ValueError, match="not yes/no; score this task with exact_match"):
        yes_no("yes", make_record("blue"))


@pytest.mark.parametrize(
    ("prediction", "expected_letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("(b)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B. bag", "B"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("the answer is b", "B"),
        ("Answer: (c)", "C"),
        ("Option D is correct", "D"),
        ("E", "E"),
        ("bag", "B"),
        ("Coat.", "D"),
        ("Because", None),
        ("I am unsure", None),
        ("F", None),
        ("", None),
        ("a bag", "B"),
    ],
)
def test_extract_choice_letter(prediction, expected_letter):
    assert extract_choice_letter(prediction, CHOICE_INSTRUCTION) == expected_letter


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("(B)", "B", 1.0),
        ("B", "B", 1.0),
        ("The answer is B", "B", 1.0),
        ("b.", "B", 1.0),
        ("bag", "B", 1.0),
        ("A", "B", 0.0),
        ("sneaker", "B", 0.0),
        ("The answer is B", "A", 0.0),
        ("nothing", "B", 0.0),
    ],
)
def test_choice_letter(prediction, answer, expected):
    assert choice_letter(prediction, make_record(answer, instruction=CHOICE_INSTRUCTION)) == expected


def test_choice_letter_rejects_non_letter_answer():
    with pytest.raises(ValueError, match="not a letter A-E"):
        choice_letter("B", make_record("bag"))


ANNOTATOR_ANSWERS = ("2", "2", "two", "3", "3", "three", "3", "4", "2", "several")


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("2", 1.0),  # "2", "2", "two", "2": 4 matches, capped at 1
        ("three", 1.0),  # "3", "3", "three", "3": 4 matches
        ("4", 1 / 3),
        ("Several.", 1 / 3),
        ("5", 0.0),
        ("", 0.0),
    ],
)
def test_vqa_accuracy(prediction, expected):
    assert vqa_accuracy(prediction, make_record("2", ANNOTATOR_ANSWERS)) == pytest.approx(expected)


def test_vqa_accuracy_two_matches():
    record = make_record("red", ("red", "Red", "maroon"))
    assert vqa_accuracy("red", record) == pytest.approx(2 / 3)
    assert vqa_accuracy("maroon", record) == pytest.approx(1 / 3)


def test_vqa_accuracy_without_answers_uses_exact_match():
    record = make_record("seven")
    assert vqa_accuracy("7", record) == 1.0
    assert vqa_accuracy("8", record) == 0.0


def test_scorers_registry_lists_every_scorer():
    assert set(SCORERS) == {"exact_match", "yes_no", "choice_letter", "vqa_accuracy"}
    for name, scorer in SCORERS.items():
        assert get_scorer(name) is scorer


def test_get_scorer_unknown_name_lists_known():
    with pytest.raises(ValueError, match="Unknown scorer 'bleu'; known scorers: choice_letter, exact_match, vqa_accuracy, yes_no"):
        get_scorer("bleu")


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_are_in_unit_interval(name):
    scorer = SCORERS[name]
    answer = {"yes_no": "yes", "choice_letter": "B"}.get(name, "blue")
    record = make_record(answer, ("blue", "yes", "B"), CHOICE_INSTRUCTION)
    for prediction in ("", "blue", "yes", "B", "The answer is B, yes, blue", "\u00e9\u00e8"):
        assert 0.0 <= scorer(prediction, record) <= 1.0
