"""`awq --traces self --trace-engine vllm` against the transformers engine on r1v-mini (opt-in: `pytest -m vllm`).

Needs the separate vLLM environment `.venv-vllm` (scripts/vllm-env.sh); the vLLM traces are made
there by tests/vllm_trace_check.py, the transformers traces here. Greedy traces must be the same
tokens, or first differ where our runtime finds the two tokens a near-tie (TIE_TOL, the criterion
of tests/vllm_check.py): bf16 kernels differ between the engines.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MINI = ROOT / "models" / "r1v-mini"
SAMPLES, TOKENS = 8, 64

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=f"needs the separate vLLM environment {VLLM_PYTHON.parent.parent}: "
                              "create it with scripts/vllm-env.sh"),
]


def test_vllm_traces_are_the_transformers_engines_greedy_traces(tmp_path):
    import torch
    from vllm_check import TIE_TOL

    from r1v_quant.calib.sets import load_calibration
    from r1v_quant.calib.traces import add_self_traces
    from r1v_quant.evals.forcing import embed_prompt, encode, position_logprobs
    from r1v_quant.model.r1v import load_model

    out = tmp_path / "vllm.json"
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_trace_check.py"), "--model", str(MINI),
                           "--samples", str(SAMPLES), "--max-trace-tokens", str(TOKENS), "--cache-dir",
                           str(tmp_path / "vllm-cache"), "--json", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    theirs = json.loads(out.read_text())
    samples = [s for s in load_calibration("builtin", n=SAMPLES) if s.kind != "text"]
    ours = {s.id: s.response for s in add_self_traces(samples, MINI, TOKENS, cache_dir=tmp_path / "cache")}
    assert set(theirs) == set(ours) and len(ours) == SAMPLES
    loaded = load_model(MINI, device="cpu")
    tok = loaded.tokenizer
    same = 0
    for sample in samples:
        a = tok(ours[sample.id], add_special_tokens=False).input_ids
        b = tok(theirs[sample.id], add_special_tokens=False).input_ids
        if a == b:
            same += 1
            continue
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert d < min(len(a), len(b)), f"{sample.id}: one trace stops where the other goes on (at token {d})"
        prompt = encode(loaded, sample, 10**6)
        logp = torch.cat([lp for lp, _ in position_logprobs(loaded, embed_prompt(loaded, prompt)[0], prompt.ids[0],
                                                            a[:d + 1], d + 1)])
        gap = float(logp[d, a[d]] - logp[d, b[d]])
        assert gap <= TIE_TOL, f"{sample.id}: first difference at token {d} is no near-tie ({gap:.3f} nats)"
    assert same >= SAMPLES // 2, f"only {same} of {SAMPLES} traces are token for token the same"
