"""Peak memory of `r1v-quant awq` against model depth: 8 decoder layers vs 2 of the same width.

Each run is a fresh process, so its peak RSS (ru_maxrss of the child) is its own. Layers are
streamed from safetensors one at a time, so the ratio should stay near 1; a loader that kept the
whole model resident would grow with depth.

    python benchmarks/memory.py [--width 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny


def quantise_peak_rss(model: Path, out: Path, samples: int) -> tuple[float, float]:
    """Run the awq command in a child process; return (peak RSS in MiB, seconds)."""
    cmd = [sys.executable, "-m", "r1v_quant.cli.main", "awq", "--model", str(model), "--out", str(out),
           "--samples", str(samples), "--max-tokens", "2048", "--grid", "10", "--no-kl-check",
           "--device", "cpu", "--max-shard-size", "64MiB"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak < before:
        raise RuntimeError("peak RSS went down between runs; run each depth in its own process")
    return peak / 1024, seconds


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024, help="LLM hidden size (multiple of 128).")
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # ru_maxrss of children is a running maximum over all of them, so each depth is measured
        # from a fresh parent: this script re-invoked with --_one.
        for layers in (2, 8):
            model = make_tiny(root / f"m{layers}", seed=0, sizes=TinySizes(
                llm_width=args.width, intermediate=args.intermediate, llm_layers=layers, heads=args.width // 128,
                kv_heads=max(1, args.width // 512)))
            probe = [sys.executable, __file__, "--_one", str(model), str(root / f"o{layers}"), str(args.samples)]
            out = subprocess.run(probe, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            peak, seconds = map(float, out.split())
            rows[layers] = {"layers": layers, "weights_mb": weight_bytes(model) / 2**20, "peak_rss_mb": peak,
                            "seconds": seconds}
    ratio = rows[8]["peak_rss_mb"] / rows[2]["peak_rss_mb"]
    weights_ratio = rows[8]["weights_mb"] / rows[2]["weights_mb"]
    print(f"{'layers':>6} {'weights MiB':>12} {'peak RSS MiB':>13} {'seconds':>8}")
    for r in rows.values():
        print(f"{r['layers']:>6} {r['weights_mb']:>12.1f} {r['peak_rss_mb']:>13.1f} {r['seconds']:>8.1f}")
    print(f"peak RSS 8 layers / 2 layers: {ratio:.3f} (weights grew {weights_ratio:.2f}x; bound 1.25)")
    if args.json:
        args.json.write_text(json.dumps({"rows": list(rows.values()), "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_one":
        model, out, samples = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
        peak, seconds = quantise_peak_rss(model, out, samples)
        print(peak, seconds)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        main()
