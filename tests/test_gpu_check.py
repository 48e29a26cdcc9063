"""scripts/gpu-check.sh as a CPU dry run: every step of the GPU check at small widths, and its JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_a_complete_summary(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.pop("OUT", None)
    proc = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--tiny", "--json", str(out),
                           "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["settings"]["device"] == "cpu" and s["width"] == "tiny"
    assert s["checkpoint"]["layers"] == 4 and s["checkpoint"]["bytes"] > 0
    assert s["awq"]["tokens"] > 500
    # One row per decoder layer: its time, the measured peak and the prediction it is held against.
    layers = s["layers"]
    assert [r["index"] for r in layers] == [0, 1, 2, 3]
    for r in layers:
        assert r["seconds"] > 0 and r["peak_bytes"] > 0 and r["reserved_bytes"] is None
        assert r["predicted_bytes"] == s["prediction"]["host_peak_bytes"] > 0
        assert 0.5 < r["peak_bytes"] / r["predicted_bytes"] < 1.5
    assert s["prediction"]["plan"]["chunk_tokens"] > 0
    # the time model beside the measurement, and the 38B prediction for a card of this size (24 GiB on CPU)
    t = s["time_prediction"]
    assert t["assumed_chip"] == "RTX 4090" and t["layer_seconds_predicted"] > 0 and t["layer_seconds_measured"] > 0
    assert "4-bit" in t["r1v_38b_traces_self"]["path"] and t["r1v_38b_traces_self"]["seconds"]["trace generation"] > 0
    assert "time model, assuming a RTX 4090" in proc.stdout
    # The GPTQ rounding on a one-layer slice, its peak held against the prediction that counts its second moments.
    (g,) = s["gptq"]["layers"]
    assert g["index"] == 0 and g["seconds"] > 0 and 0.5 < g["peak_over_predicted"] < 1.5
    assert any(k.startswith("gptq") for k in s["gptq"]["prediction"]["device_parts"])
    rows = s["matmul"]["results"]
    assert len(rows) == 6 and all(r["bf16_ms"] > 0 and r["int4_ms"] > 0 and r["rel_err"] < 0.2 for r in rows)
    assert s["chat"]["tokens"] > 0 and s["chat"]["image_tiles"] >= 1
    assert not list(tmp_path.glob("tmp*")), "the work folder is removed"
    assert "peak RSS so far" in proc.stdout and "chat on cpu with a picture" in proc.stdout
