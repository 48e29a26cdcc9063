"""The memory model against measured peak RSS of `awq` at a mid width, at three calibration sizes up to 4x."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The model's host prediction against the child's measured peak RSS: within the 15% the real-width
# benchmark is held to, and never more than 5% short (a short prediction lets `awq` start and run
# out of memory; a long one only refuses early). At this width it predicts about 3-14% high: it
# adds the clip search, the chunk and one sample's attention although they are not alive together.
LOW, HIGH = 0.85, 1.05
FLAT = 1.15


@pytest.mark.slow
def test_measured_peak_rss_matches_the_memory_model_and_the_working_set_stays_flat(tmp_path):
    out = tmp_path / "calib.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "calib_memory.py"), "--width", "mid", "--layers", "1",
           "--tokens", "600,1200,2400", "--samples", "64", "--grid", "2", "--work", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3
    tokens = [r["tokens"] for r in rows]
    assert tokens == sorted(tokens) and tokens[-1] >= 3.5 * tokens[0], tokens
    for r in rows:
        assert LOW <= r["peak_rss"] / r["predicted"] <= HIGH, r
        # The stored activations grow with the tokens (float32 between layers, the activation dtype in the layer).
        assert r["stored_predicted"] > 40 * 1024 * r["tokens"]
    growth = [r["working_set"] / rows[0]["working_set"] for r in rows]
    assert max(growth) <= FLAT and min(growth) >= 1 / FLAT, growth
