"""Progress of long work: rich bars on a terminal, one plain line per step anywhere else.

A log file or a CI console gets no redraws from rich's bars, so off a terminal every step is a
line of its own with the elapsed time and an estimate of what is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# update(label, done, total, note): `done` of `total` steps of the work called `label` are finished.
StepFn = Callable[[str, int, "int | None", str], None]


def clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(elapsed: float, done: int, total: int | None) -> float | None:
    """Seconds left at the mean pace so far; None before the first step or without a total."""
    if not total or done <= 0:
        return None
    return elapsed / done * max(0, total - done)


def step_line(label: str, done: int, total: int | None, note: str, elapsed: float) -> str:
    left = eta(elapsed, done, total)
    count = f"{done}/{total}" if total else str(done)
    return (f"{label} {count}" + (f"  {note}" if note else "")
            + f"  elapsed {clock(elapsed)}  ETA {clock(left) if left is not None else '?'}")


class _Lines:
    def __init__(self, console: Console):
        self.console = console
        self.started: dict[str, float] = {}
        self.shown: dict[str, int] = {}
        # Steps are reported when they finish, so a new label's clock starts at the previous
        # report (the work before its first step is part of it), or when the work began.
        self.last = time.perf_counter()

    def __call__(self, label: str, done: int, total: int | None, note: str = "") -> None:
        now = time.perf_counter()
        start = self.started.setdefault(label, self.last)
        if self.shown.get(label) == done:
            return
        self.shown[label] = done
        self.last = now
        self.console.print(escape(step_line(label, done, total, note, now - start)), highlight=False, soft_wrap=True)
        self.console.file.flush()


class _Bars:
    def __init__(self, bars: Progress):
        self.bars = bars
        self.tasks: dict[str, int] = {}

    def __call__(self, label: str, done: int, total: int | None, note: str = "") -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bars.add_task(label, total=total, note=note)
        self.bars.update(self.tasks[label], completed=done, total=total, note=note)


@contextmanager
def steps(console: Console) -> Iterator[StepFn]:
    """Yield `update(label, done, total, note="")`; bars on a terminal, plain lines otherwise."""
    if not console.is_terminal:
        yield _Lines(console)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bars:
        yield _Bars(bars)
