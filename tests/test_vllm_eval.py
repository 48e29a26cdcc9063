"""`eval --engine vllm` against `--engine torch` on r1v-mini (opt-in: `pytest -m vllm`).

Needs the separate vLLM environment `.venv-vllm` (scripts/vllm-env.sh). The AWQ export and the
torch engine's eval run with this interpreter (the project's); the vLLM eval runs in a
`.venv-vllm` process through tests/vllm_eval_check.py (its docstring lists the CPU set-up).
Both evals use suite r1v-mini, greedy decoding, 40 questions, 64 new tokens and the RTN baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
QUESTIONS, NEW_TOKENS = 40, 64
# bf16 kernels differ between the engines, so a near-tie can flip a greedy token and with it an answer
SAME_ANSWERS = 0.95
# KL per token between engines: within a factor of 2 of each other, or 5e-5 nats apart when both are tiny
KL_FACTOR, KL_ABS = 2.0, 5e-5
AGREE_POINTS = 5.0   # top-1 agreement along the reference's replies, percentage points

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=f"needs the separate vLLM environment {VLLM_PYTHON.parent.parent}: "
                              "create it with scripts/vllm-env.sh"),
]


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _eval_args(export: Path, work: Path, name: str) -> list[str]:
    return ["--reference", str(ROOT / "models" / "r1v-mini"), "--candidate", str(export), "--suite", "r1v-mini",
            "--limit", str(QUESTIONS), "--max-new-tokens", str(NEW_TOKENS), "--baseline", "rtn",
            "--cache-dir", str(work / f"cache-{name}"), "--json", str(work / f"{name}.json")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("vllm-eval")
    export = work / "r1v-mini-awq"
    cli = [sys.executable, "-m", "r1v_quant.cli.main"]
    proc = subprocess.run([*cli, "awq", "--model", str(ROOT / "models" / "r1v-mini"), "--calib", "builtin",
                           "--samples", "24", "--out", str(export), "--no-kl-check"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    proc = subprocess.run([*cli, "eval", *_eval_args(export, work, "torch")], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_eval_check.py"), "--engine", "vllm",
                           "--distributed-executor-backend", "uni", *_eval_args(export, work, "vllm")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    return {name: json.loads((work / f"{name}.json").read_text()) for name in ("torch", "vllm")}


def _reference_items(report: dict) -> list[tuple[list[int], str, bool]]:
    """(prompt ids, reply text, whether the prompt opened the reasoning) per question, from the reference cache."""
    from safetensors import safe_open

    out = []
    for path in sorted(Path(report["settings"]["reference_cache"]).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            out.append((f.get_tensor("prompt_ids").tolist(), meta["text"], meta["think_opened"] == "1"))
    return out


def test_vllm_gives_the_torch_engines_answers(runs):
    from r1v_quant.evals.math_scoring import grade
    from r1v_quant.evals.settings import EvalSettings
    from r1v_quant.evals.suites import load_suite

    samples = load_suite(EvalSettings(suite="r1v-mini", limit=QUESTIONS)).samples
    torch_items, vllm_items = _reference_items(runs["torch"]), _reference_items(runs["vllm"])
    assert len(torch_items) == len(vllm_items) == len(samples) == QUESTIONS
    # vLLM's processor builds exactly our prompts: chat template, image tiling, <image> expansion
    assert [t[0] for t in torch_items] == [v[0] for v in vllm_items]
    answers = [(grade(s, t[1], think_opened=t[2])[0], grade(s, v[1], think_opened=v[2])[0])
               for s, t, v in zip(samples, torch_items, vllm_items)]
    same = sum(a == b for a, b in answers) / len(answers)
    print(f"reference answers equal across engines: {same:.1%}")
    assert same >= SAME_ANSWERS, answers
    models = {e: {m["name"]: m for m in runs[e]["models"]} for e in runs}
    assert models["torch"].keys() == models["vllm"].keys()
    assert {m["n"] for e in runs for m in runs[e]["models"]} == {QUESTIONS}


def test_kl_and_agreement_agree_across_engines_for_the_candidate_and_the_rtn_baseline(runs):
    comps = {e: {c["model"]: c for c in runs[e]["comparisons"]} for e in runs}
    assert set(comps["vllm"]) == set(comps["torch"]) and "RTN w4 g128" in comps["vllm"]
    for name, t in comps["torch"].items():
        v = comps["vllm"][name]
        print(f"{name}: KL torch {t['mean_kl']:.3g} vllm {v['mean_kl']:.3g}; "
              f"top-1 agreement torch {t['top1_agreement']:.1f}% vllm {v['top1_agreement']:.1f}%")
        assert v["mean_kl"] > 0 and t["mean_kl"] > 0
        close = (abs(v["mean_kl"] - t["mean_kl"]) <= KL_ABS
                 or 1 / KL_FACTOR <= v["mean_kl"] / t["mean_kl"] <= KL_FACTOR)
        assert close, (name, t["mean_kl"], v["mean_kl"])
        assert abs(v["top1_agreement"] - t["top1_agreement"]) <= AGREE_POINTS, (name, t, v)
