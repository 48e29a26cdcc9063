#!/usr/bin/env bash
# Create (or complete) the environments of the peer tools that benchmarks/peers.py compares
# r1v-quant with. Each lives in a virtual environment of its own, because each pins versions
# the project's environment must not get:
#
#   .venv-autoawq  torch 2.13.0 (CPU) + AutoAWQ 0.2.9, installed with --no-deps (its
#                  declared dependencies pull a CUDA torch and old transformers), plus the
#                  few packages it imports: transformers, accelerate, datasets, zstandard...
#   .venv-llmc     torch 2.13.0 (CPU) + llmcompressor 0.14.0.1 (it downgrades transformers
#                  to 5.17 and brings compressed-tensors).
#   .venv-autoround  torch 2.13.0 (CPU) + auto-round 0.16.1 (Intel's signed-gradient rounding);
#                  its checkpoints are exported in the AutoAWQ layout and converted to R1V's.
#   .venv-nf4      only with --nf4: not an environment but a --target folder holding
#                  bitsandbytes 0.50.2 for the NF4 baseline; peers.py puts it on sys.path
#                  when the project's environment has no bitsandbytes of its own.
#
# Idempotent: every step checks first and says whether it did something or found it done.
# All these folders match `.venv-*/` in .gitignore.
#
# Usage: benchmarks/peers-env.sh [--autoawq] [--llmc] [--autoround] [--nf4]
#        (no flag: --autoawq --llmc --autoround)
# Env:   PYTHON=python3 TORCH_VERSION=2.13.0 AUTOAWQ_VERSION=0.2.9 LLMC_VERSION=0.14.0.1
#        AUTOROUND_VERSION=0.16.1 NF4_VERSION=0.50.2 PROJECT_PY=.venv/bin/python
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
AUTOAWQ_VERSION="${AUTOAWQ_VERSION:-0.2.9}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
NF4_VERSION="${NF4_VERSION:-0.50.2}"
AUTOROUND_VERSION="${AUTOROUND_VERSION:-0.16.1}"

want_awq=0 want_llmc=0 want_ar=0 want_nf4=0
for arg in "$@"; do
    case "$arg" in
        --autoawq) want_awq=1 ;;
        --llmc) want_llmc=1 ;;
        --autoround) want_ar=1 ;;
        --nf4) want_nf4=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "[peers-env] unknown option $arg (use --autoawq, --llmc, --autoround, --nf4)" >&2; exit 2 ;;
    esac
done
if ((want_awq + want_llmc + want_ar + want_nf4 == 0)); then want_awq=1 want_llmc=1 want_ar=1; fi

say() { printf '[peers-env] %s\n' "$*"; }

make_venv() {  # make_venv DIR
    local venv="$ROOT/$1"
    if [[ -x "$venv/bin/python" ]]; then
        say "environment $1 exists ($("$venv/bin/python" --version 2>&1))"
    else
        say "creating $1 with $PYTHON"
        "$PYTHON" -m venv "$venv"
        pip_in "$1" install --quiet --upgrade pip
    fi
}

pip_in() {  # pip_in VENV ARGS...: pip with its chatter in VENV/peers-env.log; the tail is shown on failure
    local venv="$ROOT/$1"; shift
    local log="$venv/peers-env.log"
    if ! "$venv/bin/python" -m pip "$@" >>"$log" 2>&1; then
        say "pip $* failed in $venv; last lines of $log:"
        tail -n 30 "$log" >&2
        exit 1
    fi
}

dist_version() {  # dist_version VENV DIST: the installed version, or nothing
    "$ROOT/$1/bin/python" - "$2" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

ensure() {  # ensure VENV DIST VERSION-PREFIX PIP-ARGS...: install unless DIST already has that version
    local venv="$1" dist="$2" want="$3"; shift 3
    local have; have="$(dist_version "$venv" "$dist")"
    if [[ -n "$have" && "$have" == "$want"* ]]; then
        say "$venv: $dist $have already installed"
    else
        say "$venv: installing $*"
        pip_in "$venv" install --quiet "$@"
    fi
}

ensure_torch() {  # ensure_torch VENV: the CPU build first, so no later install pulls a CUDA torch
    local have; have="$(dist_version "$1" torch)"
    if [[ "$have" == "$TORCH_VERSION"* ]]; then
        say "$1: torch $have already installed"
        return
    fi
    # The +cpu local version is never on PyPI: pip finds it on local disk (find-links, a mirror)
    # or on PyTorch's CPU index; the plain PyPI build (CUDA, ~3 GB) is the last resort.
    say "$1: installing torch==$TORCH_VERSION+cpu"
    if ! "$ROOT/$1/bin/python" -m pip install --quiet "torch==$TORCH_VERSION+cpu" >>"$ROOT/$1/peers-env.log" 2>&1; then
        say "$1: no local CPU build of torch; trying https://download.pytorch.org/whl/cpu"
        pip_in "$1" install --quiet --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
    fi
    # Every later install keeps this torch: pip would otherwise replace it to satisfy a pin.
    "$ROOT/$1/bin/python" -c 'import torch; print("torch==" + torch.__version__)' >"$ROOT/$1/torch-pin.txt"
}

check() {  # check VENV PYTHON-CODE
    say "$1 check: $(cd / && "$ROOT/$1/bin/python" -c "$2" 2>&1 | tail -n 1)"
}

if ((want_awq)); then
    V=.venv-autoawq
    make_venv "$V"
    ensure_torch "$V"
    # AutoAWQ's own requirements name a CUDA torch and transformers<=4.47; it runs on CPU with
    # transformers 5 once the modules it imports are present, so its dependencies are listed here.
    ensure "$V" transformers "5." -c "$V/torch-pin.txt" "transformers>=5.16,<6" "accelerate" "datasets" "zstandard" \
        "safetensors" "sentencepiece" "tokenizers" "huggingface_hub" "numpy" "psutil"
    ensure "$V" autoawq "$AUTOAWQ_VERSION" --no-deps "autoawq==$AUTOAWQ_VERSION"
    check "$V" 'import torch, transformers, awq; print("torch", torch.__version__, "| transformers", transformers.__version__, "| autoawq", awq.__version__)'
fi

if ((want_llmc)); then
    V=.venv-llmc
    make_venv "$V"
    ensure_torch "$V"
    ensure "$V" llmcompressor "$LLMC_VERSION" -c "$V/torch-pin.txt" "llmcompressor==$LLMC_VERSION"
    check "$V" 'import torch, transformers, llmcompressor, compressed_tensors as ct; print("torch", torch.__version__, "| transformers", transformers.__version__, "| llmcompressor", llmcompressor.__version__, "| compressed-tensors", ct.__version__)'
fi

if ((want_ar)); then
    V=.venv-autoround
    make_venv "$V"
    ensure_torch "$V"
    ensure "$V" auto-round "$AUTOROUND_VERSION" -c "$V/torch-pin.txt" "auto-round==$AUTOROUND_VERSION"
    check "$V" 'import torch, transformers, auto_round; print("torch", torch.__version__, "| transformers", transformers.__version__, "| auto-round", auto_round.__version__)'
fi

if ((want_nf4)); then
    # Not an environment: bitsandbytes alone in a folder that benchmarks/peers.py puts on
    # sys.path when the project's environment lacks it, so that environment stays as it is.
    # (bitsandbytes needs only torch, numpy and packaging, which the project already has.)
    T="$ROOT/.venv-nf4"
    PROJECT_PY="${PROJECT_PY:-$ROOT/.venv/bin/python}"
    have="$(cd / && PYTHONPATH="$T" "$PROJECT_PY" -c 'import bitsandbytes as b; print(b.__version__)' 2>/dev/null | tail -n 1 || true)"
    if [[ -n "$have" && "$have" == "$NF4_VERSION"* ]]; then
        say ".venv-nf4: bitsandbytes $have already there"
    else
        say ".venv-nf4: installing bitsandbytes==$NF4_VERSION (no dependencies) into $T"
        mkdir -p "$T"
        if ! "$PROJECT_PY" -m pip install --quiet --no-deps --upgrade --target "$T" "bitsandbytes==$NF4_VERSION" >>"$T/peers-env.log" 2>&1; then
            say "pip failed; last lines of $T/peers-env.log:"; tail -n 30 "$T/peers-env.log" >&2; exit 1
        fi
    fi
    say ".venv-nf4 check: $(cd / && PYTHONPATH="$T" "$PROJECT_PY" -c 'import torch, bitsandbytes as b; print("torch", torch.__version__, "| bitsandbytes", b.__version__)' 2>&1 | tail -n 1)"
fi
say "done"
