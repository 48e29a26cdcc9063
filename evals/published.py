"""The vendor's published scores, shown beside measured ones when the reference is one of
the vendor's models.

The figures come from the vendor's model cards and were measured with the vendor's own
harness (its VLMEvalKit fork, its prompts, its answer extraction, sampled decoding), so
they are context for ours, not a target our harness is guaranteed to reproduce.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

HARNESS_NOTE = "published by the vendor, measured with its own harness"

_NO_KIT = "the vendor published no scoring code for this suite; ours is rule-scored as the suite note says."
# suite -> how the vendor scored its published figure, said beside it.
VENDOR_SCORING: dict[str, str] = {
    "mmmu-val": ("a GPT-4o judge read the replies, and open questions were turned into a two-option quiz after "
                 "generation; ours are rule-scored, so the two are not like for like."),
    "mathvista-testmini": ("a GPT-4o judge extracted the answers, and free-form answers had to match as exact floats; "
                           "ours are rule-scored and round floats to the question's precision, as MathVista's own "
                           "scorer does."),
    "math-500": _NO_KIT,
    "aime-2024": _NO_KIT,
    "gpqa-diamond": _NO_KIT,
}


@dataclass(frozen=True)
class Published:
    model: str                 # the vendor's name for the model
    suite: str
    bf16: float | None
    vendor_awq: float | None

    def to_dict(self) -> dict:
        return {"model": self.model, "suite": self.suite, "bf16": self.bf16, "vendor_awq": self.vendor_awq,
                "source": HARNESS_NOTE}


# model -> suite (as this tool names it) -> (bf16, the vendor's AWQ release); percent.
TABLE: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "Skywork-R1V-38B": {"mmmu-val": (69.0, 60.1), "mathvista-testmini": (67.5, 59.9), "math-500": (94.0, 86.0),
                        "aime-2024": (72.0, 61.0), "gpqa-diamond": (61.6, 56.5)},
    "Skywork-R1V2-38B": {},
    "Skywork-R1V3-38B": {"mmmu-val": (76.0, 66.7), "mathvista-testmini": (77.1, 70.5)},
}

# Longest names first, so "Skywork-R1V-38B" never claims an R1V2 or R1V3 checkpoint.
_PATTERNS = [(name, re.compile(re.escape(name).replace(r"\-", "[-_ ]?"), re.IGNORECASE))
             for name in sorted(TABLE, key=len, reverse=True)]


def vendor_model(*names: str) -> str | None:
    """The vendor model that any of ``names`` (hub ids, folder names, config fields) names."""
    for text in names:
        for name, pattern in _PATTERNS:
            if text and pattern.search(str(text)):
                return name
    return None


def _config_names(folder: Path) -> list[str]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(config.get(k)) for k in ("_name_or_path", "name_or_path", "model_name") if config.get(k)]


def identify(spec: str, folder: Path | None) -> str | None:
    """The vendor model a reference is, by its hub id, its folder's name or its config."""
    names = [spec]
    if folder is not None:
        names += [Path(folder).name, *_config_names(Path(folder))]
    return vendor_model(*names)


def lookup(model: str | None, suite: str) -> Published | None:
    """The vendor's figures for a model on a suite; None when it published none."""
    if model is None:
        return None
    bf16, awq = TABLE.get(model, {}).get(suite, (None, None))
    return Published(model, suite, bf16, awq)
