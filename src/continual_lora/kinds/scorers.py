"""Answer scorers of the CVIT benchmark and the instruction-following rate (MIF). Pure functions.

Every scorer maps (predictions, references) -> percent, where ``references[i]`` is the tuple of
acceptable / human answers for prediction i:

    vqa           VQA soft accuracy, official VQA form: for each of the n human answers, drop it
                  and score min(#remaining answers equal to the prediction / 3, 1); average the n
                  scores (for 10 answers: the mean over the 10 subsets of 9). TextVQA / VQAv2.
    vqa_min       the simple form min(#answers equal to the prediction / 3, 1) (LLaVA's TextVQA
                  evaluator). Equal to ``vqa`` when no or >= 4 answers match.
    exact         exact match after VQA answer normalisation, against any reference. GQA.
    option        multiple-choice letter accuracy: the letter parsed from the prediction
                  ("A", "(A)", "A.", "The answer is A", "Answer: (A)") equals the reference letter.
                  ScienceQA.
    answer_match  the normalised reference equals the normalised prediction or appears in it as
                  whole words ("golden retriever" in "a golden retriever dog"). ImageNet.
    cider         corpus CIDEr (Vedantam et al. 2015; pycocoevalcap's ``Cider``, n = 4, sigma = 6)
                  times 100, on lower-cased, punctuation-stripped whitespace tokens. Flickr30k.

VQA answer normalisation (both prediction and references; as the official VQA evaluation and
LLaVA's EvalAI answer processor do): newlines / tabs to spaces; punctuation ``; / [ ] " { } ( ) =
+ \\ _ - > < @ ` , ? !`` removed where it touches a space (or anywhere, when a digit-comma-digit
appears), otherwise replaced by a space; periods removed unless followed by a digit; lower case;
number words zero..ten (and "none") to digits; articles a / an / the dropped; apostrophe-less
contractions restored ("dont" -> "don't", "couldntve" -> "couldn't've"; built from the official
table's contractions, lower-cased; plain words such as "its", "ill", "were", "well" are kept).

MIF, the instruction-following rate, is the percentage of predictions whose *form* obeys the
task's instructed answer format, independent of correctness (FORMATS):

    letter    the whole answer is one option letter: ``A``, ``(A)``, ``A.`` or ``A)`` (uppercase
              A-Z), nothing else. "The answer is A" is scored correct by ``option`` but does not
              follow the instruction "Answer with the option's letter ... directly".
    short     a single word or phrase: one line, 1 to ``SHORT_MAX_WORDS`` (= 4) words once one
              trailing period is removed, and no other sentence punctuation (. ? ! ;) inside.
    sentence  one non-empty line of at most ``SENTENCE_MAX_WORDS`` (= 40) words (a caption).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import combinations

# --- VQA answer normalisation -----------------------------------------------------------------
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PLAIN_WORDS = frozenset({"its", "ill", "wed", "well", "were", "hell", "shell", "shed", "id", "im", "ive", "lets", "ow"})
_CANONICAL_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll", "how's", "i'd",
    "i'd've", "i'll", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at",
    "shan't", "she'd", "she'd've", "she'll", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've",
    "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)


def _contraction_variants() -> dict[str, str]:
    """Every spelling with some apostrophes dropped -> the canonical contraction ("couldntve" ->
    "couldn't've"), except spellings that are plain English words, which are never rewritten."""
    out: dict[str, str] = {}
    for canon in _CANONICAL_CONTRACTIONS:
        spots = [i for i, ch in enumerate(canon) if ch == "'"]
        for k in range(1, len(spots) + 1):
            for drop in combinations(spots, k):
                variant = "".join(ch for i, ch in enumerate(canon) if i not in drop)
                if variant not in _PLAIN_WORDS:
                    out.setdefault(variant, canon)
    return out


_CONTRACTIONS = _contraction_variants()


def _process_punctuation(text: str) -> str:
    comma_in_number = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or comma_in_number:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", text)


def _process_digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA answer normalisation (module docstring): ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


# --- per-sample scores (0..1) -------------------------------------------------------------------
def vqa_soft_score(prediction: str, answers: Sequence[str], subsets: bool = True) -> float:
    """VQA accuracy of one prediction against the human ``answers`` (0..1); see module docstring."""
    if not answers:
        raise ValueError("vqa_soft_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if not subsets:
        return min(sum(hits) / 3.0, 1.0)
    total = sum(hits)
    return sum(min((total - h) / 3.0, 1.0) for h in hits) / len(hits)  # leave-one-out over the n answers


def exact_match_score(prediction: str, references: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(r) == pred for r in references))


_LETTER_ONLY = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\(?([A-Z])[.:)]\s")


def parse_option_letter(text: str, num_options: int | None = None) -> str | None:
    """The option letter an answer gives, or None: "A", "(B)", "C.", "The answer is D", "Answer: (A)", "B. cat"."""
    text = text.strip()
    letter = None
    for pattern in (_LETTER_ONLY, _ANSWER_IS, _LEADING_LETTER):
        m = pattern.search(text)
        if m and m.group(1).isupper():
            letter = m.group(1)
            break
    if letter is not None and num_options is not None and ord(letter) - ord("A") >= num_options:
        return None
    return letter


def option_score(prediction: str, references: Sequence[str]) -> float:
    letter = parse_option_letter(prediction)
    return float(letter is not None and any(letter == r.strip().strip("().").upper() for r in references))


def answer_match_score(prediction: str, references: Sequence[str]) -> float:
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(r) and f" {normalize_answer(r)} " in pred for r in references))


def caption_tokens(text: str) -> str:
    """CIDEr's input: lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s']|_", " ", text.lower()).split())


# --- corpus scorers (percent) -------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no predictions to score")
    return 100.0 * sum(values) / len(values)


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    return _mean([vqa_soft_score(p, r) for p, r in zip(predictions, references)])


def vqa_min_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    return _mean([vqa_soft_score(p, r, subsets=False) for p, r in zip(predictions, references)])


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    return _mean([exact_match_score(p, r) for p, r in zip(predictions, references)])


def option_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    return _mean([option_score(p, r) for p, r in zip(predictions, references)])


def answer_match_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(predictions, references)
    return _mean([answer_match_score(p, r) for p, r in zip(predictions, references)])


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr x 100 (pycocoevalcap); needs >= 2 images, since IDF is taken over the corpus."""
    _check(predictions, references)
    if len(predictions) < 2:
        raise ValueError("CIDEr needs at least 2 images (its IDF is computed over the reference corpus)")
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("CIDEr needs pycocoevalcap: pip install pycocoevalcap==1.2") from err
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


SCORERS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "vqa": vqa_accuracy,
    "vqa_min": vqa_min_accuracy,
    "exact": exact_match_accuracy,
    "option": option_accuracy,
    "answer_match": answer_match_accuracy,
    "cider": cider,
}

# --- instruction following ------------------------------------------------------------------
SHORT_MAX_WORDS = 4
SENTENCE_MAX_WORDS = 40
FORMATS = ("letter", "short", "sentence")
_LETTER_FORMAT = re.compile(r"^(?:\([A-Z]\)|[A-Z][.)]?)$")


def follows_format(answer: str, answer_format: str) -> bool:
    """Whether ``answer`` has the instructed form (module docstring, MIF)."""
    text = answer.strip()
    if answer_format == "letter":
        return _LETTER_FORMAT.match(text) is not None
    if answer_format == "short":
        if not text or "\n" in text:
            return False
        body = text[:-1] if text.endswith(".") else text
        return 1 <= len(body.split()) <= SHORT_MAX_WORDS and not re.search(r"[.?!;]", body)
    if answer_format == "sentence":
        return bool(text) and "\n" not in text and len(text.split()) <= SENTENCE_MAX_WORDS
    raise ValueError(f"unknown answer format {answer_format!r}; known: {FORMATS}")


def instruction_following_rate(answers: Sequence[str], answer_format: str) -> float:
    """MIF: percent of ``answers`` that follow ``answer_format``."""
    return _mean([float(follows_format(a, answer_format)) for a in answers])
