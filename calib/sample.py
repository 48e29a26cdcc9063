"""One calibration or evaluation item, the shape every data source produces."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from r1v_quant.errors import UserError


@dataclass
class Sample:
    id: str
    prompt: str                      # user text; one "<image>" per entry of `images`, in order
    images: list[Image.Image] = field(default_factory=list)
    answer: str | None = None        # gold answer: an option letter for multiple choice, else free text
    subject: str = ""
    kind: str = "open"               # "multiple-choice", "open", "text", "math", "free-form" or "chat"
    options: list[str] = field(default_factory=list)
    response: str | None = None      # an assistant reply to calibrate on after the prompt (reasoning traces)
    scoring: dict[str, Any] = field(default_factory=dict)  # what a suite's scorer needs (MathVista's answer type)
    # chat-style data ("chat"): the turns before `response` (system, user, earlier replies), rendered by the chat template
    messages: list[dict[str, str]] = field(default_factory=list)


def choose_indices(count: int, n: int, seed: int) -> list[int]:
    """A seeded choice of ``n`` of ``count`` positions, ascending."""
    if n < 0:
        raise UserError(f"the number of text samples must not be negative (got {n}).")
    if n >= count:
        return list(range(count))
    return sorted(random.Random(f"text/{seed}").sample(range(count), n))


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); "
                        "save it as UTF-8 and try again.") from None


def sample_key(sample: Sample) -> str:
    """A hash of what the model is shown: the sample's id, prompt text and picture pixels."""
    h = hashlib.sha256()
    h.update(sample.id.encode("utf-8") + b"\0" + sample.prompt.encode("utf-8") + b"\0")
    for image in sample.images:
        h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}\0".encode())
        h.update(hashlib.sha256(image.tobytes()).digest())
    return h.hexdigest()
