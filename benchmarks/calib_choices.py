"""How `awq`'s own choices move accuracy: image/text balancing and what feeds each layer.

Quantises one checkpoint four ways (round-to-nearest, and AWQ unbalanced, balanced, balanced with
float propagation) and prints the mean KL(source || export) per token on held-out builtin prompts,
with their images and text-only, all measured in this run.

    python benchmarks/calib_choices.py [--model DIR] [--samples 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from r1v_quant.evals.quick import heldout_prompts, prompt_kl
from r1v_quant.model.r1v import load_model
from r1v_quant.quant.baselines import build_rtn
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
from r1v_quant.quant.run import quantize_checkpoint
from r1v_quant.synthetic.checkpoint import make_tiny

VARIANTS = {
    "AWQ, unbalanced, quantised propagation": dict(balance=False, propagate="quantized"),
    "AWQ, balanced, quantised propagation (default)": dict(balance=True, propagate="quantized"),
    "AWQ, balanced, float propagation": dict(balance=True, propagate="float"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Checkpoint (default: a make-tiny checkpoint built here).")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=6)
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
        rows["round-to-nearest"] = (prompt_kl(ref.model, rtn.model, text_only), prompt_kl(ref.model, rtn.model, with_images))
        del rtn
        for index, (label, opts) in enumerate(VARIANTS.items()):
            out = root / f"variant-{index}"
            settings = AWQSettings(grid=10, **opts)
            recipe = CalibrationRecipe("builtin", samples=args.samples, seq_len=2048, max_tokens=args.max_tokens)
            quantize_checkpoint(str(model), out, settings, recipe, device="cpu")
            cand = load_model(out, device="cpu")
            rows[label] = (prompt_kl(ref.model, cand.model, text_only), prompt_kl(ref.model, cand.model, with_images))
            print(f"{label}: text {rows[label][0]:.4f}  images {rows[label][1]:.4f}", flush=True)
    base_text, base_img = rows["round-to-nearest"]
    print(f"\n{'calibration':<48} {'KL text':>9} {'KL images':>10} {'vs RTN text':>12} {'vs RTN images':>14}")
    for label, (t, i) in rows.items():
        print(f"{label:<48} {t:>9.4f} {i:>10.4f} {t / base_text:>12.2f} {i / base_img:>14.2f}")
    if args.json:
        args.json.write_text(json.dumps({k: {"kl_text": t, "kl_images": i} for k, (t, i) in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
