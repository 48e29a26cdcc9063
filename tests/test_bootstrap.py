"""`awq --traces bootstrap` end to end on r1v-mini: a first pass without traces, traces from its 4-bit
export, calibration again on prompt + trace; awq, the report and the model card say which model wrote them."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from r1v_quant.quant.recipe import REPORT_NAME

MINI = Path(__file__).resolve().parents[1] / "models" / "r1v-mini"
WRITER = "a 4-bit bootstrap export (a first awq pass without traces), greedy, through transformers"


@pytest.mark.slow
def test_bootstrap_runs_end_to_end_on_r1v_mini(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("R1V_QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "out"
    code, text, err = run_cli(["awq", "-m", str(MINI), "-o", str(out), "--traces", "bootstrap", "--samples", "2",
                               "--max-trace-tokens", "16", "--grid", "3", "--seq-len", "512", "--no-kl-check",
                               "--device", "cpu", "--compute-dtype", "float32"], capsys)
    assert code == 0, err
    boot = tmp_path / ".out.awq-work.bootstrap"
    assert f"bootstrap: a first awq pass without traces, into {boot}" in text
    assert f"traces written by {WRITER} ({boot})" in text and f"traces written by: {WRITER}" in text
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["traces"] == {"written by": WRITER, "engine": "transformers", "model": "bootstrap"}
    assert report["calibration"]["traces"] == "bootstrap"
    assert f"| traces written by | {WRITER} |" in (out / "README.md").read_text()
    # the first pass's export and work folder are gone; its traces stay cached under its identity
    assert not boot.exists() and not (tmp_path / "..out.awq-work.bootstrap.awq-work").exists()
    (cache,) = (tmp_path / "cache" / "traces").glob("*.json")
    data = json.loads(cache.read_text())
    assert data["model"]["path"] == str(boot.resolve()) and data["settings"]["max_trace_tokens"] == 16
    replies = list(data["traces"].values())
    assert len(replies) == 2 and all(r["tokens"] >= 1 and isinstance(r["response"], str) for r in replies)
