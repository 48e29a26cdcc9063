"""`awq` on a real-width slice on one GPU: per-layer time and peak memory beside the memory model, matmuls, a chat.

    scripts/gpu-check.sh                       # CUDA: 4 decoder layers at the 38B widths, default calibration
    scripts/gpu-check.sh --device cpu --tiny   # the same steps at small widths on a CPU (a dry run)

Builds a random slice checkpoint (4 decoder layers at hidden 5120 / intermediate 27648 / 40 heads /
8 KV heads and one InternViT-6B layer at 3200 / 12800 / 25 heads, small vocabulary), runs `awq` on
it with the built-in calibration set at the default size (128 x 2048, cap 65,536 tokens) within
the default budget of a 24 GiB card, and prints each layer's seconds and peak memory beside the
memory model's prediction for the same settings, and the time model's seconds per layer beside the
measured ones (with its prediction for the 38B model with --traces self on a card of this size);
then `awq --rounding gptq` on a one-layer slice of the same widths and calibration, beside the
first run's layer 0. Then the int4 matmul benchmark at the 38B shapes (`benchmarks/matmul.py`) and
a short greedy chat with a picture on the export. Nothing is downloaded. The JSON summary goes to
--json, else to $OUT/gpu-check.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from r1v_quant.quant.chunks import available_host_bytes, default_budget, headroom_budget
from r1v_quant.quant.memory_check import RunSettings, awq_in_process, layer_device_bytes, peak_rss_bytes, prediction
from r1v_quant.quant.memory_model import auto_spill_above
from r1v_quant.synthetic.slices import make_slice
from r1v_quant.units import parse_size

HERE = Path(__file__).resolve().parent
GiB = 1024**3
CARD = 24 * GiB


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def environment(dev: torch.device) -> dict:
    sys.path.insert(0, str(HERE))
    from peers import machine

    env = {**machine(), "device": str(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GiB, 1), cuda=torch.version.cuda)
    return env


def budget_for(text: str, dev: torch.device) -> int:
    """--max-device-memory: 'card' is a free 24 GiB card's default budget, 'auto' this device's own."""
    if text == "card":
        return headroom_budget(CARD)
    if text == "auto":
        return default_budget(dev)
    return parse_size(text, "--max-device-memory", 2**20)


def layer_rows(run, pred, dev: torch.device) -> list[dict]:
    """Per layer: seconds, measured peak (and reserved on CUDA), the prediction it is held against."""
    predicted = layer_device_bytes(pred) if dev.type == "cuda" else pred.host_peak
    rows = []
    for m in run.layers:
        rows.append({"index": m.index, "seconds": round(m.seconds, 3), "peak_bytes": m.peak, "reserved_bytes": m.reserved,
                     "predicted_bytes": predicted, "peak_over_predicted": round(m.peak / predicted, 3)})
    what = "peak allocated / reserved" if dev.type == "cuda" else "peak RSS so far"
    say(f"{'layer':>5} {'seconds':>8} {what:>26} {'predicted':>10} {'ratio':>6}")
    for r in rows:
        peak = f"{r['peak_bytes'] / GiB:.2f}"
        if r["reserved_bytes"] is not None:
            peak += f" / {r['reserved_bytes'] / GiB:.2f}"
        say(f"{r['index']:>5} {r['seconds']:>8.1f} {peak + ' GiB':>26} {r['predicted_bytes'] / GiB:>6.2f} GiB "
            f"{r['peak_over_predicted']:>6.2f}")
    return rows


def gptq_run(work: Path, tiny: bool, layers: int, s: RunSettings, dev: torch.device) -> dict:
    """`awq --rounding gptq` on a slice of `layers` decoder layers: per-layer seconds and peaks against its prediction."""
    model = make_slice(work / "slice-gptq", "tiny" if tiny else "real", layers)
    g = replace(s, rounding="gptq")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    say(f"awq --rounding gptq on a {layers}-layer slice")
    run = awq_in_process(model, work / "export-gptq", g,
                         on_layer=lambda m: say(f"gptq layer {m.index} done in {m.seconds:.1f} s"))
    pred = prediction(model, run.tokens, g)
    say(f"memory model with gptq: device {pred.device_peak / GiB:.2f} GiB (layer {layer_device_bytes(pred) / GiB:.2f}), "
        f"host {pred.host_peak / GiB:.2f} GiB")
    return {"tokens": run.tokens, "seconds": round(run.seconds, 3), "layers": layer_rows(run, pred, dev),
            "prediction": {"device_peak_bytes": pred.device_peak, "layer_device_bytes": layer_device_bytes(pred),
                           "host_peak_bytes": pred.host_peak, "device_parts": pred.device_parts}}


def matmul(dev: torch.device, tiny: bool, work: Path) -> dict:
    out = work / "matmul.json"
    cmd = [sys.executable, str(HERE / "matmul.py"), "--device", dev.type, "--json", str(out)]
    cmd += ["--small", "--budget", "0.05", "--max-repeats", "3"] if tiny else ["--budget", "1.0"]
    say(f"int4 matmul at the 38B shapes{' / 8' if tiny else ''}: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        say(f"matmul benchmark failed: {' '.join(tail)}")
        return {"error": " ".join(tail)}
    return json.loads(out.read_text())


def chat(export: Path, dev: torch.device, max_new_tokens: int) -> dict:
    from r1v_quant.calib.builtin import builtin_item, render
    from r1v_quant.model.generate import Conversation, Sampling, encode_conversation, generate
    from r1v_quant.model.r1v import load_model

    start = time.perf_counter()
    loaded = load_model(str(export), device=str(dev), dtype="bf16")
    conv = Conversation()
    conv.add_user("What does the picture show?", [render(builtin_item("eval", 0, 0))])
    ids, pixels, _ = encode_conversation(loaded.config, loaded.tokenizer, conv)
    reply = generate(loaded, ids, pixels, Sampling(greedy=True, max_new_tokens=max_new_tokens))
    seconds = time.perf_counter() - start
    say(f"chat on {dev} with a picture: {len(reply.token_ids)} tokens in {seconds:.1f} s: {reply.text!r}")
    return {"tokens": len(reply.token_ids), "text": reply.text, "prompt_tokens": int(ids.shape[1]),
            "image_tiles": 0 if pixels is None else int(pixels.shape[0]), "seconds": round(seconds, 3)}


def time_prediction(dev: torch.device, model: Path, run, s: RunSettings) -> dict:
    """The time model (r1v_quant/quant/trace_plan.py) beside the measurement: this slice's seconds per layer,
    and `plan --calibrate --traces self` for the 38B config on a card of this GPU's memory."""
    from r1v_quant.deploy.cards import card_for
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.model.config import load_config
    from r1v_quant.quant import trace_plan as tp

    card = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else CARD
    spec = card_for(card)
    per_layer = tp.layer_seconds(spec, load_config(model), run.tokens, s.grid)
    measured = [m.seconds for m in run.layers]
    mean = sum(measured) / max(len(measured), 1)
    say(f"time model, assuming a {spec.name} ({spec.bf16_tflops:g} bf16 TFLOPs, {spec.bandwidth_gbs:g} GB/s): "
        f"{per_layer:.3g} s per layer predicted, {mean:.3g} s measured (ratio {mean / per_layer:.3g})")
    cfg, _ = resolve_config("r1v-38b")
    job = tp.TraceJob(s.samples, s.seq_len, 1024)
    r = tp.plan_card(cfg, f"{card / GiB:.0f} GiB", card, job, min(s.samples * s.seq_len, s.max_tokens), grid=s.grid)
    path = r.path.describe(f"{card / GiB:.1f} GiB") if r.path else "none fits"
    say(f"38B with --traces self on this card: {path}; " + ", ".join(f"{t.phase} {tp.human_seconds(t.seconds)}"
                                                                     for t in r.times))
    return {"assumed_chip": spec.name, "layer_seconds_predicted": per_layer, "layer_seconds_measured": mean,
            "r1v_38b_traces_self": {"path": path, "seconds": {t.phase: t.seconds for t in r.times}}}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="small widths and a small calibration set: a dry run")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the slice (default 4)")
    p.add_argument("--samples", type=int, help="calibration samples (default 128; tiny 4)")
    p.add_argument("--seq-len", type=int, help="longest calibration sample (default 2048)")
    p.add_argument("--max-tokens", type=int, help="cap on calibration tokens (default 65536; tiny 2048)")
    p.add_argument("--grid", type=int, help="scale and clip search grid (default 20; tiny 5)")
    p.add_argument("--compute-dtype", default="auto", help="as awq's --compute-dtype (default auto)")
    p.add_argument("--max-device-memory", default="card",
                   help="card (a free 24 GiB card's default budget), auto (this device's), or a size such as 40GiB")
    p.add_argument("--gptq-layers", type=int, default=1, help="decoder layers of the --rounding gptq slice (0: skip it)")
    p.add_argument("--chat-tokens", type=int, default=8, help="tokens of the greedy chat reply")
    p.add_argument("--work", type=Path, help="folder for the slice and the export (default: a temporary one)")
    p.add_argument("--json", type=Path, help="summary file (default: $OUT/gpu-check.json when $OUT is set)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from r1v_quant.model.r1v import pick_device
    from r1v_quant.quant.compute import choose_compute_dtype, dtype_name

    a = parse(argv)
    start = time.perf_counter()
    dev = pick_device(a.device)
    tiny = a.tiny
    json_path = a.json or (Path(os.environ["OUT"]) / "gpu-check.json" if os.environ.get("OUT") else None)
    dtype, why = choose_compute_dtype(a.compute_dtype, dev)
    s = RunSettings(device=str(dev), samples=a.samples or (4 if tiny else 128), seq_len=a.seq_len or 2048,
                    max_tokens=a.max_tokens or (2048 if tiny else 65536), grid=a.grid or (5 if tiny else 20),
                    budget=budget_for(a.max_device_memory, dev), spill_above=auto_spill_above(available_host_bytes()),
                    compute_dtype=dtype_name(dtype))
    env = environment(dev)
    say(", ".join(f"{k} {v}" for k, v in env.items()))
    say(f"compute dtype {s.compute_dtype} ({why}); budget {s.budget / GiB:.2f} GiB; spill above {s.spill_above / GiB:.1f} GiB")
    summary: dict = {"environment": env, "settings": asdict(s), "width": "tiny" if tiny else "real"}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model = make_slice(work / "slice", "tiny" if tiny else "real", a.layers)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        say(f"slice: {a.layers} decoder layers, {'tiny' if tiny else '38B'} widths, {size / GiB:.2f} GiB, "
            f"written in {time.perf_counter() - t0:.1f} s")
        summary["checkpoint"] = {"layers": a.layers, "bytes": size, "seconds": round(time.perf_counter() - t0, 3)}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        run = awq_in_process(model, work / "export", s,
                             on_layer=lambda m: say(f"layer {m.index} done in {m.seconds:.1f} s"))
        pred = prediction(model, run.tokens, s)
        say(f"awq: {run.tokens:,d} tokens in {run.seconds:.1f} s; " + "; ".join(f"{k}: {v}" for k, v in run.extra.items()))
        say(f"memory model: device {pred.device_peak / GiB:.2f} GiB (layer {layer_device_bytes(pred) / GiB:.2f}), "
            f"host {pred.host_peak / GiB:.2f} GiB; plan {pred.plan}")
        summary["awq"] = {"tokens": run.tokens, "seconds": round(run.seconds, 3), "extra": run.extra,
                          "process_peak_rss_bytes": peak_rss_bytes()}
        summary["prediction"] = {"device_peak_bytes": pred.device_peak, "layer_device_bytes": layer_device_bytes(pred),
                                 "host_peak_bytes": pred.host_peak, "plan": asdict(pred.plan),
                                 "device_parts": pred.device_parts, "host_parts": pred.host_parts}
        summary["layers"] = layer_rows(run, pred, dev)
        summary["time_prediction"] = time_prediction(dev, model, run, s)
        if a.gptq_layers:
            summary["gptq"] = gptq_run(work, tiny, a.gptq_layers, s, dev)
        summary["matmul"] = matmul(dev, tiny, work)
        summary["chat"] = chat(run.out, dev, a.chat_tokens)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    say(f"done in {summary['seconds']:.0f} s on {platform.node()}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        say(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    from r1v_quant.errors import UserError

    try:
        sys.exit(main())
    except UserError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        sys.exit(2)
