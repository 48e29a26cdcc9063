"""Held-out KL after `awq` at several text-token shares of the calibration set (`--text-share`).

Quantises one checkpoint at each share with the same token cap and prints the calibration
composition and the mean KL(source || export) per token on the first held-out built-in eval
questions, with their pictures and as text only, all measured in this run. Round-to-nearest
(same group size) is the reference row.

    python benchmarks/text_share.py [--model DIR] [--shares 0,0.25,0.5] [--samples 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from r1v_quant.evals.quick import heldout_prompts, prompt_kl
from r1v_quant.model.r1v import load_model
from r1v_quant.quant.baselines import build_rtn
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
from r1v_quant.quant.run import quantize_checkpoint
from r1v_quant.synthetic.checkpoint import make_tiny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Checkpoint (default: a make-tiny checkpoint built here).")
    ap.add_argument("--shares", default="0,0.25,0.5", help="Comma-separated --text-share values.")
    ap.add_argument("--samples", type=int, default=32, help="Built-in samples (enough that the token cap binds).")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=6144)
    ap.add_argument("--grid", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or make_tiny(root / "tiny", seed=0)
        ref = load_model(model, device="cpu")
        with_images, text_only = heldout_prompts(ref, args.prompts)
        rows = {}
        rtn = build_rtn(model, 128, "cpu", "bf16")
        rows["round-to-nearest"] = {"kl_text": prompt_kl(ref.model, rtn.model, text_only),
                                    "kl_images": prompt_kl(ref.model, rtn.model, with_images)}
        del rtn
        for share in (float(s) for s in args.shares.split(",")):
            out = root / f"share-{share}"
            recipe = CalibrationRecipe("builtin", samples=args.samples, seq_len=args.seq_len,
                                       max_tokens=args.max_tokens, text_share=share)
            start = time.perf_counter()
            result = quantize_checkpoint(str(model), out, AWQSettings(grid=args.grid), recipe, device="cpu",
                                         compute_dtype="float32")
            seconds = time.perf_counter() - start
            cand = load_model(out, device="cpu")
            row = {"kl_text": prompt_kl(ref.model, cand.model, text_only),
                   "kl_images": prompt_kl(ref.model, cand.model, with_images),
                   "awq_s": seconds, "tokens": result.tokens,
                   "samples": result.extra["calibration samples"], "text share": result.extra["calibration text share"]}
            rows[f"--text-share {share:g}"] = row
            print(f"--text-share {share:g}: {row}", flush=True)
            del cand
    base = rows["round-to-nearest"]
    print(f"\n{'calibration':<20} {'tokens':>7} {'KL text':>9} {'KL images':>10} {'sum':>8} {'vs RTN text':>12} "
          f"{'vs RTN images':>14}")
    for label, r in rows.items():
        print(f"{label:<20} {r.get('tokens', ''):>7} {r['kl_text']:>9.5f} {r['kl_images']:>10.5f} "
              f"{r['kl_text'] + r['kl_images']:>8.5f} {r['kl_text'] / base['kl_text']:>12.2f} "
              f"{r['kl_images'] / base['kl_images']:>14.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
