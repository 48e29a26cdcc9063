"""The `r1v-quant` command: one module per subcommand, each a thin layer over the library."""

from __future__ import annotations

import signal
import sys
import threading

import typer
from rich.console import Console
from rich.markup import escape

from r1v_quant.errors import Interrupted, UserError

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


def command():
    """The click command behind `app`, with on/off flags shown without a value placeholder
    (typer labels them `<bool>`, which reads as if a value were expected)."""
    cmd = typer.main.get_command(app)
    # typer builds on its own copy of click, so the parameters are duck-typed here.
    for sub in [cmd, *getattr(cmd, "commands", {}).values()]:
        help_option = sub.get_help_option(sub.context_class(sub))  # made once, then cached by the command
        for param in [*sub.params, *([help_option] if help_option is not None else [])]:
            if getattr(param, "is_flag", False):
                param.metavar = ""
    return cmd


def _on_signal(signum, _frame) -> None:
    # Further signals would cut the cleanup short; SIGKILL still ends the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors are typer's; our own errors print one sentence and exit 2.

    SIGINT and SIGTERM raise `Interrupted` in the main thread, so every `finally` and staged
    folder cleans up, and the command says what it kept; the exit status is 128 + the signal.
    """
    err = Console(stderr=True)
    previous = ({sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        command()(args=argv, prog_name="r1v-quant")
    except UserError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        note = getattr(e, "note", "") or f"stopped by {signal.Signals(signum).name}."
        err.print(f"[bold yellow]interrupted:[/] {escape(note)}", highlight=False, soft_wrap=True)
        sys.exit(128 + signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
