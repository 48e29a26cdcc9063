"""Greedy traces of r1v-mini through `add_self_traces(engine="vllm")`, in the vLLM environment, as JSON.

Run with the vLLM environment's Python (made by scripts/vllm-env.sh), with the CPU set-up of
tests/vllm_check.py and `enforce_eager=True` (as tests/vllm_eval_check.py):

    .venv-vllm/bin/python tests/vllm_trace_check.py --model models/r1v-mini --samples 8 --max-trace-tokens 64 \\
        --cache-dir DIR --json OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_check import setup_vllm_process  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-trace-tokens", type=int, default=64)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--json", required=True)
    a = parser.parse_args(argv)
    setup_vllm_process(emulate_avx2=False)
    import vllm

    vllm.LLM = functools.partial(vllm.LLM, enforce_eager=True)
    from r1v_quant.calib.sets import load_calibration
    from r1v_quant.calib.traces import add_self_traces
    from r1v_quant.deploy.vllm_engine import Parallel

    samples = load_calibration("builtin", n=a.samples)
    traced = add_self_traces(samples, a.model, a.max_trace_tokens, cache_dir=a.cache_dir, engine="vllm",
                             parallel=Parallel(distributed_executor_backend="uni"))
    Path(a.json).write_text(json.dumps({s.id: s.response for s in traced if s.kind != "text"}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
