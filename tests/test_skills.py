"""The r1v-mini questions: held out from training, reproducible, and scored by the eval suite."""

from __future__ import annotations

import pytest

from r1v_quant.calib.skills import (
    IMAGE_FAMILIES,
    TEXT_FAMILIES,
    heldout_questions,
    image_samples,
    suite_samples,
    text_question,
)
from r1v_quant.errors import UserError
from r1v_quant.evals.scoring import is_correct


def test_suite_is_three_quarters_pictures_and_reproducible():
    first, again = suite_samples(40), suite_samples(40)
    assert [s.id for s in first] == [s.id for s in again]
    assert [s.prompt for s in first] == [s.prompt for s in again]
    pictures = [s for s in first if s.images]
    assert len(pictures) == 30 and len(first) - len(pictures) == 10
    assert all(s.prompt.count("<image>") == 1 for s in pictures)
    assert not any("<image>" in s.prompt for s in first if not s.images)


def test_heldout_questions_never_appear_in_the_training_streams():
    held = heldout_questions(60, 60)
    assert {fam for _, fam in held} == set(IMAGE_FAMILIES) | set(TEXT_FAMILIES)
    trained_ids = set()
    stream = image_samples(IMAGE_FAMILIES, "calib", 0)
    trained_ids |= {next(stream)[0].id for _ in range(300)}
    trained_text = {text_question("calib", 0, i)[0].prompt for i in range(300)}
    assert not trained_ids & {s.id for s, _ in held}
    held_text = [s.prompt for s, fam in held if fam in TEXT_FAMILIES]
    # text questions are drawn from a small space, so some prompts repeat across splits; most must not
    assert sum(p in trained_text for p in held_text) < len(held_text) / 2


def test_text_replies_are_in_the_r1_form_and_score_correct():
    for index in range(len(TEXT_FAMILIES) * 3):
        sample, reply, family = text_question("eval", 0, index)
        assert family == TEXT_FAMILIES[index % len(TEXT_FAMILIES)]
        assert reply.startswith("<think>\n") and "</think>" in reply and reply.endswith(f"\\boxed{{{sample.answer}}}")
        assert is_correct(sample, reply[len("<think>\n"):], think_opened=True)
        wrong = reply.replace(f"\\boxed{{{sample.answer}}}", "\\boxed{Z}")
        assert not is_correct(sample, wrong[len("<think>\n"):], think_opened=True)


def test_arithmetic_answers_are_right():
    for index in range(0, 60, len(TEXT_FAMILIES)):
        sample, _, family = text_question("eval", 0, index)
        assert family == "add"
        a, b = (int(x) for x in sample.prompt.split("What is ")[1].split("?")[0].split(" + "))
        assert sample.answer == str(a + b)


def test_unknown_family_is_refused():
    with pytest.raises(UserError, match="bar_value"):
        next(image_samples(("bar_value",), "eval", 0))


def test_eval_suite_r1v_mini_loads():
    from r1v_quant.evals.run import EvalSettings, load_suite

    suite = load_suite(EvalSettings(suite="r1v-mini", limit=12))
    assert suite.kind == "qa" and len(suite.samples) == 12
    assert [s.id for s in suite.samples] == [s.id for s in suite_samples(12)]
