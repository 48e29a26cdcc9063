"""The `r1v-quant` command: one module per subcommand, each a thin layer over the library."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from r1v_quant.errors import UserError

app = typer.Typer(
    name="r1v-quant",
    help="AWQ 4-bit quantization, export, chat and accuracy checks for Skywork-R1V models on one GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from r1v_quant.cli import awq, chat, eval, inspect, make_tiny, plan, serve

    app.command("awq")(awq.command)
    app.command("chat")(chat.command)
    app.command("eval")(eval.command)
    app.command("plan")(plan.command)
    app.command("inspect")(inspect.command)
    app.command("serve", context_settings=serve.CONTEXT_SETTINGS)(serve.command)
    app.command("make-tiny")(make_tiny.command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors are typer's; our own errors print one sentence and exit 2."""
    err = Console(stderr=True)
    try:
        app(args=argv, prog_name="r1v-quant")
    except UserError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
