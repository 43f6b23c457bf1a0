"""VQA accuracy with the answer normalisation of the official VQA evaluation.

The rules follow the VQA challenge's evaluation script (vqaEval.py of the VQA
API, used for VQAv2 and, through LLaVA's evaluators, for TextVQA and VizWiz):

1. newlines and tabs become spaces and the text is stripped;
2. punctuation: each character of ``VQA_PUNCTUATION`` is deleted when the text
   contains it next to a space, or contains a comma between two digits
   ("1,000"), and becomes a space otherwise; then a period not followed by a
   digit is deleted, so "3.5" keeps its point and "yes." loses it;
3. the text is lowercased and split on whitespace, number words "none" and
   "zero".."ten" become digits, the articles a/an/the are dropped, and words
   in ``VQA_CONTRACTIONS`` get their apostrophe back ("dont" -> "don't").

Accuracy is the mean over the leave-one-out subsets of the annotator answers
of min(1, matches / 3). With ten answers, a prediction that 1, 2 or 3
annotators gave scores 0.3, 0.6 or 0.9, and one that 4 or more gave scores 1.
"""

from __future__ import annotations

import re

from drape.data.records import Record

# Characters that step 2 deletes or turns into a space. The period, the
# apostrophe and the colon are not among them.
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
VQA_ARTICLES = frozenset({"a", "an", "the"})
# The official contraction map, entry for entry, so that scores equal the official
# ones. Its keys with a capital "I" ("Im", "Ive", "Id've", "I'dve") never match,
# because the words are lowercased first. "somebody'd" maps to "somebodyd" there too.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (32) where re.sub takes the count, so it
# deletes at most 32 such periods; the same limit keeps scores identical.
_MAX_PERIODS_DELETED = 32
_MATCHES_FOR_FULL_CREDIT = 3


def _process_punctuation(text: str) -> str:
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    output = text
    for mark in VQA_PUNCTUATION:
        # The test reads the input text, not the partly processed output.
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", output, count=_MAX_PERIODS_DELETED)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(word)
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer with the rules of the official VQA evaluation (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, record: Record) -> float:
    """Score the prediction against the annotator answers with the official VQA formula.

    For each annotator, the prediction's accuracy against the other annotators
    is min(1, matches / 3); the score is the mean over all annotators. Both the
    prediction and the answers are normalised with normalize_vqa_answer.

    NOTE: the official script normalises the answers only when the annotators
    disagree, because the released VQA answers are already normalised. Here they
    are always normalised, so raw answers such as "Two." also match.

    A record with fewer than two annotator answers scores 1.0 when the normalised
    prediction equals its normalised answer, else 0.0, because leaving out the only
    annotator would score every prediction 0. An empty prediction scores 0.
    """
    predicted = normalize_vqa_answer(prediction)
    if not predicted:
        return 0.0
    if not record.answers or len(record.answers) < 2:
        reference = record.answers[0] if record.answers else record.answer
        return float(predicted == normalize_vqa_answer(reference))

    answers = [normalize_vqa_answer(answer) for answer in record.answers]
    total_matches = sum(answer == predicted for answer in answers)
    accuracy = 0.0
    for left_out in answers:
        matches = total_matches - (left_out == predicted)
        accuracy += min(1.0, matches / _MATCHES_FOR_FULL_CREDIT)
    return accuracy / len(answers)
