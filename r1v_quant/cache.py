"""Where r1v-quant keeps what it can recompute: calibration traces and eval reference outputs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "R1V_QUANT_CACHE"


def cache_folder(kind: str) -> Path:
    """``$R1V_QUANT_CACHE/<kind>`` when the variable is set, else ``~/.cache/r1v-quant/<kind>``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "r1v-quant") / kind
