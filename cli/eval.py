"""`r1v-quant eval`: what the quantisation cost, reference against candidate on the same questions."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from r1v_quant.output import check_report_path, write_report, write_text_report
from r1v_quant.progress import steps

# Exit status when the candidate lost more accuracy than --max-drop allows (2 is bad input).
DROP_EXCEEDED = 1


def _print_text_suite(results, console: Console) -> None:
    from r1v_quant.evals.run import text_table

    headers, rows = text_table(results)
    table = Table(title=f"{results.suite}: {results.candidate} vs {results.reference}")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _text_markdown(results) -> str:
    from r1v_quant.evals.run import text_table

    headers, rows = text_table(results)
    lines = [f"## {results.suite}: {results.candidate} vs {results.reference}", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write_reports(run, json_out: Path | None, markdown: Path | None, plot: Path | None, console: Console) -> list[str]:
    """Write each report asked for; a report that cannot be written is saved elsewhere and its
    sentence returned, so the others are still written."""
    from r1v_quant.errors import UserError
    from r1v_quant.evals import report

    results, is_text = run.results, run.suite.kind == "text"
    writes = []
    if json_out:
        writes.append(("--json", lambda: write_text_report(json_out, report.json_text(results), "--json")))
    if markdown:
        text = _text_markdown(results) if is_text else report.to_markdown(results)
        writes.append(("--markdown", lambda: write_text_report(Path(markdown), text, "--markdown")))
    if plot:
        writes.append(("--plot", lambda: write_report(Path(plot), report.plot_writer(results), "--plot")))
    failures = []
    for _, write in writes:
        try:
            console.print(f"wrote {write()}")
        except UserError as e:
            failures.append(str(e))
    return failures


def _check_options(suite: str, data_path: Path | None, dtype: str, max_drop: float | None, plot: Path | None,
                   reports: dict[str, Path | None]) -> None:
    """Refuse bad options before hours of generation, not after."""
    from r1v_quant.errors import UserError
    from r1v_quant.evals.run import suite_loader
    from r1v_quant.model.r1v import parse_dtype

    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise UserError(f"--max-drop {max_drop:g} is not a number of points, 0 or more; the gate would pass "
                        "or fail every candidate.")
    for option, path in reports.items():
        check_report_path(path, option)
    parse_dtype(dtype)
    _, kind, _ = suite_loader(suite, data_path)
    if kind == "text" and max_drop is not None:
        raise UserError(f"--max-drop needs a suite with answers; {suite} measures perplexity only.")
    if kind == "text" and plot is not None:
        raise UserError(f"--plot draws accuracy per subject, which the text suite {suite} does not have.")


def _check_drop(run, max_drop: float | None, console: Console) -> bool:
    """Whether the candidate is within --max-drop (True without one); says which."""
    from r1v_quant.evals.run import accuracy_drop

    if max_drop is None:
        return True
    drop = accuracy_drop(run.results)
    if drop > max_drop:
        console.print(f"[bold red]accuracy drop {drop:.1f} points exceeds --max-drop {max_drop:g}[/]")
        return False
    console.print(f"[green]accuracy drop {drop:.1f} points is within --max-drop {max_drop:g}[/]")
    return True


def _dry_run(reference: str, candidate: str, baselines: list[str], settings, console: Console) -> None:
    from r1v_quant.errors import UserError
    from r1v_quant.evals.engine_plan import describe, plan_engines
    from r1v_quant.evals.suites import load_suite

    if settings.engine != "vllm":
        raise UserError("--dry-run plans vLLM engines; add --engine vllm.")
    plans = plan_engines(reference, candidate, baselines, settings, load_suite(settings).samples)
    for line in describe(plans, settings):
        console.print(line, highlight=False, soft_wrap=True)


def command(
    reference: str = typer.Option(..., "--reference", "-r", help="Full-precision checkpoint folder or Hugging Face id."),
    candidate: str = typer.Option(..., "--candidate", "-c", help="Quantised export (or any checkpoint) to compare with it."),
    suite: str = typer.Option(
        "builtin", help="builtin (held-out built-in questions), r1v-mini (held-out questions of the skills r1v-mini was "
        "trained on), r1v-outliers (the same plus held-out chained arithmetic), mmmu-sample, the vendor's mathvista "
        "(testmini), math-500, aime-2024 and gpqa-diamond, text:PATH "
        "(perplexity), or a folder / .parquet file in MMMU's layout."),
    data_path: Path | None = typer.Option(
        None, "--data-path", "--calib-path", help="Local data for --suite mmmu-sample (MMMU folder or parquet files) or a vendor "
        "suite (parquet, jsonl, json or csv in the data set's public schema)."),
    limit: int | None = typer.Option(
        None, min=1, help="Questions to use (default: 64 for builtin and text suites, 120 for r1v-mini, 400 for "
        "r1v-outliers, all for MMMU)."),
    baseline: list[str] = typer.Option(
        [], "--baseline", "-b", help="Also evaluate rtn (round-to-nearest, same bits and group size) or nf4 "
        "(bitsandbytes); repeatable."),
    max_new_tokens: int = typer.Option(
        2048, min=1, help="Longest reply (the vendor allows up to 64000); replies cut here without an answer count as "
        "runaway."),
    greedy: bool = typer.Option(
        True, "--greedy/--sample", help="Greedy decoding (default: reproducible and cacheable) or the vendor's sampling "
        "(temperature 0.6, top_p 0.95)."),
    seed: int = typer.Option(0, help="Seed for choosing questions and for --sample."),
    samples_per_question: int = typer.Option(
        1, "--samples-per-question", "-k", min=1, help="With --sample: ask each question k times and report pass@1 "
        "averaged over the k replies (interval: cluster bootstrap over questions)."),
    batch_size: int = typer.Option(4, min=1, help="Questions generated at once."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: CUDA when present)."),
    dtype: str = typer.Option("bf16", help="Activation dtype: bf16, fp16 or fp32."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Write the tables as Markdown here."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG of accuracy per subject here."),
    max_drop: float | None = typer.Option(
        None, "--max-drop", help="Exit with status 1 when the candidate's accuracy is more than this many points below the "
        "reference's."),
    cache_dir: Path | None = typer.Option(
        None, help="Where reference outputs are cached (default: $R1V_QUANT_CACHE/eval or ~/.cache/r1v-quant/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the reference cache."),
    wide: bool = typer.Option(False, "--wide", help="Show every column of the summary (the default fits 80 columns)."),
    engine: str = typer.Option(
        "torch", help="torch (transformers generate, one device) or vllm (vLLM's offline engine: continuous batching, "
        "several GPUs and nodes)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "-tp", help="With --engine vllm: GPUs "
                                             "each layer is split over."),
    pipeline_parallel_size: int = typer.Option(1, "--pipeline-parallel-size", "-pp", help="With --engine vllm: "
                                               "pipeline stages (layers split over GPUs or nodes)."),
    distributed_executor_backend: str | None = typer.Option(
        None, "--distributed-executor-backend", help="With --engine vllm: mp (one node), ray (several nodes) or uni; "
        "default: vLLM's choice."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --engine vllm: print each engine's arguments and the "
                                 "memory it needs per GPU, from the plan, and stop (no weights are read)."),
) -> None:
    """Compare a quantised model with its reference: accuracy, agreement, KL, reasoning length."""
    from r1v_quant.errors import UserError
    from r1v_quant.evals import report
    from r1v_quant.evals.run import EvalSettings, evaluate
    from r1v_quant.evals.settings import check_settings

    _check_options(suite, data_path, dtype, max_drop, plot, {"--json": json_out, "--markdown": markdown, "--plot": plot})
    settings = EvalSettings(suite=suite, data_path=data_path, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
                            greedy=greedy, batch_size=batch_size, device=device, dtype=dtype, cache_dir=cache_dir,
                            use_cache=not no_cache, samples_per_question=samples_per_question, engine=engine,
                            tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                            distributed_executor_backend=distributed_executor_backend)
    check_settings(settings)
    console = Console()
    if dry_run:
        _dry_run(reference, candidate, baseline, settings, console)
        return
    # One bar (or line) per model; steps are questions generated and questions teacher-forced.
    with steps(console) as step:
        run = evaluate(reference, candidate, settings, baseline, progress=lambda label, done, total: step(label, done, total),
                       on_warning=lambda w: console.print(f"[bold yellow]warning:[/] {w}", highlight=False))
    if run.suite.kind == "text":
        _print_text_suite(run.results, console)
    else:
        report.print_report(run.results, console, wide=wide)
        console.print(f"[dim]decoding: {settings.describe()['decoding']}"
                      f"{' (deterministic; --sample for the vendor settings)' if greedy else ''}, "
                      f"up to {max_new_tokens} new tokens[/]")
    if run.cache_dir is not None:
        console.print(f"[dim]reference outputs: {run.reference_reused} cached, {run.reference_generated} new "
                      f"({run.cache_dir})[/]")
    failures = _write_reports(run, json_out, markdown, plot, console)
    within = _check_drop(run, max_drop, console)
    if failures and within:
        raise UserError(" ".join(failures))
    for failure in failures:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(failure)}", highlight=False, soft_wrap=True)
    if not within:
        raise typer.Exit(DROP_EXCEEDED)
