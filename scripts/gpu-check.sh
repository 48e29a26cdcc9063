#!/usr/bin/env bash
# One command on a machine with one CUDA GPU (H100/H200: under 8 minutes, nothing downloaded):
# awq on a real-width slice with per-layer time and peak memory beside the memory model, the same with
# --rounding gptq on a one-layer slice, the int4 matmul benchmark at the 38B shapes, and a chat with
# the export; a JSON summary at the end
# (--json FILE, else $OUT/gpu-check.json when $OUT is set).
#
#   scripts/gpu-check.sh                       # on CUDA
#   scripts/gpu-check.sh --device cpu --tiny   # dry run of the same steps at small widths
#
# The machine needs torch, transformers, safetensors, tokenizers, typer, rich and Pillow; the
# project itself is installed without dependencies when it is not importable yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import r1v_quant.cli.main' >/dev/null 2>&1; then
    echo "[gpu-check] installing the project (pip install --no-deps -e .)"
    # --no-build-isolation uses the setuptools already there: an isolated build would need the network.
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || "$PY" -m pip install --quiet --no-deps -e .
fi
exec "$PY" benchmarks/gpu_check.py "$@"
