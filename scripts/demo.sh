#!/usr/bin/env bash
# Set up r1v-quant in ./.venv and run the main job offline, at settings small enough for a few
# minutes on 2 CPU cores: quantise the small trained R1V with the built-in calibration set,
# measure what it cost, chat with it. (awq's own defaults are the ones for real models.)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/r1v-quant ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, the build that fits this machine, so the project's dependencies do not pull another.
  scripts/install-torch.sh .venv/bin/python
  .venv/bin/python -m pip install --quiet -e '.[test]'
fi
export PATH="$PWD/.venv/bin:$PATH"
model=models/r1v-mini suite=r1v-mini
if [ ! -f "$model/config.json" ]; then
  # an installed package without the source tree's trained model: a random one of the same layout
  model=out/r1v-tiny suite=builtin
  r1v-quant make-tiny "$model" --force
fi
mkdir -p out
# 4 samples and a 10-point grid; eval measures the KL below, so awq's own check is skipped
r1v-quant awq --model "$model" --calib builtin --samples 4 --grid 10 --no-kl-check --out out/r1v-mini-awq --force
r1v-quant inspect out/r1v-mini-awq
r1v-quant eval --reference "$model" --candidate out/r1v-mini-awq --suite "$suite" --limit 12 \
  --baseline rtn --max-new-tokens 64 --json out/eval.json --markdown out/eval.md --plot out/eval.png
# a held-out picture of a skill r1v-mini has (counting a shape's sides), never trained on
python - <<'PY'
from r1v_quant.calib.builtin import builtin_item, render
item = next(builtin_item("eval", 0, i) for i in range(3, 800, 8) if builtin_item("eval", 0, i).answer == "5")
render(item).save("out/shape.png")
PY
r1v-quant chat --model out/r1v-mini-awq --image out/shape.png \
  --prompt $'Question: <image> How many sides does the shape have?\n' --greedy --max-new-tokens 96
