"""`r1v-quant eval ARGS...` in the vLLM environment, with the CPU set-up of tests/vllm_check.py.

Run with the vLLM environment's Python (made by scripts/vllm-env.sh):

    .venv-vllm/bin/python tests/vllm_eval_check.py --reference models/r1v-mini --candidate EXPORT --engine vllm ...

Test-only, as in vllm_check.py: vLLM's engine in this process, its W4A16 CPU kernel (or the
reference op where its library lacks one), the torchvision stand-in, and `enforce_eager=True`
on every engine (CPU graph compilation would take minutes on each of the three engines).
The arguments go to `r1v-quant eval` unchanged.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_check import setup_vllm_process  # noqa: E402


def main(argv: list[str]) -> None:
    setup_vllm_process(emulate_avx2=False)
    import vllm

    vllm.LLM = functools.partial(vllm.LLM, enforce_eager=True)
    from r1v_quant.cli.main import main as cli

    cli(["eval", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
