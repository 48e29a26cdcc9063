"""The questions r1v-mini is trained and tested on, and the ``r1v-mini`` eval suite.

Pictures come from three built-in families a few-million-parameter model can learn from a
random start (big coloured shapes and small counts, not the printed labels of the chart and
table families); text questions are short arithmetic and shape facts. Both have separate
"calib" and "eval" streams, so held-out questions are never trained or calibrated on, and
every question is a function of (split, seed, index) alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from r1v_quant.calib.builtin import builtin_item, sample_id, to_sample
from r1v_quant.calib.mmmu import pose_question
from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError

IMAGE_FAMILIES = ("shape_name", "shape_sides", "count_red")
TEXT_FAMILIES = ("add", "sub", "mul", "largest", "sides_open", "sides_choice")
SHAPES = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}

# Accuracy of guessing uniformly among the answers a family can have.
CHANCE = {
    "shape_name": 1 / 4,        # four options
    "shape_sides": 1 / 4,       # 3, 4, 5 or 6
    "count_red": 1 / 6,         # 1 to 6
    "bar_tallest": 1 / 4, "bar_value": 1 / 39, "rect_area": 1 / 4, "table_lookup": 1 / 20, "table_sum": 1 / 4,
    "add": 1 / 41, "sub": 1 / 31, "mul": 1 / 36, "largest": 1 / 4, "sides_open": 1 / 4, "sides_choice": 1 / 4,
}


def image_samples(families: Sequence[str], split: str, seed: int) -> Iterator[tuple[Sample, str]]:
    """Built-in questions of the chosen families, in index order; endless."""
    unknown = [f for f in families if f not in IMAGE_FAMILIES]
    if unknown:
        raise UserError(f"r1v-mini trains on the picture families {', '.join(IMAGE_FAMILIES)}, not {unknown[0]!r}.")
    index = 0
    while True:
        item = builtin_item(split, seed, index)
        if item.family in families:
            yield to_sample(item, sample_id(split, seed, index)), item.family
        index += 1


def _join(values: Sequence[object]) -> str:
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + " and " + words[-1]


def text_question(split: str, seed: int, index: int) -> tuple[Sample, str, str]:
    """(question, R1 reply, family) of a short text question; depends only on its arguments."""
    rng = random.Random(f"r1v-quant/mini-text/{split}/{seed}/{index}")
    family = TEXT_FAMILIES[index % len(TEXT_FAMILIES)]
    options: tuple[str, ...] = ()
    if family == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        question, answer, why = f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}."
    elif family == "sub":
        a = rng.randint(0, 30)
        b = rng.randint(0, a)
        question, answer, why = f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}."
    elif family == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question, answer, why = f"What is {a} * {b}?", str(a * b), f"{a} * {b} = {a * b}."
    elif family == "largest":
        values = rng.sample(range(1, 60), 4)
        options = tuple(str(v) for v in values)
        top = max(values)
        letter = "ABCD"[values.index(top)]
        question, answer = "Which number is the largest?", letter
        why = f"The numbers are {_join(values)}. The largest is {top}, which is option {letter}."
    elif family == "sides_open":
        shape = rng.choice([s for s in SHAPES if SHAPES[s]])
        question, answer = f"How many sides does a {shape} have?", str(SHAPES[shape])
        why = f"A {shape} has {SHAPES[shape]} sides."
    else:
        shape = rng.choice(sorted(SHAPES))
        others = rng.sample([s for s in sorted(SHAPES) if s != shape], 3)
        names = rng.sample([shape, *others], 4)
        options = tuple(names)
        letter = "ABCD"[names.index(shape)]
        sides = SHAPES[shape]
        if sides:
            question = f"Which shape has {sides} sides?"
            why = f"A {shape} has {sides} sides, so the answer is {shape}, option {letter}."
        else:
            question = "Which shape is round with no corners?"
            why = f"A circle is round with no corners, so the answer is circle, option {letter}."
        answer = letter
    sample = Sample(id=f"mini-text-{split}-{seed}-{index:05d}", prompt=pose_question(question, options),
                    answer=answer, subject="arithmetic" if family in ("add", "sub", "mul", "largest") else "shapes",
                    kind="multiple-choice" if options else "open", options=list(options))
    return sample, f"<think>\n{why}\n</think>\n\n\\boxed{{{answer}}}", family


def text_samples(split: str, seed: int) -> Iterator[tuple[Sample, str, str]]:
    index = 0
    while True:
        yield text_question(split, seed, index)
        index += 1


def heldout_questions(image_count: int, text_count: int, families: Sequence[str] = IMAGE_FAMILIES,
                      seed: int = 0) -> list[tuple[Sample, str]]:
    """The first ``image_count`` built-in "eval" questions of ``families`` and the first
    ``text_count`` held-out text questions, each with its family."""
    out: list[tuple[Sample, str]] = []
    pictures = image_samples(families, "eval", seed)
    out += [next(pictures) for _ in range(image_count)]
    words = text_samples("eval", seed)
    out += [(s, fam) for s, _, fam in (next(words) for _ in range(text_count))]
    return out


def suite_samples(n: int, seed: int = 0) -> list[Sample]:
    """The ``r1v-mini`` eval suite: n held-out questions, one in four of them text only."""
    text = n // 4
    return [sample for sample, _ in heldout_questions(n - text, text, seed=seed)]
