"""Text-only calibration samples: paragraphs of a .txt file, lines of a .jsonl file, or a
column of a Hugging Face data set.

A seeded choice keeps the source's own order, so the same file and seed always give the
same list, and a file with no more than ``n`` entries is used whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from r1v_quant.errors import UserError

from . import hub
from .sample import Sample, choose_indices, read_utf8  # noqa: F401  (read here by the text and chat readers)

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are separated by blank lines; empty ones are dropped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    texts = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not valid JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{path} line {number} has no string field {field!r}.")
        if record[field].strip():
            texts.append(record[field])
    return texts


def read_texts(path: str | Path) -> list[str]:
    """The entries of a .txt (paragraphs) or .jsonl ("text" field) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"the text calibration file {path} does not exist.")
    if path.suffix == ".txt":
        return split_paragraphs(read_utf8(path))
    if path.suffix == ".jsonl":
        return read_jsonl_texts(path)
    raise UserError(f"{path} is neither a .txt nor a .jsonl file.")


def text_samples(texts: Sequence[str], prefix: str, n: int, seed: int) -> list[Sample]:
    return [
        Sample(id=f"{prefix}:{i}", prompt=texts[i], kind="text", subject=prefix)
        for i in choose_indices(len(texts), n, seed)
    ]


def load_text(path: str | Path, n: int = 128, seed: int = 0) -> list[Sample]:
    """``n`` text samples from a local .txt or .jsonl file."""
    return text_samples(read_texts(path), f"text:{Path(path).name}", n, seed)


def load_hf_text(name: str, column: str | None = "text", n: int = 128, seed: int = 0, split: str = "train") -> list[Sample]:
    """``n`` text samples from one column of a Hugging Face data set (cached, or downloaded).

    With no column named, a set with chat columns (``messages``, or ``prompt`` and ``response``)
    gives chat samples (calib/chat.py); any other set its "text" column.
    """
    try:
        dataset = hub.load_hub_dataset(name, None, split, hub.hub_reachable)
    except hub.HubUnavailable:
        raise UserError(
            f"the Hugging Face data set {name!r} is not in the local cache and the Hub cannot be "
            "reached; pass a local file with --calib text:PATH instead."
        ) from None
    if column is None:
        from .chat import chat_from_dataset, is_chat_columns

        if is_chat_columns(dataset.column_names):
            return chat_from_dataset(dataset, name, n, seed)
        column = "text"
    if column == "messages" and "messages" in dataset.column_names:
        from .chat import chat_from_dataset

        return chat_from_dataset(dataset, name, n, seed)
    if column not in dataset.column_names:
        raise UserError(f"the data set {name!r} has no column {column!r}; it has {', '.join(dataset.column_names)}.")
    texts = [t for t in dataset[column] if isinstance(t, str) and t.strip()]
    return text_samples(texts, f"hf:{name}", n, seed)
