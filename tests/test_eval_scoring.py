import pytest

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals.scoring import (
    extract_answer,
    is_correct,
    is_unfinished,
    last_boxed,
    normalize,
    parse_number,
    reasoning_length,
)

MC = "multiple-choice"
OPTIONS = ["10 N", "20 N", "100 N", "42 N"]


def mc(response):
    return extract_answer(response, MC, OPTIONS)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>maybe A, maybe C</think> The answer is (B)", "B"),
        ("<think>A? no.</think>\n\n**Final Answer**\n\\boxed{C}", "C"),
        ("<think>x</think> $\\boxed{\\text{(D)}}$", "D"),
        ("<think>x</think> \\boxed{B. 20 N}", "B"),
        ("<think>x</think> \\boxed{20 N}", "B"),  # the option's text, boxed
        ("<think>x</think> \\boxed{20}", "B"),  # the option's number without its unit
        ("<think>x</think> (D)", "D"),
        ("<think>x</think> C.", "C"),
        ("<think>x</think>\nAnswer: B", "B"),
        ("<think>x</think>\n**Answer:** B", "B"),
        ("<think>x</think> The answer is **B**.", "B"),
        ("<think>x</think> Final answer: (C) 100 N", "C"),
        ("<think>x</think> The correct option is 42 N.", "D"),
        ("<think>x</think> So the force must be 42 N overall.", "D"),  # option text only
        ("<think>x</think> A careful look shows B", "B"),  # the article "A" is no option
    ],
)
def test_multiple_choice_answers(response, expected):
    assert mc(response) == expected


def test_last_boxed_wins_and_reasoning_is_ignored():
    response = "<think>I first thought \\boxed{A}</think> Checking again: \\boxed{B}, finally \\boxed{D}"
    assert mc(response) == "D"


def test_several_letters_without_boxed_are_ambiguous():
    assert mc("<think>x</think> Options (A) and C are wrong; compare (B) and (D).") is None


def test_several_letters_resolved_by_last_explicit_answer():
    text = "<think>x</think> The answer is B. On reflection (A) and C fail, so the answer is (D)."
    assert mc(text) == "D"


def test_no_answer_gives_none():
    assert mc("<think>x</think> I cannot tell from the picture.") is None
    assert mc("<think>x</think>   ") is None


def test_unfinished_reasoning_gives_none_even_with_a_box_inside():
    runaway = "<think>Let me see... \\boxed{B} wait, let me recompute"
    assert is_unfinished(runaway)
    assert mc(runaway) is None
    assert extract_answer(runaway, "open") is None


def test_prefilled_think_tag_counts_as_opened():
    assert extract_answer("still thinking \\boxed{B}", MC, OPTIONS, think_opened=True) is None
    assert extract_answer("done</think> \\boxed{B}", MC, OPTIONS, think_opened=True) == "B"


def test_reply_without_reasoning_block_is_scored_whole():
    assert mc("\\boxed{A}") == "A"


def test_letter_outside_the_options_is_refused():
    assert extract_answer("<think>x</think> \\boxed{E}", MC, ["a", "b", "c", "d"]) is None


def test_boxed_nested_braces_and_top_level_box():
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\boxed{x^{2}}+1}") == "\\boxed{x^{2}}+1"
    assert last_boxed("\\boxed{3} then cut off \\boxed{4") == "3"
    assert last_boxed("no box") is None


def test_normalize():
    assert normalize("$\\text{ Paris }$") == "paris"
    assert normalize("\\mathrm{B}") == "b"
    assert normalize("30^\\circ") == "30"
    assert normalize("\\dfrac{1}{2}") == "1/2"
    assert normalize("3.5\\,\\text{cm}") == "3.5cm"


def test_parse_number():
    assert parse_number("1,000") == 1000.0
    assert parse_number("3.50") == 3.5
    assert parse_number("50\\%") == 50.0
    assert parse_number("\\frac{3}{4}") == 0.75
    assert parse_number("x = 3") == 3.0
    assert parse_number("3.5 cm") is None
    assert parse_number("3.5 cm", allow_unit=True) == 3.5
    assert parse_number("2x", allow_unit=True) is None


@pytest.mark.parametrize(
    "gold, response, ok",
    [
        ("3.5", "<think>x</think> \\boxed{3.50}", True),
        ("3.50", "<think>x</think> $\\boxed{3.5}$", True),
        ("1000", "<think>x</think> The answer is 1,000.", True),
        ("0.5", "<think>x</think> \\boxed{\\frac{1}{2}}", True),
        ("0.33", "<think>x</think> \\boxed{1/3}", True),  # rounded to the gold's decimals
        ("3", "<think>x</think> \\boxed{3.4}", False),  # an integer gold gets no rounding
        ("3.5", "<think>x</think> \\boxed{3.5\\text{ cm}}", True),
        ("3.5", "<think>x</think> \\boxed{3.6}", False),
        ("Paris", "<think>x</think> \\boxed{\\text{paris}}", True),
        ("['24', '24.0']", "<think>x</think> \\boxed{24}", True),  # MMMU's list-valued answers
        ("7", "<think>x</think> 7", True),  # a one-line answer without a box
        ("7", "<think>never finished, \\boxed{7}", False),
    ],
)
def test_open_answers(gold, response, ok):
    assert is_correct({"answer": gold, "kind": "open"}, response) is ok


def test_is_correct_with_a_sample():
    sample = Sample(id="q1", prompt="<image> Which force?", answer="B", kind=MC, options=OPTIONS)
    assert is_correct(sample, "<think>x</think> The answer is (B)")
    assert not is_correct(sample, "<think>x</think> \\boxed{C}")
    assert not is_correct(sample, "<think>x</think> A and C and D")


def test_sample_without_gold_answer_is_refused():
    with pytest.raises(UserError, match="q9"):
        is_correct(Sample(id="q9", prompt="?", answer=None), "\\boxed{1}")


def test_reasoning_length():
    assert reasoning_length([5, 6, 7, 151649, 8, 9]) == 3
    assert reasoning_length([5, 6, 7]) == 3  # never closed: all of it
    assert reasoning_length([1, 2, 99, 3], end=99) == 2
    assert reasoning_length("<think>a b c</think> d e") == 3
    assert reasoning_length("<think>abcd</think>x", tokenize=list) == 4


def test_options_that_say_the_same_are_one_answer():
    options = ["9", "12", "18", "18"]
    assert extract_answer("</think>\\boxed{18}", MC, options) == "C"
    assert extract_answer("</think>\\boxed{D}", MC, options) == "C"
    assert extract_answer("</think>It is C, which is D as well.", MC, options) == "C"
    assert extract_answer("</think>It is B or D.", MC, options) is None  # two different answers stay ambiguous
    sample = Sample(id="781", prompt="p", answer="D", kind=MC, options=options)  # gold given as the second letter
    assert is_correct(sample, "</think>\\boxed{C}") and is_correct(sample, "</think>\\boxed{18}")
    assert not is_correct(sample, "</think>\\boxed{B}")
    assert extract_answer("</think>\\boxed{$18$}", MC, ["18", "$18$", "20"]) == "A"  # same once normalised


def test_answer_line_is_read_only_when_the_suite_asks_for_it():
    from r1v_quant.evals.scoring import ANSWER_LINE, answer_line_letter

    reply = "</think>\\boxed{B}\nAnswer: C"
    assert extract_answer(reply, MC, OPTIONS, extract=ANSWER_LINE) == "C"
    assert extract_answer(reply, MC, OPTIONS) == "B"  # without it the box wins, as before
    assert answer_line_letter("answer: (D)\nANSWER:   $A$", OPTIONS) == "A"
    assert answer_line_letter("**Answer:** (C)", OPTIONS) == "C"
    assert answer_line_letter("My answer: a value of 3", OPTIONS) is None
    assert answer_line_letter("Answer: E", OPTIONS) is None  # no such option
    assert answer_line_letter("Answer: Because", OPTIONS) is None
