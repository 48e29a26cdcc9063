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


def _prepare(work: Path, *extra: str) -> Path:
    proc = subprocess.run([sys.executable, str(CHECK), "prepare", "--workdir", str(work), *extra],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"prepare failed:\n{_tail(proc.stdout + proc.stderr)}"
    return work / "reference.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """make-tiny + `r1v-quant awq --calib builtin` + our runtime's greedy tokens, once for the module."""
    return _prepare(tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def reference_lm_head(tmp_path_factory) -> Path:
    """The same with `awq --quantize-lm-head`: lm_head in 4 bit, `"lm_head": true`."""
    from vllm_check import DEFAULT_AWQ_ARGS

    return _prepare(tmp_path_factory.mktemp("vllm-lm-head"), f"--awq-args={DEFAULT_AWQ_ARGS} --quantize-lm-head")


@pytest.fixture(scope="module")
def full_engine(reference) -> dict:
    """vLLM as installed on this machine, with images allowed (its own 4-bit kernel where its library has one)."""
    return _run_vllm(reference)


def _run_vllm(reference: Path, *extra: str) -> dict:
    out = reference.parent / ("vllm" + "".join(f"-{e.removeprefix('--')}" for e in extra) + ".json")
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


def test_vllm_matches_runtime_greedy_tokens(full_engine):
    """vLLM as installed on this machine (its own 4-bit kernel where its library has one)."""
    assert {c["name"] for c in full_engine["cases"]} == {"text", "image"}
    assert full_engine["engine"]["lm_head_method"] == "UnquantizedEmbeddingMethod"


def test_vllm_runs_a_4bit_lm_head_and_matches_runtime(reference_lm_head):
    """A `--quantize-lm-head` export: vLLM builds lm_head from its AWQ tensors and agrees with our runtime."""
    summary = _run_vllm(reference_lm_head)
    assert {c["name"] for c in summary["cases"]} == {"text", "image"}
    engine = summary["engine"]
    assert engine["lm_head_method"] == "AutoAWQMarlinLinearMethod", engine
    assert "weight" not in engine["lm_head_params"], engine


def test_text_only_engine_builds_no_vision_tower(reference, full_engine):
    """limit_mm_per_prompt={"image": 0}: no vision weights are loaded, and the text replies are the full engine's."""
    text_only = _run_vllm(reference, "--text-only")
    assert full_engine["engine"]["vision_params"] > 0 and full_engine["engine"]["vision_model"] != "StageMissingLayer"
    engine = text_only["engine"]
    assert engine["vision_params"] == 0 and engine["vision_bytes"] == 0, engine
    assert engine["vision_model"] == engine["mlp1"] == "StageMissingLayer", engine
    (case,) = text_only["cases"]
    (full,) = [c for c in full_engine["cases"] if c["name"] == "text"]
    assert case["name"] == "text" and case["vllm_output_ids"] == full["vllm_output_ids"]


def test_vllm_avx2_build_with_reference_op(reference):
    """vLLM's AVX2 library, which lacks cpu_gemm_wna16, with tests/helpers/vllm_cpu_op.py standing in for it."""
    summary = _run_vllm(reference, "--emulate-avx2")
    assert summary["setup"]["gemm_op"].startswith("reference")


def test_reference_op_matches_vllm_layout(tmp_path):
    """tests/helpers/vllm_cpu_op.py inverts vLLM's own AWQ weight conversion exactly (and matches its kernel where present)."""
    out = tmp_path / "op.json"
    proc = subprocess.run([str(VLLM_PYTHON), str(CHECK), "op", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert out.exists(), f"op check failed (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}"
    summary = json.loads(out.read_text())
    assert summary["ok"], json.dumps(summary, indent=2)
    assert proc.returncode == 0


@pytest.fixture(scope="module")
def reference_mixed(tmp_path_factory) -> Path:
    """The same with `awq --keep-bf16`: layer 0's q/k/v and layer 1's MLP stay bf16, listed in modules_to_not_convert."""
    from vllm_check import DEFAULT_AWQ_ARGS

    return _prepare(tmp_path_factory.mktemp("vllm-mixed"), f"--awq-args={DEFAULT_AWQ_ARGS} --keep-bf16 0.qkv,1.gate_up,1.down")


def test_vllm_loads_a_mixed_export_and_matches_runtime(reference_mixed):
    """A mixed export: vLLM builds exactly the listed linears unquantised (fused ones whole) and gives our runtime's tokens."""
    summary = _run_vllm(reference_mixed)
    assert {c["name"] for c in summary["cases"]} == {"text", "image"}
    assert summary["engine"]["unquantised_decoder_linears"] == [
        "language_model.model.layers.0.self_attn.qkv_proj",
        "language_model.model.layers.1.mlp.down_proj",
        "language_model.model.layers.1.mlp.gate_up_proj",
    ], summary["engine"]
