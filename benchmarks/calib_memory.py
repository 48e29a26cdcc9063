"""Measured peak RSS of `awq` on a CPU beside the memory model's host prediction, at several calibration sizes.

    python benchmarks/calib_memory.py                        # real widths: 1 and 2 decoder layers, ~600/1200/2400 tokens
    python benchmarks/calib_memory.py --width mid --layers 1 --json out.json

Slices: decoder layers at hidden 5120 / intermediate 27648 / 40 heads / 8 KV heads (or the mid
width, 1024 / 4096) with one vision layer at 3200 / 12800 / 25 heads (mid: 256 / 1024 / 4) and
a small vocabulary. Each `awq` runs in its own process (peak RSS and CPU time from `os.wait4`),
one at a time, with a device budget that holds the token chunk at --chunk tokens: the same
settings go to the memory model. For each run it prints the measured peak, the prediction, their
ratio, and the working set (the peak less the stored activations the model predicts), which
should not grow with the calibration size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from r1v_quant.model.config import load_config
from r1v_quant.quant.chunks import chunk_token_bytes
from r1v_quant.quant.memory_check import RunSettings, awq_child, prediction, working_set
from r1v_quant.quant.memory_model import layer_weight_bytes
from r1v_quant.synthetic.slices import make_slice

HERE = Path(__file__).resolve().parent
GiB = 1024**3


def say(msg: str) -> None:
    print(f"[calib-memory] {msg}", flush=True)


def chunk_budget(model: Path, chunk: int) -> int:
    """The budget whose plan gives chunks of `chunk` tokens (float32): the weights twice and four chunks."""
    cfg = load_config(model)
    per_token = chunk_token_bytes(cfg.hidden_size, int(cfg.llm["intermediate_size"]), 4)
    return 2 * layer_weight_bytes(cfg, 4) + 4 * chunk * per_token + 2**20


def measure(model: Path, work: Path, tokens: list[int], a) -> list[dict]:
    rows = []
    budget = chunk_budget(model, a.chunk)
    for t in tokens:
        s = RunSettings(device="cpu", samples=a.samples, seq_len=a.seq_len, max_tokens=t, grid=a.grid, budget=budget,
                        spill_above=a.spill_above * GiB, compute_dtype="float32")
        log = work / f"awq-{model.name}-{t}.log"
        run = awq_child(model, work / f"out-{model.name}-{t}", s, log, threads=a.threads)
        pred = prediction(model, run.tokens, s)
        row = {"model": model.name, "tokens": run.tokens, "chunk": pred.plan.chunk_tokens, "wall_s": round(run.wall, 1),
               "cpu_s": round(run.cpu, 1), "peak_rss": run.peak_rss, "predicted": pred.host_peak,
               "ratio": round(run.peak_rss / pred.host_peak, 3), "stored_predicted": pred.stored_activations,
               "working_set": working_set(run.peak_rss, pred), "working_set_predicted": working_set(pred.host_peak, pred),
               "host_parts": pred.host_parts, "settings": asdict(s)}
        rows.append(row)
        say(f"{model.name}: {run.tokens:>6,d} tokens  peak RSS {run.peak_rss / GiB:6.2f} GiB  predicted "
            f"{pred.host_peak / GiB:6.2f} GiB  ratio {row['ratio']:.3f}  working set {row['working_set'] / GiB:.2f} GiB  "
            f"({run.wall:.0f} s wall, {run.cpu:.0f} s CPU)")
    first = rows[0]
    for r in rows:
        r["working_set_growth"] = round(r["working_set"] / first["working_set"], 3)
    return rows


def print_table(rows: list[dict]) -> str:
    lines = ["| slice | tokens | peak RSS GiB | predicted GiB | measured / predicted | stored acts GiB (pred.) | "
             "working set GiB | vs smallest |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens']:,d} | {r['peak_rss'] / GiB:.2f} | {r['predicted'] / GiB:.2f} | "
                     f"{r['ratio']:.3f} | {r['stored_predicted'] / GiB:.2f} | {r['working_set'] / GiB:.2f} | "
                     f"{r['working_set_growth']:.3f}x |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", default="real", choices=("real", "mid", "tiny"))
    p.add_argument("--layers", default="1,2", help="decoder layers of each slice, comma-separated (default 1,2)")
    p.add_argument("--tokens", default="600,1200,2400", help="calibration sizes (--max-tokens), comma-separated")
    p.add_argument("--samples", type=int, default=64, help="calibration samples asked for (the cap decides)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grid", type=int, default=5)
    p.add_argument("--chunk", type=int, default=512, help="token chunk the device budget is chosen to give")
    p.add_argument("--spill-above", type=float, default=8.0, help="GiB of activations kept in RAM before spilling")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for slices, exports and logs (default: a temporary one)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from peers import machine

    a = parse(argv)
    env = machine()
    say(f"CPU {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB, flags {' '.join(env['isa'])}, "
        f"torch {env['torch']}, transformers {env['transformers']}")
    tokens = [int(t) for t in a.tokens.split(",")]
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        for layers in (int(n) for n in a.layers.split(",")):
            model = make_slice(work / f"{a.width}-{layers}L", a.width, layers)
            say(f"slice {model.name}: {layers} decoder layer(s) at the {a.width} widths, "
                f"{sum(p.stat().st_size for p in model.glob('*.safetensors')) / GiB:.2f} GiB")
            rows += measure(model, work, tokens, a)
    table = print_table(rows)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    growth = max(r["working_set_growth"] for r in rows)
    say(f"largest |measured / predicted - 1|: {worst:.3f}; largest working-set growth over the smallest size: "
        f"{growth:.3f}x; {time.perf_counter() - start:.0f} s")
    result = {"machine": env, "rows": rows, "worst_ratio_error": worst, "working_set_growth": growth,
              "command": " ".join(sys.argv)}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    if a.markdown:
        a.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
