#!/usr/bin/env bash
# Install torch 2.13 into the environment of the python given ($1), the build that fits this machine:
# with an NVIDIA GPU the CUDA build from PyPI; without one the CPU build, from wherever pip finds it
# (a local wheel or index, then PyTorch's CPU index), and only when neither answers the PyPI build,
# saying so first, since on Linux that is the CUDA build with its nvidia-* packages (about 3 GB).
set -euo pipefail
py="$1"
version=2.13.0
if "$py" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$version'))" 2>/dev/null; then
  exit 0
fi
pip=("$py" -m pip install --quiet)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "installing torch $version, CUDA build (an NVIDIA GPU is present), from PyPI"
  exec "${pip[@]}" "torch==$version"
fi
echo "installing torch $version, CPU build (no NVIDIA GPU found)"
# A CPU build pip can already see (a wheelhouse, a mirror): the +cpu local version is never on PyPI.
if "${pip[@]}" "torch==$version+cpu" 2>/dev/null; then
  exit 0
fi
echo "  no CPU build among pip's sources; trying https://download.pytorch.org/whl/cpu"
if "${pip[@]}" --timeout 15 --retries 1 --index-url https://download.pytorch.org/whl/cpu "torch==$version" 2>/dev/null; then
  exit 0
fi
echo "  download.pytorch.org cannot be reached: installing torch $version from PyPI instead, which on Linux is"
echo "  the CUDA build plus its nvidia-* packages (about 3 GB); it runs on the CPU too."
exec "${pip[@]}" "torch==$version"
