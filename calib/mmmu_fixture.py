"""Small MMMU look-alike data: real schema and layout, synthetic pictures and questions.

``write_mmmu_fixture`` writes ``<Subject>/validation-00000-of-00001.parquet`` files with the
columns, arrow types and ``datasets`` feature metadata of ``MMMU/MMMU``, so both this package's
loader and ``datasets.load_dataset("parquet", ...)`` read them.  Rows cycle through four
kinds of question that cover the cases the loader must get right: one picture, two
pictures named ``<image 2>`` before ``<image 1>``, an open question, and pictures that
stand as the options themselves.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from .mmmu import IMAGE_COLUMNS, MMMU_SPLIT, MMMU_SUBJECTS

_COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 200, 20)}
_SHAPES = ("circle", "square", "triangle")
_DIFFICULTY = ("Easy", "Medium", "Hard")
COLUMN_ORDER = (
    "id", "question", "options", "explanation", *IMAGE_COLUMNS,
    "img_type", "answer", "topic_difficulty", "question_type", "subfield",
)


def mmmu_schema():
    """MMMU/MMMU's arrow schema, with the ``datasets`` feature metadata that marks the images."""
    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field(name, image_type if name in IMAGE_COLUMNS else pa.string()) for name in COLUMN_ORDER]
    features = {
        name: {"_type": "Image"} if name in IMAGE_COLUMNS else {"dtype": "string", "_type": "Value"}
        for name in COLUMN_ORDER
    }
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    size = rng.choice(((96, 64), (64, 96), (80, 80)))
    image = Image.new("RGB", size, (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _shape_picture(rng: random.Random, shape: str, colour: str) -> Image.Image:
    image, draw = _canvas(rng)
    w, h = image.size
    r = min(w, h) // 3
    box = (w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r)
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(w // 2, h // 2 - r), (w // 2 - r, h // 2 + r), (w // 2 + r, h // 2 + r)], fill=fill)
    return image


def _dots_picture(rng: random.Random, count: int) -> Image.Image:
    image, draw = _canvas(rng)
    w, h = image.size
    for k in range(count):
        x = 8 + (k % 4) * (w - 16) // 4 + rng.randrange(4)
        y = 8 + (k // 4) * (h - 16) // 3 + rng.randrange(4)
        draw.ellipse((x, y, x + 8, y + 8), fill=(0, 0, 0))
    return image


def _letter(options: Sequence[str], correct: str) -> str:
    return "ABCDEFGHI"[list(options).index(correct)]


def _one_picture(rng: random.Random) -> dict:
    shape, colour = rng.choice(_SHAPES), rng.choice(sorted(_COLOURS))
    options = ["circle", "square", "triangle", "star"]
    return {
        "question": "<image 1> What shape is drawn in the picture?",
        "options": options,
        "answer": _letter(options, shape),
        "question_type": "multiple-choice",
        "images": [_shape_picture(rng, shape, colour)],
    }


def _two_pictures_reversed(rng: random.Random) -> dict:
    first, second = rng.sample(range(1, 10), 2)
    options = ["The first picture", "The second picture", "They hold the same number", "Neither holds dots"]
    correct = options[0] if first > second else options[1]
    return {
        "question": "Look at <image 2> and then at <image 1>. Which picture holds more dots?",
        "options": options,
        "answer": _letter(options, correct),
        "question_type": "multiple-choice",
        "images": [_dots_picture(rng, first), _dots_picture(rng, second)],
    }


def _open_count(rng: random.Random) -> dict:
    count = rng.randrange(1, 10)
    return {
        "question": "How many dots are in <image 1>?",
        "options": [],
        "answer": str(count),
        "question_type": "open",
        "images": [_dots_picture(rng, count)],
    }


def _pictures_as_options(rng: random.Random) -> dict:
    red_at = rng.randrange(3)
    others = [c for c in sorted(_COLOURS) if c != "red"]
    colours = ["red" if i == red_at else rng.choice(others) for i in range(3)]
    return {
        "question": "Which of the pictures shows a red square?",
        "options": ["<image 1>", "<image 2>", "<image 3>"],
        "answer": "ABC"[red_at],
        "question_type": "multiple-choice",
        "images": [_shape_picture(rng, "square", c) for c in colours],
    }


QUESTION_KINDS: tuple[Callable[[random.Random], dict], ...] = (
    _one_picture,
    _two_pictures_reversed,
    _open_count,
    _pictures_as_options,
)


def fixture_row(subject: str, number: int, seed: int = 0) -> dict:
    """Row ``number`` (from 1) of ``subject``, in MMMU's column layout."""
    rng = random.Random(f"mmmu-fixture/{seed}/{subject}/{number}")
    item = QUESTION_KINDS[(number - 1) % len(QUESTION_KINDS)](rng)
    pictures = [_png(image) for image in item["images"]]
    row = {
        "id": f"{MMMU_SPLIT}_{subject}_{number}",
        "question": item["question"],
        "options": repr(item["options"]),
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": item["answer"],
        "topic_difficulty": rng.choice(_DIFFICULTY),
        "question_type": item["question_type"],
        "subfield": "Synthetic",
    }
    row.update({column: pictures[k] if k < len(pictures) else None for k, column in enumerate(IMAGE_COLUMNS)})
    return row


def write_mmmu_fixture(
    out_dir: str | Path,
    subjects: Sequence[str] | None = None,
    per_subject: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Write one validation parquet file per subject under ``out_dir``; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = mmmu_schema()
    written = []
    for subject in subjects if subjects is not None else MMMU_SUBJECTS:
        rows = [fixture_row(subject, number, seed) for number in range(1, per_subject + 1)]
        path = Path(out_dir) / subject / f"{MMMU_SPLIT}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        written.append(path)
    return written
