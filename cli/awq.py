"""`r1v-quant awq`: calibrate and export a 4-bit AWQ checkpoint of the language model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from r1v_quant import tables
from r1v_quant.int4.format import DEFAULT_GROUP_SIZE
from r1v_quant.progress import steps
from r1v_quant.quant.recipe import DEFAULT_GPTQ_DAMP, DEFAULT_TEXT_SHARE


def _mix(text: str | None) -> list[float] | None:
    from r1v_quant.errors import UserError

    if not text:
        return None
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--mix {text} is not a comma-separated list of numbers such as 0.7,0.3.") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--mix {text} needs non-negative weights with a positive sum.")
    return weights


def command(
    model: str = typer.Option(..., "--model", "-m", help="Full-precision checkpoint folder or Hugging Face id."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the export (written whole at the end)."),
    calib: str = typer.Option("builtin", help="Calibration set: builtin, mmmu-sample, text:PATH, chat:PATH (a .jsonl or .parquet of conversations: a messages list, or prompt/response columns; published reasoning traces), hf:NAME[:column] (chat columns are read as conversations), a folder/parquet in MMMU's schema, or A+B mixtures."),
    calib_path: Path | None = typer.Option(None, help="Local MMMU data (folder or parquet files) for --calib mmmu-sample."),
    mix: str | None = typer.Option(None, help="Weights of a mixture, e.g. 0.7,0.3 for mmmu-sample+text:PATH."),
    samples: int = typer.Option(128, min=1, help="Calibration samples."),
    seq_len: int = typer.Option(2048, min=16, help="Longest calibration sample, in tokens (image blocks are never cut)."),
    max_tokens: int = typer.Option(65536, min=16, help="Cap on calibration tokens in total."),
    traces: str = typer.Option("none", help="none; self: calibrate on the model's own greedy answers (cached), written by the full-precision model or by --trace-model; bootstrap: a first awq pass without traces writes them, then calibration runs again."),
    max_trace_tokens: int = typer.Option(1024, min=1, help="Longest self-generated trace."),
    trace_engine: str = typer.Option("transformers", help="What generates the traces: transformers (our runtime, one prompt at a time on --device) or vllm (all prompts in one batch; --tensor-parallel-size / --pipeline-parallel-size spread it)."),
    trace_model: str | None = typer.Option(None, help="A 4-bit export that writes the traces instead of the full-precision model (with --traces self or bootstrap)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", min=1, help="With --trace-engine vllm: GPUs each layer is split over."),
    pipeline_parallel_size: int = typer.Option(1, "--pipeline-parallel-size", "-pp", min=1, help="With --trace-engine vllm: pipeline stages."),
    distributed_executor_backend: str | None = typer.Option(None, "--distributed-executor-backend", help="With --trace-engine vllm: mp, ray or uni (default: vLLM's choice)."),
    group_size: int = typer.Option(DEFAULT_GROUP_SIZE, help="Input channels per quantisation group (128, 64 or 32)."),
    grid: int = typer.Option(20, min=2, help="Grid points for the scale and clip searches."),
    no_clip: bool = typer.Option(False, "--no-clip", help="Skip the clipping search."),
    propagate: str = typer.Option("quantized", help="Inputs of layer i+1: outputs of the quantized or the float layer i."),
    rounding: str = typer.Option("nearest", help="How the 4-bit codes are chosen after the scale and clip searches: nearest (round-to-nearest), or gptq (error feedback over each linear's calibration inputs, in the same AutoAWQ layout; lm_head stays round-to-nearest)."),
    gptq_damp: float = typer.Option(DEFAULT_GPTQ_DAMP, help="--rounding gptq: dampening added to the inputs' second moment, as a fraction of its mean diagonal (raised tenfold, and reported, when the factorisation fails)."),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="Weigh image and text tokens equally in the searches."),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Also quantise lm_head to 4 bit (AWQ, its scales folded into the final norm; vLLM reads \"lm_head\": true). Not for tied embeddings."),
    keep_bf16: str | None = typer.Option(None, "--keep-bf16", help="Keep decoder linear groups (q/k/v, o, gate/up, down of a layer) in bf16: auto (the most sensitive within --budget at --context), a share of the linears such as 5%, or a list such as 3.down,0.qkv or full linear names."),
    budget: str | None = typer.Option(None, "--budget", help="With --keep-bf16 auto: the serving card's memory, e.g. 48GiB (bare numbers are GiB)."),
    context: int | None = typer.Option(None, "--context", help="With --keep-bf16 auto: tokens of KV cache the card must still hold (default 32768)."),
    seed: int = typer.Option(0, help="Seed for sampling the calibration set."),
    text_share: float = typer.Option(DEFAULT_TEXT_SHARE, help="Least share of text tokens in the calibration set, 0 to 1: the last image-bearing samples make room for text-only ones (the set's text parts, else the built-in questions as text). 0 keeps the set as encoded."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: CUDA when present)."),
    offload_dir: Path | None = typer.Option(None, help="Spill calibration activations here when they outgrow --offload-above (default: inside the work folder)."),
    offload_above: str = typer.Option("auto", help="RAM kept for the activations between layers before spilling to --offload-dir, e.g. 8GiB (auto: a quarter of the free RAM, at least 1 GiB)."),
    work_dir: Path | None = typer.Option(None, help="Per-layer state for --resume (default: beside --out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep the per-layer work folder after success."),
    kl_check: bool = typer.Option(True, "--kl-check/--no-kl-check", help="Measure KL(source ‖ export) on held-out prompts at the end."),
    max_device_memory: str | None = typer.Option(None, help="Device memory awq may use, e.g. 20GiB; it sets the token chunk size and whether calibration tensors stay on the device (default: the GPU's free memory less max(2 GiB, 10%); on CPU, available RAM less 4 GiB)."),
    compute_dtype: str = typer.Option("auto", help="auto, float32 or bfloat16: the dtype of the layer forwards and search matmuls (auto: bf16 on CUDA; on CPU the faster one, by a short probe)."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard of the export, e.g. 5GB or 500MiB."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
    json_out: Path | None = typer.Option(None, "--json", help="Write a JSON report here."),
) -> None:
    """Quantise the language model to 4-bit AWQ; the vision encoder and projector stay bf16."""
    from r1v_quant.output import check_report_path, write_text_report
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint
    from r1v_quant.units import parse_size

    check_report_path(json_out, "--json")

    settings = AWQSettings(group_size=group_size, grid=grid, clip=not no_clip, propagate=propagate, balance=balance,
                           lm_head=quantize_lm_head, rounding=rounding, gptq_damp=gptq_damp)
    from r1v_quant.deploy.vllm_engine import Parallel

    keep = None
    if keep_bf16 is not None:
        from r1v_quant.model.checkpoint import resolve_config
        from r1v_quant.quant.keep import parse_keep

        keep = parse_keep(keep_bf16, resolve_config(model)[0], budget, context)
    elif budget is not None or context is not None:
        from r1v_quant.errors import UserError

        raise UserError("--budget and --context go with --keep-bf16 auto.")
    choice = CalibrationRecipe(calib, calib_path, _mix(mix), traces, max_trace_tokens, samples, seq_len, max_tokens, seed,
                               text_share, trace_engine=trace_engine, trace_model=trace_model)
    parallel = Parallel(tensor_parallel_size, pipeline_parallel_size, distributed_executor_backend)
    if (parallel.gpus > 1 or distributed_executor_backend) and (traces == "none" or trace_engine != "vllm"):
        from r1v_quant.errors import UserError

        raise UserError("--tensor-parallel-size, --pipeline-parallel-size and --distributed-executor-backend spread "
                        "the trace engine; pass them with --traces self or bootstrap and --trace-engine vllm.")
    console = Console()
    check = None
    if kl_check:
        from r1v_quant.evals.quick import quick_kl

        def check(src, export):
            console.print("[dim]measuring KL(source ‖ export) on held-out prompts[/]")
            return quick_kl(src, export, device=device)

    console.print("[dim]preparing calibration inputs[/]")
    with steps(console) as step:

        def on_trace(done, total):
            step("traces", done, total)

        def on_layer(i, total, report):
            note = f"err {report.rel_err_awq:.4f} (RTN {report.rel_err_rtn:.4f})" if report is not None else "resumed"
            if i == total:
                step("AWQ lm_head", 1, 1, note)
            else:
                step("AWQ layer", i + 1, total, note)

        result = quantize_checkpoint(model, out, settings, choice, force=force, device=device, work_dir=work_dir,
                                     resume=resume, offload_dir=offload_dir, keep_work=keep_work,
                                     offload_above=(None if offload_above == "auto"
                                                    else parse_size(offload_above, "--offload-above", 0)),
                                     max_shard_bytes=parse_size(max_shard_size, "--max-shard-size", 2**20),
                                     compute_dtype=compute_dtype, max_device_memory=(parse_size(max_device_memory, "--max-device-memory", 2**20)
                                                        if max_device_memory else None),
                                     progress=on_layer, kl_check=check, trace_progress=on_trace,
                                     trace_parallel=parallel, note=lambda text: console.print(f"[dim]{text}[/]"), keep=keep)

    tables.show(console, layer_table(result))
    for r in result.layers:
        for name, damp in r.gptq_damp.items():
            console.print(f"[yellow]layer {r.index} {name}: GPTQ's factorisation needed dampening {damp:g}[/]")
    for k, v in result.summary().items():
        console.print(f"{k}: [bold]{v}[/]")
    for k, v in result.extra.items():
        console.print(f"{k}: [bold]{v}[/]")
    console.print(f"wrote [bold]{result.out}[/] in {result.seconds:.0f} s")
    if result.kept_files:
        console.print(f"kept what the earlier export's folder held besides the export: {', '.join(result.kept_files)}",
                      highlight=False)
    if json_out:
        data = {"out": str(result.out), "summary": result.summary(), "settings": result.extra,
                "seconds": result.seconds, "layers": [asdict(r) for r in result.layers]}
        if result.head is not None:
            data["lm_head"] = asdict(result.head)
        write_text_report(json_out, json.dumps(data, indent=2) + "\n", "--json")


def layer_table(result) -> Table:
    """Per layer (and lm_head when quantised): AWQ's and round-to-nearest's relative output error, time, peak."""
    table = Table(title="per-layer relative output error (lower is better)")
    for col in ("layer", "AWQ", "round-to-nearest", "AWQ / RTN", "seconds", "peak MB"):
        table.add_column(col, justify="right")
    for r in result.layers + ([result.head] if result.head else []):
        table.add_row("lm_head" if r is result.head else str(r.index), f"{r.rel_err_awq:.4f}", f"{r.rel_err_rtn:.4f}",
                      f"{r.rel_err_awq / max(r.rel_err_rtn, 1e-12):.2f}", f"{r.seconds:.1f}", f"{r.peak_mem_mb:.0f}")
    return table
