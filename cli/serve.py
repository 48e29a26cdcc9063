"""`r1v-quant serve`: check an export, then run `vllm serve` on it with the flags this model needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from r1v_quant.deploy.vllm_args import DEFAULT_IMAGES_PER_PROMPT, DEFAULT_UTIL
from r1v_quant.errors import UserError

# Register with: app.command("serve", context_settings=serve.CONTEXT_SETTINGS)(serve.command)
# so that options typer does not know (vLLM's) reach the command as ctx.args.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def refuse_failing(folder: Path) -> None:
    """UserError naming the first failed vLLM-contract check of the export, if any."""
    from r1v_quant.deploy.inspect_export import inspect

    report = inspect(folder)
    if report.ok:
        return
    failed = report.failures
    first = failed[0]
    others = f" (and {len(failed) - 1} more failed checks)" if len(failed) > 1 else ""
    raise UserError(f"{folder} fails the vLLM check '{first.name}'{others}: {first.message.rstrip('.')}; "
                    f"`r1v-quant inspect {folder}` shows the full report.")


def command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="Export folder written by `r1v-quant awq`.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the vllm command instead of running it.")] = False,
    gpu_mem: Annotated[str | None, typer.Option(
        "--gpu-mem", help="Total memory of the card, as in `plan --gpu-mem` (e.g. 80GiB, 49140MiB): plan --max-model-len "
        "for it instead of the GPU found.")] = None,
    util: Annotated[float | None, typer.Option(
        "--util", help=f"vLLM --gpu-memory-utilization, also what the plan assumes (default {DEFAULT_UTIL}, or 0.95 "
        "when the card needs it).")] = None,
    images: Annotated[int, typer.Option(
        "--images", min=0,
        help="Images allowed per prompt (0 = text only, which leaves more room for the KV cache).")] = DEFAULT_IMAGES_PER_PROMPT,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="Serve without images: vLLM 0.32 then does not build the vision encoder.")] = False,
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="The compromises to use, comma-separated (util-95, fp8-kv, tower-offload, tiles-6, text-only), "
        "or none; default: the plan's best for the card.")] = None,
    vllm_version: Annotated[str | None, typer.Option(
        "--vllm-version", help="Plan for this vLLM version instead of the installed one (e.g. 0.31.0).")] = None,
) -> None:
    """Run `vllm serve` on an export with --trust-remote-code, --dtype bfloat16, the recipe that fits the GPU
    best (`r1v-quant plan` lists them), a --max-model-len that fits, and images per prompt; any further
    arguments go to vLLM and win over ours (r1v-quant serve r1v-38b-awq --port 8000 --kv-cache-dtype fp8)."""
    from r1v_quant.deploy.serve import (
        build_serve,
        command_line,
        exec_vllm,
        find_vllm,
        gpu_memory,
        installed_vllm,
    )
    from r1v_quant.model.config import load_config
    from r1v_quant.units import parse_size

    err = Console(stderr=True)
    extra = list(ctx.args)
    refuse_failing(folder)
    cfg = load_config(folder)

    if gpu_mem is not None:
        gpu_bytes, label = parse_size(gpu_mem), f"{gpu_mem} card"
    else:
        found = gpu_memory()
        gpu_bytes, label = (found[0], f"{found[1]} ({found[0] / 1024**3:.1f} GiB)") if found else (None, None)
    version_note = None
    if vllm_version is None:
        vllm_version = installed_vllm()
        if vllm_version is not None:
            version_note = f"planned for the installed vLLM {vllm_version}."
    else:
        version_note = f"planned for vLLM {vllm_version} (--vllm-version)."
    levers = None if recipe is None else [p.strip() for p in recipe.split(",") if p.strip()]
    cmd = build_serve(folder, cfg, gpu_bytes, extra, util=util, images_per_prompt=images, gpu_label=label,
                      vllm_version=vllm_version, text_only=text_only, recipe=levers)
    if version_note:
        cmd.notes.insert(0, version_note)

    vllm = find_vllm(required=not dry_run)
    if vllm is None:
        vllm = ["vllm"]
        cmd.notes.append("vLLM is not installed here; the command is for a machine that has it.")
    argv = vllm + cmd.args
    for note in cmd.notes:
        err.print(f"[dim]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if dry_run:
        typer.echo(command_line(argv))
        return
    err.print(f"running: {command_line(argv)}", highlight=False, soft_wrap=True, markup=False)
    exec_vllm(argv)
