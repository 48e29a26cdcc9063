"""Time AWQLinear (4-bit, group 128) against a bf16 nn.Linear on the 38B LLM's layer shapes.

    python benchmarks/matmul.py [--device cpu|cuda] [--json FILE] [--threads N] [--small]

Both run in the same process on the same inputs, called alternately; the table reports median
milliseconds and the speedup of int4 over bf16 (> 1 means int4 is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from r1v_quant.quant.baselines import rtn_linear

# (in_features, out_features) of Skywork-R1V-38B's Qwen2 linears: q/o, gate/up, down.
SHAPES = [(5120, 5120), (5120, 27648), (27648, 5120)]
# The same three shapes at an eighth of the widths: a quick run of the same code (a dry run on a CPU).
SMALL_SHAPES = [(i // 8, o // 8) for i, o in SHAPES]
BATCHES = [1, 128]
GROUP_SIZE = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def paired_median_ms(fn_a, fn_b, device: torch.device, budget_s: float, max_repeats: int) -> tuple[float, float]:
    """Median wall times of fn_a and fn_b, called alternately so both see the same machine load.

    After one warmup call each, repeats as many pairs as fit in budget_s (at least 3).
    """
    first = _once(fn_a, device) + _once(fn_b, device)
    pair = _once(fn_a, device) + _once(fn_b, device)
    repeats = max(3, min(max_repeats, int(budget_s / max(min(first, pair), 1e-6))))
    a, b = [], []
    for _ in range(repeats):
        a.append(_once(fn_a, device))
        b.append(_once(fn_b, device))
    return 1000 * statistics.median(a), 1000 * statistics.median(b)


def run(device: torch.device, budget_s: float, max_repeats: int, shapes=SHAPES) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for in_features, out_features in shapes:
        dense = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
        quant = rtn_linear(dense, GROUP_SIZE)
        for batch in BATCHES:
            x = torch.randn(batch, in_features, device=device, dtype=torch.bfloat16)
            with torch.inference_mode():
                ref, got = dense(x).float(), quant(x).float()
                path = "int4 kernel" if quant.prepared else "dequantise"
                bf16_ms, int4_ms = paired_median_ms(lambda d=dense, x=x: d(x), lambda q=quant, x=x: q(x),
                                                    device, budget_s, max_repeats)
            rows.append({
                "in": in_features, "out": out_features, "batch": batch,
                "bf16_ms": round(bf16_ms, 3), "int4_ms": round(int4_ms, 3),
                "speedup": round(bf16_ms / int4_ms, 2), "int4_path": path,
                "rel_err": round(((got - ref).norm() / ref.norm()).item(), 4),
            })
            print(
                f"{in_features:>6} x {out_features:<6} batch {batch:>4}: bf16 {bf16_ms:9.3f} ms  "
                f"int4 {int4_ms:9.3f} ms  speedup {bf16_ms / int4_ms:5.2f}x  ({path}, rel err {rows[-1]['rel_err']})",
                flush=True,
            )
        del dense, quant
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per shape and batch")
    parser.add_argument("--max-repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--small", action="store_true", help="the shapes at an eighth of the 38B widths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    device = torch.device(args.device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "group_size": GROUP_SIZE,
        "shapes": "38B / 8" if args.small else "38B",
    }
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = run(device, args.budget, args.max_repeats, SMALL_SHAPES if args.small else SHAPES)
    print("\n| in x out | batch | bf16 ms | int4 ms | int4 speedup |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['in']} x {r['out']} | {r['batch']} | {r['bf16_ms']:.3f} | {r['int4_ms']:.3f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
