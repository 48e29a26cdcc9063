"""What the peer drivers share: their command line, the calibration tokens, the result line.

Imported by `autoawq_quant.py`, `llmc_quant.py` and `autoround_quant.py` from their own folder, under the peer's
interpreter (it needs nothing beyond the standard library and torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def parse_args(doc: str, recipes: tuple[str, ...] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if recipes:
        p.add_argument("--recipe", default=recipes[0], choices=recipes)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--check-layer", default="model.layers.0.self_attn.q_proj",
                   help="a linear whose dequantised weight is written to OUT/check.safetensors")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    return a


def read_sequences(path: str) -> tuple[list[list[int]], int]:
    """The calibration token ids ({"sequences": [[id, ...], ...]}) and their common length."""
    sequences = json.loads(Path(path).read_text())["sequences"]
    seq_len = len(sequences[0])
    if any(len(s) != seq_len for s in sequences):
        raise SystemExit("every calibration sequence must have the same length")
    return sequences, seq_len


def print_result(record: dict) -> None:
    """The last line peers.py reads: the in-process timings and settings."""
    import transformers

    print("RESULT " + json.dumps({**record, "threads": torch.get_num_threads(),
                                  "transformers": transformers.__version__, "torch": torch.__version__}), flush=True)
