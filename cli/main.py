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
    # Plain help: rich's option table squeezes six columns into 80 and cuts option names ("--quantize-lm-h…");
    # click's list wraps each help text under its option and never cuts.
    rich_markup_mode=None,
)


def _keep_hyphenated_words() -> None:
    """Help texts name flags such as --max-num-batched-tokens: wrapping must not split them at hyphens."""
    try:
        from typer._click import _textwrap as textwrap_module  # typer's own copy of click
    except ImportError:  # older typer, on click itself
        from click import _textwrap as textwrap_module
    base = textwrap_module.TextWrapper
    if getattr(base, "keeps_hyphenated_words", False):
        return

    class WholeWordWrapper(base):
        keeps_hyphenated_words = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("break_on_hyphens", False)
            super().__init__(*args, **kwargs)

    textwrap_module.TextWrapper = WholeWordWrapper


_keep_hyphenated_words()


def _register() -> None:
    from r1v_quant.cli import awq, chat, eval, inspect, make_tiny, plan, serve

    # Short lines for the command list, which would otherwise cut each docstring at 80 columns.
    app.command("awq", short_help="Quantise the language model to 4-bit AWQ and export it.")(awq.command)
    app.command("chat", short_help="Chat with a model or an export, with images.")(chat.command)
    app.command("eval", short_help="Compare a quantised model with its reference.")(eval.command)
    app.command("plan", short_help="Predict sizes and the longest context per GPU.")(plan.command)
    app.command("inspect", short_help="Check an export against vLLM's contract.")(inspect.command)
    app.command("serve", context_settings=serve.CONTEXT_SETTINGS,
                short_help="Run vllm serve on an export, sized to the GPU.")(serve.command)
    app.command("make-tiny", short_help="Write a small random Skywork-R1V checkpoint.")(make_tiny.command)


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
