"""Interactive chat in a real process: Ctrl-C stops a reply and the chat goes on; Ctrl-D leaves;
a message with more <image> markers than pictures is refused; the reasoning is labelled."""

import io
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from r1v_quant.cli.chat import ANSWER_LABEL, THINKING_LABEL, ThinkingPrinter
from r1v_quant.errors import UserError
from r1v_quant.model.generate import Conversation


def read_until(proc, marker: str, seen: list[str], after: str = "", timeout: float = 60.0) -> bool:
    """Read the process's output into `seen` until `marker` appears (after the last `after`, if given)."""
    def found() -> bool:
        text = "".join(seen)
        return marker in (text[text.rindex(after):] if after and after in text else text)

    end = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while time.monotonic() < end:
        if found():
            return True
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:
                return found()
            seen.append(chunk)
    return False


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tiny_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "r1v_quant.cli.main", "chat", "--model", str(tiny_dir), "--device", "cpu",
                             "--max-new-tokens", "100000", "--seed", "0", "--temperature", "1.0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen: list[str] = []
    try:
        assert read_until(proc, "you> ", seen), "".join(seen)
        proc.stdin.write(b"count the bars\n")
        proc.stdin.flush()
        assert read_until(proc, "r1v> ", seen), "".join(seen)
        time.sleep(1.0)  # well into a reply of up to 100000 tokens
        proc.send_signal(signal.SIGINT)
        assert read_until(proc, "(reply stopped; Ctrl-C again or Ctrl-D leaves)", seen), "".join(seen)
        assert read_until(proc, "you> ", seen, after="(reply stopped"), "".join(seen)
        proc.stdin.write(b"what is in <image> and <image>?\n")
        proc.stdin.flush()
        assert read_until(proc, "attach one picture per marker", seen), "".join(seen)
        proc.stdin.close()  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen)
    assert "The message has 2 <image> marker(s) but 0 picture(s) attached" in text
    assert proc.stderr.read() == b""


def test_more_markers_than_pictures_are_refused():
    conv = Conversation()
    with pytest.raises(UserError, match="1 <image> marker"):
        conv.add_user("what is <image>?")
    assert conv.turns == []
    conv.add_user("plain text")
    assert conv.turns[0].text == "plain text"


def test_the_reasoning_and_the_answer_are_labelled():
    buf = io.StringIO()
    printer = ThinkingPrinter(Console(file=buf, width=200), show_thinking=True, starts_in_thinking=True)
    for chunk in ("three sides", ", so a tri", "angle</th", "ink>\n\nA triangle."):
        printer(chunk)
    printer.finish()
    assert buf.getvalue() == f"{THINKING_LABEL}three sides, so a triangle\n{ANSWER_LABEL}A triangle.\n"
    hidden = io.StringIO()
    printer = ThinkingPrinter(Console(file=hidden, width=200), show_thinking=False, starts_in_thinking=True)
    printer("secret</think>A.")
    printer.finish()
    assert hidden.getvalue() == "A.\n"
