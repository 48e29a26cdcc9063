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
        assert case["prompt_len"]["vllm"] == case["prompt_len"]["reference"] and case["prompt_ids_equal"], (
            f"{case['name']}: vLLM built different prompt ids from ours (lengths {case['prompt_len']})")
        assert case["vllm_output_ids"] == case["reference_output_ids"], (
            f"{case['name']}: vLLM greedy ids {case['vllm_output_ids']} != ours {case['reference_output_ids']} "
            f"(first difference at {case['first_difference']}; set-up {summary['setup']})")
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    return summary


def test_vllm_matches_runtime_greedy_tokens(reference):
    """vLLM as installed on this machine (its own 4-bit kernel where its library has one)."""
    summary = _run_vllm(reference)
    assert {c["name"] for c in summary["cases"]} == {"text", "image"}


def test_vllm_avx2_build_with_reference_op(reference):
    """vLLM's AVX2 library, which lacks cpu_gemm_wna16, with r1v_quant.vllm_cpu_op standing in for it."""
    summary = _run_vllm(reference, "--emulate-avx2")
    assert summary["setup"]["gemm_op"].startswith("reference")
