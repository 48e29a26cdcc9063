#!/usr/bin/env python
"""Fine-tune r1v-mini into r1v-outliers, the small R1V with LLM-like activation outliers.

    python scripts/train-outliers.py --force      # rewrites models/r1v-outliers
    python scripts/train-outliers.py --out /tmp/m --steps 100 --eval 80   # a quick look

Deterministic: the same arguments and thread count write the same weights. At the end come
the outlier ratios per layer, the reading weights' column norms, and held-out accuracy on
the ``r1v-outliers`` suite with 95% Wilson intervals; the folder gets a ``training.json``.
"""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: spinning threads burn a shared machine's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The training code lives with the tests (tests/helpers), not in the installed package.
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from helpers.mini import MINI_DIR  # noqa: E402
from helpers.outlier_stats import column_norm_ratios, meets_threshold  # noqa: E402
from helpers.outliers import (  # noqa: E402
    OUTLIERS_DIR,
    OutlierSettings,
    finetune,
    measure_ratios,
    settings_record,
)
from helpers.train import accuracy_table, answer_questions, write_checkpoint  # noqa: E402
from r1v_quant.calib.chains import CHANCE, FAMILY, outlier_heldout  # noqa: E402
from r1v_quant.calib.skills import TEXT_FAMILIES  # noqa: E402
from r1v_quant.errors import UserError  # noqa: E402
from r1v_quant.output import check_out_dir, staged_dir  # noqa: E402

RATIO_QUESTIONS = 16   # held-out prompts the outlier ratios are measured on
THRESHOLD = 50.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune r1v-mini into r1v-outliers on CPU.")
    p.add_argument("--out", type=Path, default=OUTLIERS_DIR, help=f"checkpoint folder (default {OUTLIERS_DIR})")
    p.add_argument("--source", type=Path, default=MINI_DIR, help="the r1v-mini checkpoint to start from")
    p.add_argument("--force", action="store_true", help="replace --out if it holds files")
    p.add_argument("--eval", type=int, default=400, help="held-out questions of the r1v-outliers suite")
    for f in fields(OutlierSettings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return p.parse_args(argv)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def main(argv: list[str] | None = None) -> int:
    from r1v_quant.model.r1v import load_model

    args = parse_args(argv)
    settings = OutlierSettings(**{f.name: getattr(args, f.name) for f in fields(OutlierSettings)})
    try:
        check_out_dir(args.out, args.force)
        if not (args.source / "config.json").is_file():
            raise UserError(f"{args.source} holds no r1v-mini checkpoint to fine-tune (no config.json).")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall0, cpu0 = time.perf_counter(), time.process_time()
    print(f"fine-tuning {args.source.name} into {args.out.name}: {settings.steps} steps, "
          f"{settings.channels} outlier channels at {settings.gain:g}x the median norm gain, "
          f"{settings.threads} thread(s), seed {settings.seed}", flush=True)
    window: list[float] = []

    def progress(phase: str, done: int, total: int, loss: float | None, elapsed: float) -> None:
        if loss is not None:
            window.append(loss)
        every = {"pictures": 800, "train": 50}[phase]
        if done % every and done != total and done != 1:
            return
        shown = f"  loss {sum(window) / len(window):.4f}" if window else ""
        print(f"  {phase:<8} {done:>5}/{total}{shown}  elapsed {_minutes(elapsed)}  "
              f"cpu {_minutes(time.process_time() - cpu0)}", flush=True)
        window.clear()

    with staged_dir(args.out, force=args.force) as tmp:
        trained, channels = finetune(settings, args.source, progress)
        write_checkpoint(trained, tmp)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        print(f"fine-tuned in {_minutes(trained.seconds)} (cpu {_minutes(trained.cpu_seconds)}); "
              f"checkpoint {size / 1e6:.1f} MB; outlier channels {channels}", flush=True)

        # Everything below is measured on the bf16 files just written, through the users' loader.
        loaded = load_model(tmp, device="cpu")
        questions = outlier_heldout(args.eval, seed=0)
        ratios = measure_ratios(loaded, [s for s, _ in questions[:RATIO_QUESTIONS]])
        columns = column_norm_ratios(loaded.model, channels)
        above, inputs = meets_threshold(ratios, THRESHOLD)
        print("\noutlier ratio (max/median of per-channel mean |x|) at the decoder inputs")
        for r in ratios:
            print(f"  layer {r['layer']}: q/k/v input {r['attn']:>7.1f} (channel {r['attn_top']}), "
                  f"gate/up input {r['mlp']:>7.1f} (channel {r['mlp_top']})")
        print(f"  {above} of {inputs} inputs at or above {THRESHOLD:g}")
        flat = [v for row in columns for v in row["ratios"]]
        print(f"reading columns of the outlier channels: {min(flat):.2f} to {max(flat):.2f} x the median column norm")
        eval0 = time.perf_counter()
        heldout = accuracy_table(answer_questions(loaded, questions, max_new_tokens=96), {FAMILY: CHANCE},
                                 (*TEXT_FAMILIES, FAMILY))
        print("\nheld-out accuracy (greedy, suite r1v-outliers)")
        for r in heldout:
            print(f"  {r['family']:<14} {r['n']:>4}  {r['accuracy']:>5.1f}%  [{r['lo']:.1f}, {r['hi']:.1f}]  "
                  f"chance {r['chance']:.1f}%")
        record = {
            "source": args.source.name,
            "recipe": settings_record(settings, channels),
            "parameters": sum(p.numel() for p in trained.model.parameters()),
            "checkpoint_bytes": size,
            "train_seconds": round(trained.seconds, 1),
            "train_cpu_seconds": round(trained.cpu_seconds, 1),
            "eval_seconds": round(time.perf_counter() - eval0, 1),
            "final_loss": round(sum(trained.losses[-25:]) / len(trained.losses[-25:]), 4),
            "outlier_ratios": {"questions": RATIO_QUESTIONS, "threshold": THRESHOLD, "above": above,
                               "inputs": inputs, "layers": ratios},
            "column_norm_ratios": columns,
            "heldout": heldout,
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out} in {_minutes(time.perf_counter() - wall0)} (cpu {_minutes(time.process_time() - cpu0)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
