"""One finding of `inspect`: pass, warn or fail, with a sentence naming the problem."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LISTED = 3  # examples named in a finding before "and N more"


@dataclass
class Check:
    name: str
    status: str                # "pass", "warn" or "fail"
    message: str


def listing(items: list[str], total: int | None = None) -> str:
    """The first few items, and how many more there are."""
    total = len(items) if total is None else total
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {total - MAX_LISTED} more" if total > MAX_LISTED else "")
