"""Scoring the math suites the standard way: the last ``\\boxed{}`` answer, judged equal to
the gold answer by mathematical equivalence.

Equivalence comes from Hugging Face's ``math-verify`` (``\\frac{1}{2}`` equals ``0.5``,
``\\dfrac{3}{4}`` equals ``0.75``, sets, intervals and simple expressions compared
symbolically).  Answers it cannot read as mathematics (a name, a word) are compared as
normalised strings, the one place where hand-written rules remain.

Kinds scored here:

- ``math`` (MATH-500, AIME 2024): the last boxed value after the reasoning against the gold
  answer (strict).  :func:`grade_with_fallback` also reads a reply without a box the way
  lighteval and open-r1 do: the last LaTeX or number expression of the visible answer, so a
  score can be set beside either convention.  Zero-padded gold answers (AIME's ``025``) equal
  their numbers both ways.
- ``free-form`` (MathVista's free-form questions): the last boxed value, else the visible
  answer when it is short; then by MathVista's answer type: ``integer`` (equal integers),
  ``float`` (equal once rounded to the question's ``precision`` decimals) or ``text``.

Multiple-choice suites (MathVista's multi_choice, GPQA) keep the option-letter rules of
:mod:`r1v_quant.evals.scoring`, so ``\\boxed{B}``, ``B`` and the option's text all count, and
GPQA's ``Answer: B`` line first.
"""

from __future__ import annotations

import math

from r1v_quant.evals.scoring import (
    extract_answer,
    is_correct,
    last_boxed,
    normalize,
    parse_number,
    visible_answer,
)

MATH = "math"
FREE_FORM = "free-form"
KINDS = (MATH, FREE_FORM)

# math-verify stops a parse or comparison that runs longer than this (seconds): a
# degenerate reply must not stall the whole evaluation.
_VERIFY_TIMEOUT_S = 5


def _parse(text: str):
    from math_verify import parse

    # "$...$" tells math-verify the value is LaTeX, so "\frac{1}{2}" and "0.5" both parse
    return parse(f"${text}$", parsing_timeout=_VERIFY_TIMEOUT_S)


def math_equal(predicted: str, gold: str) -> bool:
    """Whether two answers are the same mathematical value (or, failing a parse, the same
    normalised text)."""
    from math_verify import verify

    if normalize(predicted) == normalize(gold):
        return True
    try:
        pred, ref = _parse(predicted), _parse(gold)
        return bool(pred and ref and verify(ref, pred, timeout_seconds=_VERIFY_TIMEOUT_S))
    except Exception:  # noqa: BLE001 - an answer math-verify cannot handle is simply not equal
        return False


def boxed_answer(response: str, *, think_opened: bool = False) -> str | None:
    """The last ``\\boxed{}`` value after the reasoning, or None."""
    answer = visible_answer(response, think_opened=think_opened)
    if answer is None:
        return None
    boxed = last_boxed(answer)
    return boxed.strip() if boxed is not None and boxed.strip() else None


def last_expression(response: str, *, think_opened: bool = False) -> str | None:
    """The answer of a reply without a box as lighteval and open-r1 read it: math-verify's
    extraction of the last LaTeX or number expression in the visible answer."""
    from math_verify import parse

    answer = visible_answer(response, think_opened=think_opened)
    if answer is None or not answer.strip():
        return None
    try:
        found = parse(answer, parsing_timeout=_VERIFY_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a reply math-verify cannot read gives no answer
        return None
    return str(found[-1]).strip() or None if found else None


def free_form_answer(response: str, *, think_opened: bool = False) -> str | None:
    """MathVista free-form: the boxed value, else the open-question fallbacks."""
    boxed = boxed_answer(response, think_opened=think_opened)
    if boxed is not None:
        return boxed
    return extract_answer(response, "open", think_opened=think_opened)


def free_form_correct(predicted: str, gold: str, answer_type: str, precision: int | None) -> bool:
    """MathVista's rule for one free-form answer type."""
    if answer_type in ("integer", "float"):
        value, target = parse_number(predicted, allow_unit=True), parse_number(gold)
        if value is None or target is None:
            return math_equal(predicted, gold)
        if answer_type == "integer":
            return math.isclose(value, target, abs_tol=1e-9)
        places = int(precision or 0)
        return round(value, places) == round(target, places)
    return math_equal(predicted, gold)


def grade(sample, response: str, *, think_opened: bool = False) -> tuple[str | None, bool]:
    """(extracted answer, whether it is right) for any question kind; math strictly (a box)."""
    kind = sample.kind
    if kind == MATH:
        answer = boxed_answer(response, think_opened=think_opened)
        return answer, answer is not None and math_equal(answer, str(sample.answer))
    if kind == FREE_FORM:
        answer = free_form_answer(response, think_opened=think_opened)
        scoring = getattr(sample, "scoring", None) or {}
        ok = answer is not None and free_form_correct(answer, str(sample.answer), scoring.get("answer_type", "text"),
                                                      scoring.get("precision"))
        return answer, ok
    extract = (getattr(sample, "scoring", None) or {}).get("extract")
    answer = extract_answer(response, kind, sample.options, think_opened=think_opened, extract=extract)
    return answer, is_correct(sample, response, think_opened=think_opened)


def grade_with_fallback(sample, response: str, *, think_opened: bool = False) -> tuple[str | None, bool]:
    """:func:`grade`, except that a math reply without a box is read by its last expression."""
    if sample.kind != MATH or boxed_answer(response, think_opened=think_opened) is not None:
        return grade(sample, response, think_opened=think_opened)
    answer = last_expression(response, think_opened=think_opened)
    return answer, answer is not None and math_equal(answer, str(sample.answer))

