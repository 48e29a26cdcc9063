"""`r1v-quant inspect`: what an export holds, and whether vLLM will load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from r1v_quant import tables
from r1v_quant.deploy.inspect_export import InspectReport, inspect
from r1v_quant.deploy.vllm_args import serve_line
from r1v_quant.output import check_report_path, write_text_report
from r1v_quant.units import human_bytes

STATUS_STYLE = {"pass": "[green]pass[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


def render(report: InspectReport, console: Console) -> None:
    cfg = report.config
    archs = cfg.get("architectures")
    archs = ", ".join(map(str, archs)) if isinstance(archs, list) else str(archs or "")
    console.print(f"[bold]{report.path}[/]  ({cfg.get('model_type')}, {archs}, "
                  f"torch_dtype {cfg.get('torch_dtype')})")
    q = report.quantised
    if q["modules"]:
        kinds = ", ".join(f"{k} {n}" for k, n in q["by_kind"].items())
        console.print(f"quantised: {q['modules']} linears in {q['decoder_layers']} decoder layers ({kinds}), "
                      f"{q['format']}, {q['bits']} bits, group size {q['group_size']}, zero point {q['zero_point']}")
    else:
        console.print("quantised: nothing (no qweight tensors)")
    if q["unquantised_linears"]:
        console.print("kept unquantised: " + ", ".join(f"{a} {n} linears" for a, n in q["unquantised_linears"].items()))
    console.print(f"quantization_config: {json.dumps(report.quantization_config) if report.quantization_config else 'none'}")

    t = Table(title="Tensor bytes by component", title_justify="left")
    t.add_column("component")
    t.add_column("tensors", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("dtypes")
    t.add_column("plan predicts", justify="right")
    for c in report.components:
        dtypes = ", ".join(f"{d} {human_bytes(b)}" for d, b in sorted(c.dtypes.items(), key=lambda x: -x[1]))
        planned = "-" if c.planned_bytes is None else human_bytes(c.planned_bytes)
        t.add_row(c.label, f"{c.tensors:,d}", human_bytes(c.bytes), dtypes, planned)
    t.add_row("[bold]total[/]", f"{sum(c.tensors for c in report.components):,d}", f"[bold]{human_bytes(report.total_bytes)}[/]",
              "", "-" if report.planned_total is None else human_bytes(report.planned_total))
    tables.show(console, t)

    t = Table(title="vLLM contract", title_justify="left")
    t.add_column("check")
    t.add_column("result", justify="center")
    t.add_column("detail", overflow="fold")
    for c in report.checks:
        t.add_row(c.name, STATUS_STYLE.get(c.status, c.status), c.message)
    tables.show(console, t)
    if report.ok:
        console.print(f"[green]servable:[/] {serve_line()}")
    else:
        console.print(f"[bold red]{len(report.failures)} check(s) failed[/]: vLLM would not load this export correctly.")


def command(
    folder: Annotated[Path, typer.Argument(help="Export folder to inspect.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
) -> None:
    """List what an export quantises, its bytes per component, and check it against vLLM's contract (exit 1 on failure)."""
    check_report_path(json_out, "--json")
    report = inspect(folder)
    render(report, Console())
    if json_out is not None:
        write_text_report(json_out, json.dumps(report.to_dict(), indent=2) + "\n", "--json")
    if not report.ok:
        raise typer.Exit(1)
