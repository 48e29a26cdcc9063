"""`r1v-quant chat`: talk to a checkpoint or an export, one-shot or interactively, with images."""

from __future__ import annotations

import signal
from pathlib import Path

import typer
from rich.console import Console

from r1v_quant.model.prompt import THINK_END

HELP_TEXT = ("commands: /image PATH (attach to your next message), /reset (new conversation), /exit; "
             "Ctrl-C stops a reply, Ctrl-C again or Ctrl-D leaves")
THINKING_LABEL = "thinking: "
ANSWER_LABEL = "answer: "


class ThinkingPrinter:
    """Prints streamed text, the reasoning part labelled and dimmed (or hidden), the answer labelled and plain."""

    def __init__(self, console: Console, show_thinking: bool, starts_in_thinking: bool):
        self.console = console
        self.show = show_thinking
        self.thinking = starts_in_thinking
        self.held = ""
        self.labelled = False

    def _label(self, label: str, style: str) -> None:
        self.console.print(label, end="", style=style, markup=False, highlight=False)

    def __call__(self, text: str) -> None:
        self.held += text
        while self.thinking:
            cut = self.held.find(THINK_END)
            if cut < 0:
                # Keep a possible partial "</think>" back until the next chunk decides it.
                safe = len(self.held) - len(THINK_END) + 1
                if safe > 0:
                    self._think(self.held[:safe])
                    self.held = self.held[safe:]
                return
            self._think(self.held[:cut])
            self.held = self.held[cut + len(THINK_END):].lstrip("\n")
            self.thinking = False
            if self.show:
                self.console.print()
                self._label(ANSWER_LABEL, "bold")
        self.console.print(self.held, end="", markup=False, highlight=False, soft_wrap=True)
        self.held = ""

    def _think(self, text: str) -> None:
        if self.show and text:
            if not self.labelled:
                self._label(THINKING_LABEL, "bold dim")
                self.labelled = True
            self.console.print(text, end="", style="dim", markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self.held:
            if self.thinking:
                self._think(self.held)
            else:
                self.console.print(self.held, end="", markup=False, highlight=False, soft_wrap=True)
        self.held = ""
        self.console.print()


def command(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint or export folder, or a Hugging Face id."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Image to attach to the first message (repeatable)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Ask once and exit; without it, chat interactively."),
    system: str | None = typer.Option(None, help="System prompt."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (deterministic)."),
    max_new_tokens: int = typer.Option(4096, min=1, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.6, min=0.0, help="Sampling temperature (vendor default 0.6)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling mass (vendor default 0.95)."),
    repetition_penalty: float = typer.Option(1.05, min=0.0, help="Repetition penalty (vendor default 1.05)."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the reasoning before the answer."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: CUDA when present)."),
    dtype: str = typer.Option("bf16", help="Activation dtype: bf16, fp16 or fp32."),
    engine: str = typer.Option("torch", help="torch (built in) or vllm (needs vLLM installed)."),
) -> None:
    """Chat with a Skywork-R1V model: streams the reasoning (labelled, dimmed) and the answer."""
    from r1v_quant.errors import UserError
    from r1v_quant.model.generate import Conversation, Sampling
    from r1v_quant.model.images import load_image

    console = Console()
    images = [load_image(p) for p in image]
    sampling = Sampling(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                        max_new_tokens=max_new_tokens, greedy=greedy, seed=seed)
    if engine == "vllm":
        from r1v_quant.deploy.vllm_engine import chat_once

        if prompt is None:
            raise UserError("--engine vllm supports one-shot use with --prompt.")
        console.print(chat_once(model, prompt, image, sampling, system=system))
        return
    if engine != "torch":
        raise UserError(f"--engine {engine} is not one of torch, vllm.")

    from r1v_quant.model.r1v import load_model

    with console.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype)
    conv = Conversation(system=system)
    if prompt is not None:
        conv.add_user(prompt, images)
        _answer(console, loaded, conv, sampling, not hide_thinking)
        return
    console.print(f"[bold]{loaded.path}[/] on {loaded.device}. {HELP_TEXT}")
    _interactive(console, loaded, conv, sampling, not hide_thinking, images)


def _answer(console, loaded, conv, sampling, show_thinking: bool):
    from r1v_quant.model.generate import encode_conversation, generate

    ids, pixels, _ = encode_conversation(loaded.config, loaded.tokenizer, conv)
    opens_thinking = loaded.tokenizer.decode(ids[0, -4:]).rstrip().endswith("<think>")
    printer = ThinkingPrinter(console, show_thinking, starts_in_thinking=opens_thinking)
    reply = generate(loaded, ids, pixels, sampling, on_text=printer)
    printer.finish()
    if not reply.finished:
        console.print(f"[yellow](stopped at --max-new-tokens {sampling.max_new_tokens})[/]")
    conv.add_assistant(("<think>\n" if opens_thinking else "") + reply.text)
    return reply


def _interactive(console, loaded, conv, sampling, show_thinking, images):
    # Ctrl-C stops the reply being generated, not the chat: KeyboardInterrupt instead of the
    # command-wide handler, which ends the process.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _loop(console, loaded, conv, sampling, show_thinking, list(images))
    finally:
        signal.signal(signal.SIGINT, previous)


def _loop(console, loaded, conv, sampling, show_thinking, pending):
    from r1v_quant.errors import UserError
    from r1v_quant.model.images import load_image

    while True:
        try:
            line = console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            conv.reset()
            pending.clear()
            console.print("[dim]conversation cleared[/]")
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                pending.append(load_image(Path(path)))
                console.print(f"[dim]attached {path} to your next message[/]")
            except UserError as e:
                console.print(f"[red]{e}[/]")
            continue
        if text.startswith("/"):
            console.print(f"[dim]{HELP_TEXT}[/]")
            continue
        try:
            conv.add_user(text, pending)
        except UserError as e:
            console.print(f"[red]{e}[/]", highlight=False)
            continue
        pending = []
        console.print("[bold blue]r1v>[/] ", end="")
        try:
            _answer(console, loaded, conv, sampling, show_thinking)
        except KeyboardInterrupt:
            # The unanswered message leaves the conversation, so the next one starts clean.
            conv.turns.pop()
            console.print()
            console.print("[yellow](reply stopped; Ctrl-C again or Ctrl-D leaves)[/]")
