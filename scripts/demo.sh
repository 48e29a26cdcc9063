#!/usr/bin/env bash
# Set up r1v-quant in ./.venv and run the main job on the built-in defaults, offline:
# quantise the small trained R1V with the built-in calibration set, measure what it cost, chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/r1v-quant ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e '.[test]'
fi
export PATH="$PWD/.venv/bin:$PATH"
model=models/r1v-mini
if [ ! -f "$model/config.json" ]; then
  model=out/r1v-tiny
  r1v-quant make-tiny "$model" --force
fi
mkdir -p out
r1v-quant awq --model "$model" --calib builtin --samples 32 --out out/r1v-mini-awq --force
r1v-quant inspect out/r1v-mini-awq
r1v-quant eval --reference "$model" --candidate out/r1v-mini-awq --suite builtin --limit 48 \
  --baseline rtn --max-new-tokens 160 --json out/eval.json --markdown out/eval.md --plot out/eval.png
python - <<'PY'
from PIL import Image, ImageDraw
im = Image.new("RGB", (448, 448), "white")
d = ImageDraw.Draw(im)
for x in (60, 200, 330):
    d.ellipse((x, 180, x + 70, 250), fill="red")
im.save("out/three-red-circles.png")
PY
r1v-quant chat --model out/r1v-mini-awq --image out/three-red-circles.png \
  --prompt "How many red circles are there?" --greedy --max-new-tokens 96
