"""CVIT scorers and MIF against worked examples (pure functions, no model)."""

from __future__ import annotations

import pytest

from continual_lora.kinds import scorers as S


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
    ("The Answer", "answer"),  # lower case, article dropped
    ("an apple, a pear", "apple pear"),  # ", " touches a space: removed
    ("yes-no", "yes no"),  # "-" between letters: replaced by a space
    ("3,000 people", "3000 people"),  # digit,digit: punctuation removed everywhere
    ("1.5 m", "1.5 m"),  # a period inside a number stays
    ("dont know", "don't know"),  # contraction restored
    ("couldntve", "couldn't've"),
    ("its red", "its red"),  # plain words are never rewritten
    ("  none\n", "0"),
    ("what?!", "what"),
])
def test_vqa_normalisation(raw, normalised) -> None:
    assert S.normalize_answer(raw) == normalised


def test_vqa_soft_accuracy_with_ten_answers() -> None:
    answers = ["2"] * 3 + ["3"] * 7
    # leave-one-out over the 10 answers: the 3 "2"s each leave 2 matches (2/3), the 7 others leave 3 (1)
    assert S.vqa_soft_score("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert S.vqa_soft_score("two", answers, subsets=False) == 1.0  # min(3 / 3, 1)
    assert S.vqa_soft_score("Three.", answers) == 1.0  # 7 matches: 1 in every subset
    one = ["cat"] + ["dog"] * 9
    assert S.vqa_soft_score("cat", one) == pytest.approx(0.9 * (1 / 3))  # 9 subsets keep the one "cat"
    assert S.vqa_soft_score("cat", one, subsets=False) == pytest.approx(1 / 3)
    assert S.vqa_soft_score("bird", one) == 0.0
    assert S.vqa_accuracy(["two", "bird"], [answers, one]) == pytest.approx(45.0)
    assert S.vqa_min_accuracy(["two", "cat"], [answers, one]) == pytest.approx(100 * (1 + 1 / 3) / 2)


def test_exact_and_answer_match() -> None:
    assert S.exact_match_accuracy(["A Circle.", "red", "blue"], [["circle"], ["red"], ["green", "teal"]]) == \
        pytest.approx(200 / 3)
    assert S.answer_match_score("a golden retriever dog", ["golden retriever"]) == 1.0
    assert S.answer_match_score("Cat.", ["cat"]) == 1.0
    assert S.answer_match_score("catapult", ["cat"]) == 0.0  # whole words only
    assert S.answer_match_score("bobcat", ["cat"]) == 0.0


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("(B)", "B"), ("C.", "C"), ("D)", "D"), ("The answer is B.", "B"), ("Answer: (C)", "C"),
    ("the answer is (A)", "A"), ("B. seven", "B"), ("a cat", None), ("I think so", None), ("", None),
])
def test_option_letter_parsing(text, letter) -> None:
    assert S.parse_option_letter(text) == letter


def test_option_accuracy_and_range() -> None:
    assert S.parse_option_letter("E", num_options=4) is None
    assert S.option_accuracy(["A", "The answer is B", "C", "banana"], [["A"], ["B"], ["D"], ["A"]]) == 50.0


def test_cider_prefers_the_reference_caption() -> None:
    refs = [["a cat sits on a mat", "a cat on the mat"], ["a dog runs in a park", "a dog running on grass"],
            ["two birds on a wire", "birds sitting on a wire"]]
    perfect = S.cider(["a cat sits on a mat", "a dog runs in a park", "two birds on a wire"], refs)
    partial = S.cider(["a cat", "a dog", "birds"], refs)
    swapped = S.cider(["a dog runs in a park", "two birds on a wire", "a cat sits on a mat"], refs)
    assert perfect > partial > swapped >= 0.0
    assert S.cider(["A cat sits on a mat!", "a dog runs in a park", "two birds on a wire"], refs) == \
        pytest.approx(perfect)  # case and punctuation are tokenised away
    with pytest.raises(ValueError, match="at least 2"):
        S.cider(["a cat"], [["a cat"]])


@pytest.mark.parametrize("answer, fmt, ok", [
    ("A", "letter", True), ("(B)", "letter", True), ("C.", "letter", True), ("The answer is A", "letter", False),
    ("a", "letter", False), ("A B", "letter", False),
    ("cat", "short", True), ("golden retriever.", "short", True), ("It is a cat.", "short", True),
    ("It is a cat. It sits.", "short", False), ("a cat sitting on the mat", "short", False), ("", "short", False),
    ("a fabric with a defect.", "sentence", True), ("one\ntwo", "sentence", False), ("", "sentence", False),
])
def test_follows_format(answer, fmt, ok) -> None:
    assert S.follows_format(answer, fmt) is ok


def test_mif_rate() -> None:
    assert S.instruction_following_rate(["A", "B", "The answer is C", "(D)"], "letter") == 75.0
    with pytest.raises(ValueError, match="unknown answer format"):
        S.follows_format("x", "poem")
