#!/usr/bin/env python
"""Train r1v-mini, the small Skywork-R1V with real skills, and write its checkpoint.

    python scripts/train-small.py                 # writes models/r1v-mini (pass --force to replace it)
    python scripts/train-small.py --out /tmp/m --steps 100 --eval-images 30   # a quick look

Deterministic: the same arguments and thread count write the same weights. Progress goes
to stdout; at the end come held-out accuracies with 95% Wilson intervals next to chance,
and the folder gets a ``training.json`` recording the recipe, the times and the results.
"""

from __future__ import annotations

import os

# Set before torch loads its OpenMP runtime: on a shared machine, threads that spin while
# waiting for a descheduled partner burn the cores the other thread needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The training code lives with the tests (tests/helpers), not in the installed package.
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from helpers.mini import MINI_DIR  # noqa: E402
from helpers.train import (  # noqa: E402
    TrainSettings,
    accuracy_table,
    answer_questions,
    settings_record,
    train,
    write_checkpoint,
)
from r1v_quant.calib.skills import heldout_questions  # noqa: E402
from r1v_quant.errors import UserError  # noqa: E402
from r1v_quant.output import check_out_dir, staged_dir  # noqa: E402

DEFAULTS = TrainSettings()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train r1v-mini on CPU and write its checkpoint.")
    p.add_argument("--out", type=Path, default=MINI_DIR, help=f"checkpoint folder (default {MINI_DIR})")
    p.add_argument("--force", action="store_true", help="replace --out if it holds files")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads,
                   help="torch threads; the weights are reproducible for a given count")
    p.add_argument("--eval-images", type=int, default=300, help="held-out picture questions (split 'eval')")
    p.add_argument("--eval-text", type=int, default=60, help="held-out text questions")
    p.add_argument("--suite", type=int, default=64,
                   help="also answer the first N questions of the built-in eval suite, all families (0: skip)")
    return p.parse_args(argv)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'family':<14} {'n':>4}  {'accuracy':>8}  {'95% interval':>14}  {'chance':>6}")
    for r in rows:
        print(f"  {r['family']:<14} {r['n']:>4}  {r['accuracy']:>7.1f}%  "
              f"{'[' + format(r['lo'], '.1f') + ', ' + format(r['hi'], '.1f') + ']':>14}  {r['chance']:>5.1f}%")


def suite_questions(count: int) -> list:
    """The questions ``r1v-quant eval --suite builtin`` asks, every family included."""
    from r1v_quant.calib.builtin import builtin_item, builtin_samples

    samples = builtin_samples(count, seed=0, split="eval")
    return [(s, builtin_item("eval", 0, i).family) for i, s in enumerate(samples)]


def main(argv: list[str] | None = None) -> int:
    from r1v_quant.model.r1v import load_model

    args = parse_args(argv)
    settings = TrainSettings(steps=args.steps, seed=args.seed, threads=args.threads)
    try:
        check_out_dir(args.out, args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall0, cpu0 = time.perf_counter(), time.process_time()
    print(f"training r1v-mini: {settings.steps} steps of {settings.image_batch} pictures "
          f"({', '.join(settings.families)}) and {settings.text_batch} text questions, "
          f"{settings.threads} thread(s), seed {settings.seed}", flush=True)
    window: list[float] = []

    def progress(phase: str, done: int, total: int, loss: float | None, elapsed: float) -> None:
        if loss is not None:
            window.append(loss)
        every = {"pictures": 1000, "align": 250, "train": 50}[phase]
        if done % every and done != total and done != 1:
            return
        shown = f"  loss {sum(window) / len(window):.4f}" if window else ""
        print(f"  {phase:<8} {done:>5}/{total}{shown}  elapsed {_minutes(elapsed)}  "
              f"cpu {_minutes(time.process_time() - cpu0)}", flush=True)
        window.clear()

    with staged_dir(args.out, force=args.force) as tmp:
        trained = train(settings, tmp, progress)
        write_checkpoint(trained, tmp)
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        params = sum(p.numel() for p in trained.model.parameters())
        print(f"trained {params / 1e6:.2f}M parameters in {_minutes(trained.seconds)} "
              f"(cpu {_minutes(trained.cpu_seconds)}); checkpoint {size / 1e6:.1f} MB", flush=True)

        # Scored from the bf16 files just written, through the same loader users have.
        loaded = load_model(tmp, device="cpu")
        eval0 = time.perf_counter()
        questions = heldout_questions(args.eval_images, args.eval_text, settings.families, seed=0)
        results = answer_questions(loaded, questions)
        heldout = accuracy_table(results)
        print_table(f"held-out accuracy (greedy, built-in split 'eval' of {', '.join(settings.families)}, "
                    f"plus held-out text questions)", heldout)
        suite_rows: list[dict] = []
        if args.suite:
            suite_rows = accuracy_table(answer_questions(loaded, suite_questions(args.suite)))
            print_table(f"`r1v-quant eval --suite builtin` questions ({args.suite}, all families; "
                        "only the first three families were trained)", suite_rows)
        record = {
            "recipe": settings_record(settings),
            "parameters": params,
            "checkpoint_bytes": size,
            "train_seconds": round(trained.seconds, 1),
            "train_cpu_seconds": round(trained.cpu_seconds, 1),
            "eval_seconds": round(time.perf_counter() - eval0, 1),
            "final_loss": round(sum(trained.losses[-25:]) / len(trained.losses[-25:]), 4),
            "heldout": heldout,
            "builtin_suite": suite_rows,
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out} in {_minutes(time.perf_counter() - wall0)} "
          f"(cpu {_minutes(time.process_time() - cpu0)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
