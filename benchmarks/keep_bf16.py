"""Accuracy and KL against export bytes for `awq --keep-bf16` shares and `--group-size 64` (BENCHMARKS.md).

Reads, from one folder, the exports (`k0`, `k1`, ... for --keep-bf16 0%, 1%, ...; `g64`) and the JSON
each `r1v-quant eval --candidate FOLDER/NAME --json FOLDER/NAME.eval.json` wrote against the same cached
reference, and prints one Markdown row per variant: export tensor bytes, the share of decoder-linear
parameters kept, KL, top-1 agreement, accuracy, the change against the reference (the eval's paired
bootstrap) and against the all-4-bit export `k0` on the same questions (paired bootstrap here).

    python benchmarks/keep_bf16.py runs/keep/outliers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from r1v_quant.deploy.inspect_export import inspect
from r1v_quant.evals.stats import paired_difference

ORDER = ("k0", "k1", "k2", "k5", "k10", "g64")
LABEL = {"k0": "all 4-bit g128 (`--keep-bf16 0%`)", "k1": "`--keep-bf16 1%`", "k2": "`--keep-bf16 2%`",
         "k5": "`--keep-bf16 5%`", "k10": "`--keep-bf16 10%`", "g64": "all 4-bit g64 (`--group-size 64`)"}


def _correct(data: dict, who: str) -> list[bool]:
    return [bool(q[who]["correct"]) for q in data["questions"]]


def rows(folder: Path) -> list[str]:
    base = json.loads((folder / "k0.eval.json").read_text()) if (folder / "k0.eval.json").is_file() else None
    out = ["| variant | linear params kept | export tensors MB | KL (nats/token) | top-1 agree % | accuracy % [95% CI] "
           "| Δ vs reference, points [95% paired CI] | Δ vs all 4-bit g128 [95% paired CI] |",
           "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    ref_row = None
    for name in ORDER:
        path = folder / f"{name}.eval.json"
        if not path.is_file() or not (folder / name).is_dir():
            continue
        data = json.loads(path.read_text())
        models = {m["role"]: m for m in data["models"]}
        comp = data["comparisons"][0]
        report = json.loads((folder / name / "r1v_quant_report.json").read_text())
        share = report.get("kept_bf16", {}).get("params_share", 0.0)
        size = inspect(folder / name).total_bytes
        ref = models["reference"]
        if ref_row is None:
            ref_row = (f"| reference, bf16 | - | - | 0 | 100.0 | {ref['accuracy']:.1f} [{ref['accuracy_lo']:.1f}, "
                       f"{ref['accuracy_hi']:.1f}] | - | - |")
            out.append(ref_row)
        cand = models["candidate"]
        vs_k0 = "-"
        if base is not None and name != "k0":
            a, b = _correct(base, "candidate"), _correct(data, "candidate")
            if [q["id"] for q in base["questions"]] == [q["id"] for q in data["questions"]]:
                d = paired_difference(a, b)
                vs_k0 = f"{d.value:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}]"
        out.append(f"| {LABEL[name]} | {share:.1%} | {size / 1e6:.2f} | {comp['mean_kl']:.4f} | {comp['top1_agreement']:.1f} "
                   f"| {cand['accuracy']:.1f} [{cand['accuracy_lo']:.1f}, {cand['accuracy_hi']:.1f}] "
                   f"| {comp['diff']:+.1f} [{comp['diff_lo']:+.1f}, {comp['diff_hi']:+.1f}] | {vs_k0} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(Path(sys.argv[1]))))
