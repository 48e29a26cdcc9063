"""An offline, seeded set of small visual questions drawn with PIL.

Four families (bar charts, geometry figures, small tables, counting scenes), eight kinds of
question, half multiple choice posed exactly like the vendor's MMMU prompts and half open
with a whole-number answer.  The pictures are plain and the answers few (a letter or a
small number), so a tiny model can learn them; image shapes vary (square, wide, tall) so
that dynamic tiling sees several grids.

Each item depends only on (split, seed, index): a larger set starts with the smaller one,
the "calib" and "eval" splits draw from separate random streams, and an item's reasoning
can be rebuilt from its id alone, which is how ``reference_response`` works.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

from r1v_quant.errors import UserError

from .mmmu import pose_question
from .sample import Sample

SPLITS = ("calib", "eval")
SIZES: tuple[tuple[int, int], ...] = ((448, 448), (672, 448), (448, 896), (896, 448), (448, 672))

CATEGORIES = ("Apples", "Pears", "Plums", "Figs", "Limes", "Kiwis", "Dates", "Grapes")
SHAPE_SIDES = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
ROW_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri")
COLUMN_NAMES = ("Red", "Blue", "Green", "Gold")

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
RED, BLUE = (220, 30, 30), (30, 80, 220)
FILLS = ((30, 80, 220), (40, 160, 70), (240, 140, 20), (140, 60, 180), (20, 150, 160))
LIGHT_FILLS = ((200, 220, 250), (210, 240, 210), (250, 230, 200))

Draw = Callable[[ImageDraw.ImageDraw, tuple[int, int]], None]


@dataclass(frozen=True)
class Item:
    """Everything about one question except its pixels, which ``draw`` makes on demand."""

    family: str
    subject: str
    question: str               # holds one "<image>"
    options: tuple[str, ...]    # empty for open questions
    answer: str                 # option letter, or the number for open questions
    reasoning: str
    size: tuple[int, int]       # width, height
    draw: Draw


# ---------------------------------------------------------------- drawing helpers


@cache
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font renders the same everywhere; no system font is looked up
    return ImageFont.load_default(size=px)


def _font_px(size: tuple[int, int]) -> int:
    return max(12, min(size) // 18)


def _text_at(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, font) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = centre[0] - (right - left) / 2 - left
    y = centre[1] - (bottom - top) / 2 - top
    draw.text((x, y), text, fill=BLACK, font=font)


def _letter(options: Sequence[str], correct: str) -> str:
    return "ABCD"[list(options).index(correct)]


def _number_options(rng: random.Random, correct: int, pool: Sequence[int] = ()) -> tuple[str, ...]:
    """Four ascending numbers: the answer and three distinct positive distractors."""
    candidates = sorted({v for v in [*pool, *range(correct - 6, correct + 7)] if v > 0 and v != correct})
    preferred = [v for v in dict.fromkeys(pool) if v > 0 and v != correct]
    distractors = preferred[:2]
    distractors += rng.sample([v for v in candidates if v not in distractors], 3 - len(distractors))
    return tuple(str(v) for v in sorted([correct, *distractors]))


def _join(values: Sequence[object]) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ---------------------------------------------------------------- bar charts


def _draw_bars(names: Sequence[str], values: Sequence[int], fill: tuple[int, int, int]) -> Draw:
    def draw(d: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
        w, h = size
        px = _font_px(size)
        font = _font(px)
        left, right, top, base = 0.08 * w, 0.96 * w, 0.12 * h, 0.86 * h
        d.line([(left, top), (left, base), (right, base)], fill=BLACK, width=2)
        slot = (right - left) / len(values)
        for i, (name, value) in enumerate(zip(names, values)):
            x0 = left + (i + 0.2) * slot
            x1 = left + (i + 0.8) * slot
            y0 = base - (base - top) * value / max(values)
            d.rectangle([x0, y0, x1, base], fill=fill, outline=BLACK)
            _text_at(d, ((x0 + x1) / 2, y0 - px * 0.8), str(value), font)
            _text_at(d, ((x0 + x1) / 2, base + px * 0.9), name, font)

    return draw


def _bar_tallest(rng: random.Random, size: tuple[int, int]) -> Item:
    names = rng.sample(CATEGORIES, 4)
    values = rng.sample(range(2, 41), 4)
    tallest = names[values.index(max(values))]
    options = tuple(rng.sample(names, 4))
    letter = _letter(options, tallest)
    readings = _join([f"{n} {v}" for n, v in zip(names, values)])
    return Item(
        "bar_tallest", "charts",
        "<image> Which category has the tallest bar?", options, letter,
        f"The bars read {readings}. {tallest} is the tallest, which is option {letter}.",
        size, _draw_bars(names, values, rng.choice(FILLS)),
    )


def _bar_value(rng: random.Random, size: tuple[int, int]) -> Item:
    names = rng.sample(CATEGORIES, rng.randint(3, 5))
    values = [rng.randint(2, 40) for _ in names]
    target = rng.randrange(len(names))
    return Item(
        "bar_value", "charts",
        f"<image> What is the value of the bar labelled {names[target]}?", (), str(values[target]),
        f"The bar labelled {names[target]} is marked {values[target]}.",
        size, _draw_bars(names, values, rng.choice(FILLS)),
    )


# ---------------------------------------------------------------- geometry


def _draw_shape(shape: str, rng: random.Random) -> Draw:
    fill = rng.choice(FILLS)
    scale, fx, fy = rng.uniform(0.22, 0.32), rng.random(), rng.random()
    rotation = 0.0 if shape == "square" else rng.uniform(-15.0, 15.0)

    def draw(d: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
        w, h = size
        r = scale * min(w, h)
        cx = r + 10 + fx * (w - 2 * r - 20)
        cy = r + 10 + fy * (h - 2 * r - 20)
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=BLACK, width=3)
        else:
            d.regular_polygon((cx, cy, r), SHAPE_SIDES[shape], rotation=rotation, fill=fill, outline=BLACK, width=3)

    return draw


def _shape_name(rng: random.Random, size: tuple[int, int]) -> Item:
    shape = rng.choice(sorted(SHAPE_SIDES))
    options = tuple(rng.sample([shape, *rng.sample([s for s in sorted(SHAPE_SIDES) if s != shape], 3)], 4))
    letter = _letter(options, shape)
    sides = SHAPE_SIDES[shape]
    why = "is round with no corners" if sides == 0 else f"has {sides} straight sides"
    return Item(
        "shape_name", "geometry",
        "<image> Which shape is shown in the figure?", options, letter,
        f"The figure {why}, so it is a {shape}, option {letter}.",
        size, _draw_shape(shape, rng),
    )


def _shape_sides(rng: random.Random, size: tuple[int, int]) -> Item:
    shape = rng.choice([s for s in sorted(SHAPE_SIDES) if SHAPE_SIDES[s]])
    sides = SHAPE_SIDES[shape]
    return Item(
        "shape_sides", "geometry",
        "<image> How many sides does the shape have?", (), str(sides),
        f"The shape is a {shape}, which has {sides} sides.",
        size, _draw_shape(shape, rng),
    )


def _draw_rectangle(a: int, b: int, fill: tuple[int, int, int]) -> Draw:
    def draw(d: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
        w, h = size
        px = _font_px(size)
        font = _font(px)
        margin = 0.2 * min(w, h)
        unit = min((w - 2 * margin) / a, (h - 2 * margin) / b)
        x0, y0 = (w - a * unit) / 2, (h - b * unit) / 2
        x1, y1 = x0 + a * unit, y0 + b * unit
        d.rectangle([x0, y0, x1, y1], fill=fill, outline=BLACK, width=3)
        _text_at(d, ((x0 + x1) / 2, y1 + px), f"{a} cm", font)
        _text_at(d, (x1 + margin / 2, (y0 + y1) / 2), f"{b} cm", font)

    return draw


def _rect_area(rng: random.Random, size: tuple[int, int]) -> Item:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    area = a * b
    # the perimeter and the plain sum are the mistakes worth telling apart
    options = _number_options(rng, area, pool=(2 * (a + b), a + b))
    letter = _letter(options, str(area))
    return Item(
        "rect_area", "geometry",
        "<image> The sides of the rectangle are labelled in centimetres. "
        "What is its area in square centimetres?",
        options, letter,
        f"The sides are {a} cm and {b} cm, so the area is {a} * {b} = {area}, option {letter}.",
        size, _draw_rectangle(a, b, rng.choice(LIGHT_FILLS)),
    )


# ---------------------------------------------------------------- tables


def _draw_table(rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[int]]) -> Draw:
    def draw(d: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
        w, h = size
        font = _font(_font_px(size))
        margin = 0.08 * min(w, h)
        cell_w = (w - 2 * margin) / (len(columns) + 1)
        cell_h = min((h - 2 * margin) / (len(rows) + 1), 1.2 * cell_w)
        top = (h - cell_h * (len(rows) + 1)) / 2
        grid = [["", *columns]] + [[name, *map(str, line)] for name, line in zip(rows, values)]
        for r, line in enumerate(grid):
            for c, text in enumerate(line):
                x0, y0 = margin + c * cell_w, top + r * cell_h
                header = r == 0 or c == 0
                fill = (225, 225, 225) if header else WHITE
                d.rectangle([x0, y0, x0 + cell_w, y0 + cell_h], fill=fill, outline=BLACK, width=2)
                _text_at(d, (x0 + cell_w / 2, y0 + cell_h / 2), text, font)

    return draw


def _table(rng: random.Random) -> tuple[list[str], list[str], list[list[int]]]:
    rows = sorted(rng.sample(ROW_NAMES, 3), key=ROW_NAMES.index)
    columns = rng.sample(COLUMN_NAMES, 3)
    return rows, columns, [[rng.randint(1, 20) for _ in columns] for _ in rows]


def _table_lookup(rng: random.Random, size: tuple[int, int]) -> Item:
    rows, columns, values = _table(rng)
    r, c = rng.randrange(len(rows)), rng.randrange(len(columns))
    return Item(
        "table_lookup", "tables",
        f"<image> In the table, what is the value in row {rows[r]}, column {columns[c]}?", (), str(values[r][c]),
        f"Row {rows[r]} meets column {columns[c]} at {values[r][c]}.",
        size, _draw_table(rows, columns, values),
    )


def _table_sum(rng: random.Random, size: tuple[int, int]) -> Item:
    rows, columns, values = _table(rng)
    c = rng.randrange(len(columns))
    column = [line[c] for line in values]
    total = sum(column)
    options = _number_options(rng, total)
    letter = _letter(options, str(total))
    return Item(
        "table_sum", "tables",
        f"<image> What is the sum of the {columns[c]} column in the table?", options, letter,
        f"The {columns[c]} column holds {_join(column)}, so the sum is "
        f"{' + '.join(map(str, column))} = {total}, option {letter}.",
        size, _draw_table(rows, columns, values),
    )


# ---------------------------------------------------------------- counting


def _draw_scene(objects: Sequence[tuple[str, tuple[int, int, int]]], rng: random.Random) -> Draw:
    # one object per grid cell, jittered, so nothing overlaps and every count is visible
    order = rng.getrandbits(32)
    jitter = [(rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)) for _ in objects]

    def draw(d: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
        w, h = size
        r = min(w, h) / 14
        cell = 2.6 * r
        cols, rows = int((w - r) // cell), int((h - r) // cell)
        cells = list(range(cols * rows))
        random.Random(order).shuffle(cells)
        x_pad, y_pad = (w - cols * cell) / 2, (h - rows * cell) / 2
        for (shape, colour), spot, (jx, jy) in zip(objects, cells, jitter):
            cx = x_pad + (spot % cols + 0.5 + jx) * cell
            cy = y_pad + (spot // cols + 0.5 + jy) * cell
            box = [cx - r, cy - r, cx + r, cy + r]
            if shape == "circle":
                d.ellipse(box, fill=colour, outline=BLACK, width=2)
            else:
                d.rectangle(box, fill=colour, outline=BLACK, width=2)

    return draw


def _count_red(rng: random.Random, size: tuple[int, int]) -> Item:
    reds, blues, squares = rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 3)
    objects = [("circle", RED)] * reds + [("circle", BLUE)] * blues + [("square", RED)] * squares
    return Item(
        "count_red", "counting",
        "<image> How many red circles are there in the picture?", (), str(reds),
        f"Leaving out the blue circles and the red squares, I count {reds} red "
        f"{'circle' if reds == 1 else 'circles'}.",
        size, _draw_scene(objects, rng),
    )


FAMILIES: dict[str, Callable[[random.Random, tuple[int, int]], Item]] = {
    "bar_tallest": _bar_tallest,
    "bar_value": _bar_value,
    "shape_name": _shape_name,
    "shape_sides": _shape_sides,
    "rect_area": _rect_area,
    "table_lookup": _table_lookup,
    "table_sum": _table_sum,
    "count_red": _count_red,
}
_FAMILY_ORDER = tuple(FAMILIES)


# ---------------------------------------------------------------- the set


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown built-in split {split!r}; use one of {', '.join(SPLITS)}.")


def sample_id(split: str, seed: int, index: int) -> str:
    return f"builtin-{split}-{seed}-{index:05d}"


_ID = re.compile(r"^builtin-(calib|eval)-(-?\d+)-(\d+)$")


def builtin_item(split: str, seed: int, index: int) -> Item:
    """Item ``index`` of a split; depends on nothing else."""
    _check_split(split)
    rng = random.Random(f"r1v-quant/builtin/{split}/{seed}/{index}")
    family = _FAMILY_ORDER[index % len(_FAMILY_ORDER)]  # cycling keeps every family in any small set
    return FAMILIES[family](rng, rng.choice(SIZES))


def render(item: Item) -> Image.Image:
    image = Image.new("RGB", item.size, WHITE)
    item.draw(ImageDraw.Draw(image), item.size)
    return image


def to_sample(item: Item, sample_key: str) -> Sample:
    return Sample(
        id=sample_key,
        prompt=pose_question(item.question, item.options),
        images=[render(item)],
        answer=item.answer,
        subject=item.subject,
        kind="multiple-choice" if item.options else "open",
        options=list(item.options),
    )


def builtin_samples(n: int, seed: int = 0, split: str = "calib") -> list[Sample]:
    """``n`` built-in questions of ``split`` ("calib" or the held-out "eval")."""
    _check_split(split)
    if n < 0:
        raise UserError(f"the number of built-in samples must not be negative (got {n}).")
    return [to_sample(builtin_item(split, seed, i), sample_id(split, seed, i)) for i in range(n)]


def reference_response(sample: Sample) -> str:
    """The ground-truth reply to a built-in sample, in the R1 form.

    ``<think>\\n{reasoning}\\n</think>\\n\\n\\boxed{answer}``, rebuilt from the sample's id.
    """
    match = _ID.match(sample.id)
    if not match:
        raise UserError(f"sample {sample.id!r} is not from the built-in set, so it has no reference response.")
    item = builtin_item(match.group(1), int(match.group(2)), int(match.group(3)))
    if sample.answer is not None and sample.answer != item.answer:
        raise UserError(f"sample {sample.id!r} has answer {sample.answer!r}, not the built-in set's {item.answer!r}.")
    return f"<think>\n{item.reasoning}\n</think>\n\n\\boxed{{{item.answer}}}"


def text_form(seed: int, index: int, split: str = "calib") -> Sample:
    """Item ``index`` posed without its picture, its reasoning reply after the prompt: calibration text
    in the chat form the model reasons in. The reply starts inside the reasoning block, which the chat
    template's generation prompt opens."""
    item = builtin_item(split, seed, index)
    question = item.question.replace("<image> ", "").replace("<image>", "").strip()
    return Sample(
        id=f"builtin-text-{split}-{seed}-{index:05d}",
        prompt=pose_question(question, item.options),
        answer=item.answer,
        subject=item.subject,
        kind="multiple-choice" if item.options else "open",
        options=list(item.options),
        response=f"{item.reasoning}\n</think>\n\n\\boxed{{{item.answer}}}",
    )
