"""One calibration or evaluation item, the shape every data source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


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
