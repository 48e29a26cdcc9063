"""Where r1v-quant keeps what it can recompute: calibration traces and eval reference outputs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "R1V_QUANT_CACHE"


def cache_folder(kind: str) -> Path:
    """``$R1V_QUANT_CACHE/<kind>`` when the variable is set, else ``~/.cache/r1v-quant/<kind>``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "r1v-quant") / kind


def record_digest(key: str, record: dict) -> str:
    """sha256 of one cache entry (a JSON object) under its key, its own "digest" field left out."""
    import hashlib
    import json

    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps([key, body], sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def tensors_digest(tensors: dict, meta: dict[str, str]) -> str:
    """sha256 of a cache entry stored as safetensors: every tensor's name, dtype, shape and bytes, and the
    metadata (its "digest" field left out)."""
    import hashlib
    import json

    import torch

    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}:{t.dtype}:{list(t.shape)}\0".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
