"""benchmarks/peers.py's evaluation step on a tiny checkpoint: the reference and the RTN
baseline answer the same questions and come back compared (the peers themselves run in their
own environments and are not needed for this)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


def _peers():
    spec = importlib.util.spec_from_file_location("peers_bench", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_evaluate_compares_the_rtn_baseline_with_the_reference(tiny_dir, tmp_path):
    peers = _peers()
    s = peers.Settings(model=Path(tiny_dir), work=tmp_path, questions=2, suite="builtin", max_new_tokens=8,
                       batch_size=2)
    out = peers.evaluate(s, [], ["rtn"])
    assert out["questions"] == 2 and not out["failed"]
    assert set(out["models"]) == {"reference (bf16)", "rtn"}
    assert set(out["comparisons"]) == {"rtn"}
    rtn = out["comparisons"]["rtn"]
    assert rtn["mean_kl"] is not None and rtn["mean_kl"] >= 0 and 0 <= rtn["top1_agreement"] <= 100
