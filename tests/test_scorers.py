"""Hand-computed cases for answer normalisation and every scorer."""

from __future__ import annotations

import pytest

from drape.data.records import Record
from drape.evaluate import score_split
from drape.scorers import (
    CAPTION_METRICS,
    SCORERS,
    UnknownScorerError,
    box_iou,
    caption_metrics,
    caption_rouge_l,
    choice_letter,
    exact_match,
    extract_choice_letter,
    get_scorer,
    grounding_iou,
    normalize_answer,
    normalize_vqa_answer,
    parse_box,
    score_corpus,
    substring_match,
    tokenize_caption,
    vqa_accuracy,
    yes_no,
)

CHOICE_INSTRUCTION = "Which item is shown?\nA. sneaker\nB. bag\nC. dress\nD. coat\nAnswer with the option's letter."


def make_record(
    answer: str,
    answers: tuple[str, ...] | None = None,
    instruction: str = "Question?",
    box: tuple[float, float, float, float] | None = None,
) -> Record:
    return Record(id="r", image="r.png", instruction=instruction, answer=answer, answers=answers, box=box)


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
        ("B) cat", "B"),
        ("(D) coat.", "D"),
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
    with pytest.raises(ValueError, match="not a letter A-E; score this task with exact_match instead"):
        choice_letter("B", make_record("bag"))


def test_choice_letter_hints_yes_no_scorer():
    with pytest.raises(ValueError, match="score this task with yes_no instead"):
        choice_letter("yes", make_record("Yes"))


def test_scorers_registry_lists_every_scorer():
    assert set(SCORERS) == {
        "exact_match",
        "yes_no",
        "choice_letter",
        "vqa_accuracy",
        "substring_match",
        "grounding_iou",
        "caption",
    }
    for name, scorer in SCORERS.items():
        assert get_scorer(name) is scorer


def test_get_scorer_unknown_name_lists_known():
    known = "caption, choice_letter, exact_match, grounding_iou, substring_match, vqa_accuracy, yes_no"
    with pytest.raises(UnknownScorerError, match=f"unknown scorer 'bleu'; known scorers: {known}"):
        get_scorer("bleu")


def test_unknown_scorer_error_is_value_error():
    with pytest.raises(ValueError):
        get_scorer("bleu")


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_are_in_unit_interval(name):
    scorer = SCORERS[name]
    answer = {"yes_no": "yes", "choice_letter": "B", "grounding_iou": "[0.1, 0.1, 0.5, 0.5]"}.get(name, "blue")
    record = make_record(answer, ("blue", "yes", "B"), CHOICE_INSTRUCTION)
    predictions = ("", "blue", "yes", "B", "The answer is B, yes, blue", "\u00e9\u00e8", "[0.1, 0.1, 0.5, 0.5]")
    for prediction in predictions:
        assert 0.0 <= scorer(prediction, record) <= 1.0



# ---------------------------------------------------------------------------
# VQA accuracy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("two.", "2"),
        ("none", "0"),
        ("Ten", "10"),
        ("eleven", "eleven"),
        ("The dog", "dog"),
        ("a red car", "red car"),
        ("dont", "don't"),
        ("whats", "what's"),
        ("Whats that", "what's that"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),
        ("t-shirt", "t shirt"),
        ("left - right", "left right"),
        ("(b) c", "b c"),
        ("e.g. this", "eg this"),
        ("unanswerable", "unanswerable"),
        ("Unanswerable.", "unanswerable"),
        ("line\nbreak", "line break"),
        ("  spaced   out ", "spaced out"),
        ("it's", "it's"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_normalize_vqa_answer_digit_comma_deletes_all_punctuation():
    # A comma between digits anywhere makes every listed mark vanish, even in a word.
    assert normalize_vqa_answer("1,000 t-shirts") == "1000 tshirts"


def annotators(matching: int, answer: str = "2", other: str = "3") -> tuple[str, ...]:
    return (answer,) * matching + (other,) * (10 - matching)


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # Leaving out a matching annotator leaves k-1 matches, another one leaves k:
        # (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*1/3) / 10
        (2, 0.6),  # (2*1/3 + 8*2/3) / 10
        (3, 0.9),  # (3*2/3 + 7*1) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matching, expected):
    record = make_record("2", annotators(matching))
    assert vqa_accuracy("2", record) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("two", annotators(2), 0.6),
        ("2", annotators(3, answer="two"), 0.9),
        ("Two.", annotators(1), 0.3),
        ("unanswerable", annotators(4, answer="unanswerable"), 1.0),
        ("Unanswerable", annotators(2, answer="unanswerable"), 0.6),
        ("1,000", annotators(3, answer="1000"), 0.9),
        ("the dog", annotators(1, answer="dog"), 0.3),
        ("dont know", annotators(2, answer="don't know"), 0.6),
        ("3", annotators(2), 1.0),  # the eight other annotators answered "3"
        ("4", annotators(2), 0.0),
        ("", annotators(10), 0.0),
        ("...", annotators(10), 0.0),
    ],
)
def test_vqa_accuracy_normalises_both_sides(prediction, answers, expected):
    assert vqa_accuracy(prediction, make_record(answers[0], answers)) == pytest.approx(expected)


def test_vqa_accuracy_three_answers():
    record = make_record("red", ("red", "Red", "maroon"))
    # "red": leaving out either red leaves 1 match (1/3), leaving out maroon leaves 2 (2/3).
    assert vqa_accuracy("red", record) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # "maroon": only leaving out a red keeps the one match.
    assert vqa_accuracy("maroon", record) == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)


def test_vqa_accuracy_without_answers_compares_answer():
    record = make_record("seven")
    assert vqa_accuracy("7", record) == 1.0
    assert vqa_accuracy("8", record) == 0.0


def test_vqa_accuracy_single_answer_compares_it():
    record = make_record("cat", ("Cats",))
    assert vqa_accuracy("cats", record) == 1.0
    assert vqa_accuracy("cat", record) == 0.0


# ---------------------------------------------------------------------------
# Mutual substring match


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("goldfish", "goldfish", 1.0),
        ("A goldfish in a bowl.", "goldfish", 1.0),
        ("fish", "goldfish", 1.0),
        ("The Goldfish", "goldfish", 1.0),
        ("shark", "goldfish", 0.0),
        ("", "goldfish", 0.0),
        ("...", "goldfish", 0.0),
        ("cat", "bobcat", 1.0),
        ("two dogs", "2 dogs", 1.0),
    ],
)
def test_substring_match(prediction, answer, expected):
    assert substring_match(prediction, make_record(answer)) == expected


# ---------------------------------------------------------------------------
# Grounding


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.12, 0.30, 0.58, 0.91]", (0.12, 0.30, 0.58, 0.91)),
        ("The box is [0.1,0.2,0.3,0.4].", (0.1, 0.2, 0.3, 0.4)),
        ("(0, 0, 1, 1)", (0.0, 0.0, 1.0, 1.0)),
        ("[.5, .5, 1., 1.]", (0.5, 0.5, 1.0, 1.0)),
        ("[0.1, 0.2, 0.3]", None),
        ("[0.5, 0.2, 0.3, 0.4]", None),  # x2 < x1
        ("[0.1, 0.4, 0.3, 0.4]", None),  # zero height
        ("no box here", None),
        ("", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


def test_box_iou_hand_computed():
    assert box_iou((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)) == 1.0
    assert box_iou((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)) == 0.0
    # Intersection 0.25 x 0.5 = 0.125, union 0.25 + 0.25 - 0.125 = 0.375.
    assert box_iou((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("[0.00, 0.00, 1.00, 1.00]", 1.0),
        ("[0.00, 0.00, 0.50, 1.00]", 1.0),  # IoU exactly 0.5 counts as a hit
        ("[0.00, 0.00, 0.49, 1.00]", 0.0),  # IoU 0.49
        ("[0.00, 0.00, 0.75, 0.75]", 1.0),  # IoU 0.5625
        ("[0.50, 0.50, 1.50, 1.50]", 0.0),  # IoU 0.25 / 1.75
        ("The object is at [0.0, 0.0, 0.9, 0.9].", 1.0),
        ("[0.2, 0.2, 0.1, 0.9]", 0.0),  # malformed: x2 < x1
        ("somewhere on the left", 0.0),
        ("", 0.0),
    ],
)
def test_grounding_iou_against_answer_box(prediction, expected):
    record = make_record("[0.00, 0.00, 1.00, 1.00]")
    assert grounding_iou(prediction, record) == expected


def test_grounding_iou_prefers_record_box():
    record = make_record("the left cat", box=(0.5, 0.5, 1.0, 1.0))
    assert grounding_iou("[0.5, 0.5, 1.0, 1.0]", record) == 1.0
    assert grounding_iou("[0.0, 0.0, 0.5, 0.5]", record) == 0.0


@pytest.mark.parametrize(
    ("answer", "box"),
    [("the left cat", None), ("[0.1, 0.2, 0.3]", None), ("[0, 0, 1, 1]", (0.5, 0.5, 0.5, 0.9))],
)
def test_grounding_iou_rejects_missing_reference_box(answer, box):
    with pytest.raises(ValueError, match="no valid reference box"):
        grounding_iou("[0, 0, 1, 1]", make_record(answer, box=box))


# ---------------------------------------------------------------------------
# Captions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A dog runs.", ["a", "dog", "runs"]),
        ("The dog's ball, isn't it?", ["the", "dog", "'s", "ball", "is", "n't", "it"]),
        ("A t-shirt costs 1,000.50 dollars!", ["a", "t-shirt", "costs", "1,000.50", "dollars"]),
        ("  ...  ", []),
    ],
)
def test_tokenize_caption(text, expected):
    assert tokenize_caption(text) == expected


def caption_record(index: int, *references: str) -> Record:
    return Record(id=f"c{index}", image=None, instruction="Describe the image.", answer=references[0], answers=references)


def test_caption_metrics_one_caption_hand_computed():
    metrics = caption_metrics(["The cat sat on the mat."], [caption_record(0, "the cat is on the mat")])

    assert list(metrics) == list(CAPTION_METRICS)
    # Clipped n-gram precisions: 5/6 unigrams, 3/5 bigrams, 1/4 trigrams, 0/3 4-grams;
    # equal lengths, so no brevity penalty.
    assert metrics["BLEU-1"] == pytest.approx(5 / 6)
    assert metrics["BLEU-2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5)
    assert metrics["BLEU-3"] == pytest.approx(0.5)
    assert metrics["BLEU-4"] < 1e-3
    # Longest common subsequence "the cat on the mat": P = R = 5/6, so F = 5/6.
    assert metrics["ROUGE-L"] == pytest.approx(5 / 6)
    # A single image gives every n-gram the document frequency of the whole corpus, so idf 0.
    assert metrics["CIDEr"] == 0.0


def test_caption_metrics_cider_two_images_hand_computed():
    metrics = caption_metrics(["a b", "c d"], [caption_record(0, "a b"), caption_record(1, "c d")])
    # Identical captions: cosine 1 for the unigrams and bigrams, no 3- or 4-grams,
    # so each image scores 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert metrics["CIDEr"] == pytest.approx(5.0)
    assert metrics["ROUGE-L"] == pytest.approx(1.0)
    assert metrics["BLEU-1"] == pytest.approx(1.0)
    # METEOR: 2 of 2 words matched in one chunk, so 1 - 0.5 * (1/2)**3.
    assert metrics["METEOR"] == pytest.approx(0.9375)


def test_caption_metrics_meteor_uses_wordnet_synonyms():
    metrics = caption_metrics(["a hound runs"], [caption_record(0, "a dog runs")])
    # "hound" matches "dog" only through WordNet; 3 of 3 words in one chunk:
    # 1 - 0.5 * (1/3)**3.
    assert metrics["METEOR"] == pytest.approx(1 - 0.5 / 27)


def test_caption_metrics_best_reference_and_empty_prediction():
    records = [caption_record(0, "a red bus", "the cat sat"), caption_record(1, "a dog runs")]
    metrics = caption_metrics(["the cat sat", ""], records)
    # Per caption: ROUGE-L 1 (second reference) and 0 (empty prediction).
    assert metrics["ROUGE-L"] == pytest.approx(0.5)
    assert metrics["METEOR"] == pytest.approx((1 - 0.5 / 27) / 2)


def test_caption_metrics_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 records"):
        caption_metrics(["a", "b"], [caption_record(0, "a")])
    with pytest.raises(ValueError, match="no captions to score"):
        caption_metrics([], [])
    with pytest.raises(ValueError, match="no reference caption contains a word"):
        caption_metrics(["a dog"], [caption_record(0, "...")])


def test_caption_rouge_l_hand_computed():
    record = caption_record(0, "the cat sat on the mat")
    # LCS 3: P = 1, R = 1/2; F with beta 1.2 = (1 + 1.44) * 0.5 / (0.5 + 1.44).
    assert caption_rouge_l("The cat sat.", record) == pytest.approx(2.44 * 0.5 / 1.94)
    assert caption_rouge_l("", record) == 0.0
    assert caption_rouge_l("the cat sat on the mat", record) == pytest.approx(1.0)


def test_score_corpus_caption_returns_every_metric():
    metrics = score_corpus("caption", ["a b"], [caption_record(0, "a b")])
    assert list(metrics) == list(CAPTION_METRICS)


def test_score_corpus_per_sample_scorer_is_mean():
    records = [make_record("blue"), make_record("red"), make_record("green")]
    assert score_corpus("exact_match", ["Blue.", "red", "yellow"], records) == {"exact_match": pytest.approx(2 / 3)}


def test_score_corpus_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 records"):
        score_corpus("exact_match", ["a", "b"], [make_record("a")])
    with pytest.raises(ValueError, match="no predictions to score"):
        score_corpus("exact_match", [], [])
    with pytest.raises(UnknownScorerError):
        score_corpus("bleu", ["a"], [make_record("a")])


def test_score_split_matrix_value_follows_caption_metric():
    predictions = ["a brown dog runs on the grass", "a man rides a red bike", "two birds sit on a wire"]
    records = [
        caption_record(0, "a dog runs on the grass", "a brown dog is running"),
        caption_record(1, "a man rides a bike down the street", "a cyclist on a red bike"),
        caption_record(2, "two small birds on a power line", "birds sit on a wire"),
    ]
    expected = {name: 100.0 * value for name, value in caption_metrics(predictions, records).items()}

    matrix_values = {}
    for metric in CAPTION_METRICS:
        scored = score_split("caption", predictions, records, metric)
        assert scored.matrix_metric == metric
        assert scored.score == pytest.approx(expected[metric])
        assert scored.corpus_metrics == pytest.approx(expected)
        matrix_values[metric] = scored.score
    # Each setting puts a different value in the matrix, CIDEr on its x 100 scale above 100.
    assert len({round(value, 6) for value in matrix_values.values()}) == len(CAPTION_METRICS)
    assert matrix_values["CIDEr"] > 100.0


def test_score_split_caption_samples_score_rouge_l():
    predictions = ["the cat sat", "a dog"]
    records = [caption_record(0, "the cat sat on the mat"), caption_record(1, "a dog runs")]

    scored = score_split("caption", predictions, records, "CIDEr")

    assert scored.values == pytest.approx([caption_rouge_l(p, r) for p, r in zip(predictions, records)])


def test_score_split_per_sample_scorer_is_mean():
    records = [make_record("blue"), make_record("red"), make_record("green")]

    scored = score_split("exact_match", ["Blue.", "red", "yellow"], records, "CIDEr")

    assert scored.score == pytest.approx(200 / 3)
    assert scored.values == [1.0, 1.0, 0.0]
    assert scored.corpus_metrics is None
    assert scored.matrix_metric is None


def test_score_split_rejects_unknown_caption_metric():
    with pytest.raises(ValueError, match=r"evaluate.caption_metric: invalid value 'CIDEr-D' for scorer 'caption'. Set one of its corpus metrics: BLEU-1, "):
        score_split("caption", ["a b"], [caption_record(0, "a b")], "CIDEr-D")
