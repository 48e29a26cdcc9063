"""vLLM loads an r1v-quant AWQ export and agrees with our runtime's greedy tokens (opt-in: `pytest -m vllm`).

Needs the separate vLLM environment `.venv-vllm` (create it with scripts/vllm-env.sh); the
work itself is done by tests/vllm_check.py, whose docstring lists what it substitutes on
CPU-only machines and why. The export, the image and our runtime's reference tokens are
made once per module by its `prepare` step (run with this interpreter, the project's);
each test then starts vLLM on them in a fresh `.venv-vllm` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "vllm_check.py"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"needs the separate vLLM environment {VLLM_PYTHON.parent.parent}: create it with scripts/vllm-env.sh",
    ),
]


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """make-tiny + `r1v-quant awq --calib builtin` + our runtime's greedy tokens, once for the module."""
    work = tmp_path_factory.mktemp("vllm")
    proc = subprocess.run([sys.executable, str(CHECK), "prepare", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"prepare failed:\n{_tail(proc.stdout + proc.stderr)}"
    return work / "reference.json"


def _run_vllm(reference: Path, *extra: str) -> dict:
    out = reference.parent / ("vllm-avx2.json" if "--emulate-avx2" in extra else "vllm.json")
    proc = subprocess.run([str(VLLM_PYTHON), str(CHECK), "vllm", "--reference", str(reference), "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"vLLM run failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
    summary = json.loads(out.read_text())
    for case in summary["cases"]:
        assert case["prompt_ids_equal"], (
            f"{case['name']}: vLLM built different prompt ids from ours (lengths {case['prompt_len']})")
        forced = case["teacher_forced"]
        assert forced["same_ids"], f"{case['name']}: vLLM did not accept our reply as a continuation of the prompt"
        # Each of our greedy tokens is vLLM's choice too, or a bf16 near-tie with it, and both
        # engines give it the same log-probability (see TIE_TOL / LOGPROB_TOL in vllm_check.py).
        assert case["ok"], (
            f"{case['name']}: vLLM disagrees with our runtime: greedy {case['vllm_output_ids']} vs ours "
            f"{case['reference_output_ids']}; along our reply {forced}; LLM.chat agrees: "
            f"{case['chat_same_prompt_and_reply']}; criteria {summary['criteria']}; "
            f"set-up {summary['setup']}")
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    return summary


def test_vllm_matches_runtime_greedy_tokens(reference):
    """vLLM as installed on this machine (its own 4-bit kernel where its library has one)."""
    summary = _run_vllm(reference)
    assert {c["name"] for c in summary["cases"]} == {"text", "image"}


def test_vllm_avx2_build_with_reference_op(reference):
    """vLLM's AVX2 library, which lacks cpu_gemm_wna16, with r1v_quant.fixtures.vllm_cpu_op standing in for it."""
    summary = _run_vllm(reference, "--emulate-avx2")
    assert summary["setup"]["gemm_op"].startswith("reference")


def test_reference_op_matches_vllm_layout(tmp_path):
    """r1v_quant.fixtures.vllm_cpu_op inverts vLLM's own AWQ weight conversion exactly (and matches its kernel where present)."""
    out = tmp_path / "op.json"
    proc = subprocess.run([str(VLLM_PYTHON), str(CHECK), "op", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), f"op check failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
    summary = json.loads(out.read_text())
    assert summary["ok"], json.dumps(summary, indent=2)
    assert proc.returncode == 0
