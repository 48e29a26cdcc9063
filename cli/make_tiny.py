"""`r1v-quant make-tiny`: a small random checkpoint of the real layout, for trying the tool offline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def command(
    out: Path = typer.Argument(..., help="Folder to write the checkpoint to."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
    llm_layers: int = typer.Option(4, help="Decoder layers of the language model."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty folder."),
) -> None:
    """Write a small random Skywork-R1V checkpoint (real config schema, weight names, tokenizer conventions)."""
    from r1v_quant.output import check_out_dir
    from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny

    check_out_dir(out, force)
    path = make_tiny(out, seed=seed, sizes=TinySizes(llm_layers=llm_layers), force=force)
    Console().print(f"wrote a small Skywork-R1V checkpoint to [bold]{path}[/]")
