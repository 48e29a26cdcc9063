"""`r1v-quant plan`: sizes and the longest context per GPU, from the config alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from r1v_quant import tables
from r1v_quant.deploy import compromises, vllm_args
from r1v_quant.deploy.plan import Plan, parse_gpu_mems, plan_model
from r1v_quant.errors import UserError
from r1v_quant.int4.format import DEFAULT_GROUP_SIZE
from r1v_quant.output import check_report_path, write_text_report
from r1v_quant.units import GiB, human_bytes

STATUS_STYLE = {"ok": "[green]ok[/]", "short": "[yellow]short[/]", "no": "[red]no[/]"}


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def _params(n: int) -> str:
    return f"{n / 1e9:,.3f} B" if n >= 10**8 else f"{n / 1e6:,.3f} M"


def render(plan: Plan, console: Console, context: int = 32768) -> None:
    console.print(f"[bold]{plan.source}[/]  ({plan.model_type}, {plan.model_dtype}; "
                  f"{'planning the existing ' if plan.already_quantized else ''}AWQ {plan.bits}-bit, "
                  f"group size {plan.group_size})")

    t = Table(title="Weights by component", title_justify="left")
    t.add_column("component")
    t.add_column("params", justify="right")
    t.add_column(f"source {plan.model_dtype}", justify="right")
    t.add_column("AWQ export", justify="right")
    for c in plan.components:
        t.add_row(c.label, _params(c.params), human_bytes(c.source_bytes), human_bytes(c.export_bytes))
    t.add_row("[bold]total[/]", _params(sum(c.params for c in plan.components)),
              f"[bold]{human_bytes(plan.source_total)}[/]", f"[bold]{human_bytes(plan.export_total)}[/]")
    tables.show(console, t)
    console.print(f"export tensors: {plan.export_total:,d} bytes ({plan.export_total / 1e9:.2f} GB)")

    r = plan.reserve
    console.print(
        f"KV cache: {plan.kv_bytes_per_token:,d} bytes per token ({plan.kv_dtype}); "
        f"reserve {_gib(r.total)} GiB = runtime {_gib(r.runtime)} + LLM activations {_gib(r.llm_activations)} "
        f"(prefill chunk {r.max_batched_tokens} tokens) + vision activations {_gib(r.vision_activations)} "
        f"({r.images_profiled} image x {r.tiles_per_image} tiles)"
    )

    t = Table(title=f"Longest context per card (vLLM --gpu-memory-utilization {plan.util})", title_justify="left")
    for col, just in (("card", "left"), ("budget GiB", "right"), ("weights", "right"), ("reserve", "right"),
                      ("KV room", "right"), ("max tokens", "right"), ("max-model-len", "right"), ("fits", "center")):
        t.add_column(col, justify=just)
    for card in plan.cards:
        t.add_row(card.label, _gib(card.budget_bytes), _gib(card.weights_bytes), _gib(card.reserve_bytes),
                  _gib(card.kv_room_bytes), f"{card.max_context:,d}", f"{card.max_model_len:,d}",
                  STATUS_STYLE.get(card.status, card.status))
    tables.show(console, t)
    console.print("fits: ok = 32k tokens or more; short = under 32k (long R1 chains of thought may be cut); "
                  "no = under 4k (not even one 13-tile image and an answer).")

    render_recipes(plan, console)
    render_keep(plan, console, context)

    for card in plan.cards:
        if not card.suggestions:
            continue
        t = Table(title=f"{card.label}: {card.reason}", title_justify="left")
        t.add_column("option")
        t.add_column("how", overflow="fold")
        t.add_column("max tokens", justify="right")
        t.add_column("still short", justify="right")
        t.add_column("vLLM")
        t.add_column("note")
        for s in card.suggestions:
            t.add_row(s.title, s.how, f"{s.max_context:,d}", f"{_gib(s.short_by_bytes)} GiB" if s.short_by_bytes else "-",
                      s.vllm, s.note)
        tables.show(console, t)
    for note in plan.notes:
        console.print(f"note: {note}")


def render_recipes(plan: Plan, console: Console) -> None:
    """The best recipe per card (compromises.py), the text-only one beside it, and the flags of each."""
    t = Table(title="Best recipe per card: the cheapest compromises reaching the longest goal (32k, else 16k, "
              "else 4k tokens); the text-only one below it", title_justify="left")
    for col, just in (("card", "left"), ("recipe", "left"), ("context", "right"), ("GPU GiB", "right"),
                      ("host GiB", "right"), ("s/image", "right"), ("vLLM", "left")):
        t.add_column(col, justify=just, no_wrap=col != "recipe", min_width=18 if col == "recipe" else None)
    how = []
    for card in plan.cards:
        for kind, r in (("", card.best), ("text only: ", card.best_text_only)):
            if r is None:
                continue
            t.add_row(card.label if not kind else "", " + ".join(r.levers) or "none (as exported)",
                      f"{r.max_model_len:,d}",
                      _gib(r.gpu_weights), _gib(r.host_pinned) if r.host_pinned else "-",
                      f"{r.encode_seconds:.2f}" if r.host_pinned else "-",
                      compromises.vllm_needed(r).removeprefix(">= ").replace(" (assumed)", " *"))
            if r.levers:
                how.append(f"{card.label}, {' + '.join(r.levers)}: {vllm_args.how(r)}")
    tables.show(console, t)
    console.print("compromises, cheapest first: " + "; ".join(f"{n} = {compromises.TITLES[n]}" for n in compromises.COMPROMISES)
                  + f". context: --max-model-len; host GiB: pinned host RAM; s/image: at least this per image-encoding "
                  f"step (the offloaded encoder read over PCIe at {compromises.PCIE_BYTES_PER_S / 1e9:.0f} GB/s); vLLM: the "
                  "oldest version that runs it (* assumed, not read in vLLM's source).", highlight=False)
    for line in how:
        # Wrapped at spaces under a two-column indent: a flag or a value is never split.
        console.print(Padding(Text(line), (0, 0, 0, 2), expand=False), highlight=False)


def _trace_rows(cfg, traces, engine, gpus, samples, seq_len, trace_tokens, tokens, group_size, grid, cards, console):
    from r1v_quant.quant import trace_plan as tp
    from r1v_quant.quant.recipe import TRACE_MODES

    if traces not in TRACE_MODES:
        raise UserError(f"--traces {traces} is not one of {', '.join(TRACE_MODES)}.")
    if traces == "none":
        return None
    job = tp.TraceJob(samples, seq_len, trace_tokens)
    rows = [tp.plan_card(cfg, label, size, job, tokens, gpus=gpus, engine=engine, traces=traces,
                         group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size, grid=grid) for label, size in cards]
    render_traces(rows, job, traces, console)
    return rows


def render_keep(plan: Plan, console: Console, context: int) -> None:
    """What `awq --keep-bf16 auto --budget CARD --context N` would keep on each card, and the context each share costs."""
    from r1v_quant.quant.keep import PLAN_SHARES, plan_keep

    fits = plan_keep(plan, context)
    t = Table(title=f"awq --keep-bf16 auto --context {context}: decoder linears kept in bf16 within each card "
              "(share of the linears' parameters; the rest 4-bit)", title_justify="left")
    for col in ("card", f"room beyond {context:,d} tokens GiB", "auto keeps up to", "adds GiB", "max tokens, all 4-bit",
                "max tokens after auto", *(f"max tokens at {s:.0%} kept" for s in PLAN_SHARES)):
        t.add_column(col, justify="left" if col == "card" else "right")
    for f in fits:
        t.add_row(f.card, _gib(f.room_bytes), f"{f.auto_share:.1%}", _gib(f.auto_bytes), f"{f.max_context:,d}",
                  f"{f.context_after:,d}", *(f"{f.context_at[s]:,d}" for s in PLAN_SHARES))
    tables.show(console, t)
    console.print("auto keeps whole groups (q/k/v, o, gate/up or down of one layer), the most sensitive per byte as "
                  "measured during calibration, so its share is at most the one shown; a negative room means the card "
                  "cannot hold that context even with every linear 4-bit.", highlight=False)


def render_calibration(rows, tokens: int, host_bytes: int, console: Console) -> None:
    gptq = any(k.startswith("gptq") for k in rows[0].prediction.device_parts)
    console.print(f"[bold]awq calibration[/]{' with --rounding gptq' if gptq else ''} on CUDA (bf16) over {tokens:,d} "
                  "tokens; host RAM limit "
                  f"{human_bytes(host_bytes)}")
    t = Table(title="Predicted peaks per card (default budget: the card less max(2 GiB, 10%))", title_justify="left")
    for col in ("card", "budget GiB", "chunk tokens", "calibration tensors", "device peak GiB", "host peak GB",
                "disk GB", "fits", "max tokens on device", "max tokens in host RAM"):
        t.add_column(col, justify="left" if col in ("card", "calibration tensors") else "right")
    for r in rows:
        p = r.prediction
        t.add_row(r.label, _gib(p.budget), f"{p.plan.chunk_tokens:,d}",
                  "on the device" if p.plan.stored_on_device else "host, streamed", _gib(p.device_peak),
                  f"{p.host_peak / 1e9:,.2f}", f"{p.disk / 1e9:,.1f}", "[green]yes[/]" if r.fits else "[red]no[/]",
                  f"{r.max_tokens_on_device:,d}", f"{r.max_tokens_host:,d}")
    tables.show(console, t)
    first = rows[0].prediction
    console.print("device parts (first card): " + ", ".join(f"{k} {_gib(v)}" for k, v in first.device_parts.items()))
    console.print("host parts (first card): " + ", ".join(f"{k} {_gib(v)}" for k, v in first.host_parts.items()))
    if first.spilled:
        console.print(f"activations spilled to the offload folder: {first.spilled / 1e9:.2f} GB")


def render_traces(rows, job, traces: str, console: Console) -> None:
    """The trace phase per card (which engine and model on which devices, its memory) and every phase's time."""
    from r1v_quant.quant import trace_plan as tp

    console.print(f"[bold]trace phase[/] (--traces {traces}): {job.samples} prompts of at most {job.prompt_tokens:,d} "
                  f"tokens, traces of at most {job.trace_tokens:,d}")
    t = Table(title="Trace path and predicted wall time per card", title_justify="left")
    for col in ("card", "assumed chip", "trace path", "GiB per device", "budget GiB", "batch", "trace generation",
                "layer loop", "export", "total"):
        t.add_column(col, justify="left" if col in ("card", "assumed chip", "trace path") else "right")
    for r in rows:
        times = {p.phase: p.seconds for p in r.times}
        loop = times["layer loop"] + times.get("bootstrap layer loop", 0)
        export = times["export"] + times.get("bootstrap export", 0)
        if r.path is None:
            t.add_row(r.label, r.spec.name, "[red]none fits[/]", _gib(min(p.device_bytes for p in r.tried)), "-", "0",
                      "-", tp.human_seconds(loop), tp.human_seconds(export), "-")
            continue
        what = (r.path.describe(f"{r.card_bytes / GiB:g} GiB")
                + (" (bootstrap: a first awq pass without traces)" if r.bootstrap else ""))
        t.add_row(r.label, r.spec.name, what, _gib(r.path.device_bytes), _gib(r.path.budget), f"{r.path.batch:,d}",
                  tp.human_seconds(times["trace generation"]), tp.human_seconds(loop), tp.human_seconds(export),
                  tp.human_seconds(r.total_seconds))
    tables.show(console, t)
    console.print(
        f"assumptions: 2 x parameters FLOPs per token; a decode step reads the language model's weights once per batch "
        f"plus the batch's KV cache; the layer loop runs grid + {tp.EXTRA_PASSES} passes over every calibration token; "
        f"{tp.COMPUTE_EFFICIENCY:.0%} of the chip's published dense bf16 peak and {tp.BANDWIDTH_EFFICIENCY:.0%} of its "
        f"bandwidth (r1v_quant/deploy/cards.py); disk {tp.DISK_BYTES_PER_S / 1e9:.0f} GB/s; vision encoder not "
        "counted. Bootstrap times include the first pass.", highlight=False)
    for r in rows:
        if r.path is None:
            console.print(f"{r.label}: " + tp.no_path_sentence(job, f"a {r.label} card", r.tried), highlight=False)


def command(
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Checkpoint or export folder, config.json, Hugging Face id, or r1v-38b (built in, offline).")],
    group_size: Annotated[int | None, typer.Option(
        "--group-size", "-g",
        help="AWQ group size (default 128; an export's own when it has one; -1 = one group per row).")] = None,
    kv_dtype: Annotated[str, typer.Option(
        "--kv-cache-dtype", help="KV cache dtype, as vLLM's --kv-cache-dtype: bf16 (auto), fp16 or fp8.")] = "bf16",
    util: Annotated[float, typer.Option(
        "--gpu-memory-utilization", "--util", help="Share of the card vLLM may use, as vLLM's flag.")] = 0.9,
    gpu_mem: Annotated[str | None, typer.Option(
        "--gpu-mem", help="Total memory of the card, as in `serve --gpu-mem` (e.g. 24GiB, 30GB, 81559MiB; bare numbers "
        "are GiB); several cards comma-separated. Default 24,32,40,48,80.")] = None,
    max_batched_tokens: Annotated[int, typer.Option(
        "--max-num-batched-tokens", "--max-batched-tokens",
        help="vLLM's --max-num-batched-tokens, which the reserve assumes.")] = 2048,
    max_tiles: Annotated[int | None, typer.Option(
        "--max-tiles", help="max_dynamic_patch the reserve assumes (default: the config's).")] = None,
    quantize_lm_head: Annotated[bool | None, typer.Option(
        "--quantize-lm-head/--bf16-lm-head",
        help="Plan an export with a 4-bit lm_head (awq --quantize-lm-head), or with lm_head in bf16 "
        "(default: an export's own; bf16 for a source model).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON to this file.")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Predict `awq`'s peak device memory, host memory and disk instead of serving.")] = False,
    samples: Annotated[int, typer.Option("--samples", min=1, help="awq --samples (with --calibrate).")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=16, help="awq --seq-len (with --calibrate).")] = 2048,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=16, help="awq --max-tokens (with --calibrate).")] = 65536,
    host_mem: Annotated[str, typer.Option("--host-mem", help="Host RAM the calibration may use (with --calibrate).")] = "32GB",
    traces: Annotated[str, typer.Option(
        "--traces", help="awq --traces (with --calibrate): none, self or bootstrap; self and bootstrap add the trace "
        "phase (which engine and model on which devices, its memory) and every phase's predicted time.")] = "none",
    trace_engine: Annotated[str | None, typer.Option(
        "--trace-engine", help="awq --trace-engine: transformers or vllm (default: the first path that fits).")] = None,
    max_trace_tokens: Annotated[int, typer.Option("--max-trace-tokens", min=1, help="awq --max-trace-tokens.")] = 1024,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Cards of each size vLLM may spread the full-precision "
                                      "trace model over (tensor parallel).")] = 1,
    grid: Annotated[int, typer.Option("--grid", min=2, help="awq --grid (with --calibrate, for the time).")] = 20,
    rounding: Annotated[str, typer.Option(
        "--rounding", help="awq --rounding (with --calibrate): nearest, or gptq, which adds its second moments.")] = "nearest",
    context: Annotated[int, typer.Option(
        "--context", min=1, help="Context that `awq --keep-bf16 auto` must leave room for, in tokens.")] = 32768,
) -> None:
    """Predict weight bytes (bf16 and AWQ export) and the longest context that fits each GPU."""
    check_report_path(json_out, "--json")
    if calibrate:
        from r1v_quant.model.checkpoint import resolve_config
        from r1v_quant.quant.memory_model import calibration_tokens, plan_calibration
        from r1v_quant.quant.recipe import AWQSettings
        from r1v_quant.units import parse_size

        AWQSettings(rounding=rounding)  # the one check of the name
        cfg, source = resolve_config(model)
        tokens = calibration_tokens(samples, seq_len, max_tokens)
        host = parse_size(host_mem, "--host-mem", 2**20)
        rows = plan_calibration(cfg, parse_gpu_mems(gpu_mem), tokens, seq_len=seq_len,
                                group_size=DEFAULT_GROUP_SIZE if group_size is None else group_size, host_bytes=host,
                                gptq=rounding == "gptq")
        console = Console()
        console.print(f"[bold]{source}[/]")
        render_calibration(rows, tokens, host, console)
        trace_rows = _trace_rows(cfg, traces, trace_engine, gpus, samples, seq_len, max_trace_tokens, tokens,
                                 group_size, grid, parse_gpu_mems(gpu_mem), console)
        if json_out is not None:
            out = [{"card": r.label, "fits": r.fits, "tokens": tokens,
                    "device_peak": r.prediction.device_peak, "host_peak": r.prediction.host_peak,
                    "disk": r.prediction.disk, "chunk_tokens": r.prediction.plan.chunk_tokens,
                    "max_tokens_on_device": r.max_tokens_on_device,
                    "max_tokens_host": r.max_tokens_host} for r in rows]
            for entry, t in zip(out, trace_rows or []):
                entry["trace"] = None if t.path is None else {
                    "engine": t.path.engine, "model": t.path.model, "gpus": t.path.gpus, "levers": list(t.path.levers),
                    "device_bytes": t.path.device_bytes, "budget": t.path.budget, "batch": t.path.batch}
                entry["assumed_chip"] = t.spec.name
                entry["seconds"] = {p.phase: p.seconds for p in t.times}
            write_text_report(json_out, json.dumps(out, indent=2) + "\n", "--json")
        return
    # vLLM's spellings: auto is the model's dtype, fp8_e4m3 and fp8_e5m2 are both one byte.
    kv_dtype = {"auto": "bf16"}.get(kv_dtype.lower(), "fp8" if kv_dtype.lower().startswith("fp8") else kv_dtype)
    if kv_dtype.lower() not in ("bf16", "fp16", "fp8"):
        raise UserError(f"--kv-cache-dtype {kv_dtype!r} is not auto, bf16, fp16 or fp8.")
    plan = plan_model(model, group_size=group_size, kv_dtype=kv_dtype.lower(), util=util, gpu_mems=parse_gpu_mems(gpu_mem),
                      max_batched_tokens=max_batched_tokens, max_dynamic_patch=max_tiles, lm_head=quantize_lm_head)
    render(plan, Console(), context)
    if json_out is not None:
        from dataclasses import asdict

        from r1v_quant.quant.keep import plan_keep

        data = {**plan.to_dict(), "keep_bf16_auto": [asdict(f) for f in plan_keep(plan, context)]}
        write_text_report(json_out, json.dumps(data, indent=2) + "\n", "--json")
