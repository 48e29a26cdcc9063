"""Chat-style calibration data: published conversations and reasoning traces, read as the model would see them.

A row is either a ``messages`` list of ``{"role", "content"}`` turns whose last turn is the
assistant's reply, or ``prompt`` and ``response`` columns (and an optional ``system`` column).
The reply becomes the sample's ``response`` and everything before it its ``messages``; the
encoder renders the messages with the model's own chat template and appends the reply after the
generation prompt (`r1v_quant.model.prompt.reply_after_prompt`), so a published R1 trace
``<think>...</think> answer`` reads exactly as the model's own reasoning would.

Sources: a ``.jsonl`` or ``.parquet`` file, or a Hugging Face data set (``hf:NAME``), chosen
by the columns they hold. A malformed row is refused in one sentence naming the file and line
(or row) before any model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from r1v_quant.errors import UserError

from .sample import Sample, choose_indices, read_utf8

CHAT_KIND = "chat"
ROLES = ("system", "user", "assistant")
MESSAGES = "messages"
PROMPT, RESPONSE, SYSTEM = "prompt", "response", "system"


def is_chat_columns(columns: Iterable[str]) -> bool:
    """Whether a table's columns make it chat-style data."""
    names = set(columns)
    return MESSAGES in names or {PROMPT, RESPONSE} <= names


def _bad(where: str, why: str) -> UserError:
    return UserError(f"{where} {why}; each row needs a {MESSAGES!r} list of {{'role', 'content'}} turns ending "
                     f"with the assistant's reply, or string {PROMPT!r} and {RESPONSE!r} fields.")


def row_turns(record: Any, where: str) -> list[dict[str, str]]:
    """The conversation of one row, as role/content dicts ending with the assistant's reply."""
    if not isinstance(record, dict):
        raise _bad(where, "is not an object")
    if MESSAGES in record and record[MESSAGES] is not None:
        turns = record[MESSAGES]
        if not isinstance(turns, (list, tuple)) or not turns:
            raise _bad(where, f"has a {MESSAGES!r} entry that is not a non-empty list")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise _bad(where, f"has message {i} that is not a {{'role': system|user|assistant, 'content': text}} "
                                  "object")
            out.append({"role": turn["role"], "content": turn["content"]})
    elif isinstance(record.get(PROMPT), str) and isinstance(record.get(RESPONSE), str):
        out = [{"role": "user", "content": record[PROMPT]}, {"role": "assistant", "content": record[RESPONSE]}]
        if isinstance(record.get(SYSTEM), str) and record[SYSTEM]:
            out.insert(0, {"role": "system", "content": record[SYSTEM]})
    else:
        raise _bad(where, f"has neither a {MESSAGES!r} list nor string {PROMPT!r} and {RESPONSE!r} fields")
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise _bad(where, "does not end with a non-empty assistant message")
    if not any(t["role"] == "user" for t in out[:-1]):
        raise _bad(where, "has no user message before the assistant's reply")
    return out


def chat_sample(turns: Sequence[dict[str, str]], sample_id: str, source: str) -> Sample:
    last_user = next(t["content"] for t in reversed(turns[:-1]) if t["role"] == "user")
    return Sample(id=sample_id, prompt=last_user, kind=CHAT_KIND, subject=source, response=turns[-1]["content"],
                  messages=[dict(t) for t in turns[:-1]])


def read_jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed record) of every non-blank line."""
    rows = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not valid JSON.") from None
    return rows


def is_chat_jsonl(path: Path) -> bool:
    """Whether the first record of a .jsonl file is chat-style (a bare .jsonl path is read as chat data)."""
    for _, record in read_jsonl_rows(path)[:1]:
        return isinstance(record, dict) and is_chat_columns(record)
    return False


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as error:  # noqa: BLE001 - pyarrow reports bad files with many exception types
        raise UserError(f"could not read {path} as parquet ({error}).") from None


def _samples(rows: Sequence[tuple[int, Any]], where: str, label: str, n: int, seed: int) -> list[Sample]:
    # every row is checked, not only the chosen ones: a bad file fails the same whatever the seed
    turns = [row_turns(record, f"{where} {number}") for number, record in rows]
    if not turns:
        raise UserError(f"{label} has no conversations.")
    return [chat_sample(turns[i], f"chat:{label}:{rows[i][0]}", f"chat:{label}")
            for i in choose_indices(len(turns), n, seed)]


def load_chat_file(path: str | Path, n: int = 128, seed: int = 0) -> list[Sample]:
    """``n`` chat samples from a local .jsonl or .parquet file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"the chat calibration file {path} does not exist.")
    if path.suffix == ".jsonl":
        return _samples(read_jsonl_rows(path), f"{path} line", path.name, n, seed)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = parquet_columns(path)
        if not is_chat_columns(columns):
            raise UserError(f"{path} has neither a {MESSAGES!r} column nor {PROMPT!r} and {RESPONSE!r} columns.")
        wanted = [c for c in (MESSAGES, PROMPT, RESPONSE, SYSTEM) if c in columns]
        records = pq.read_table(path, columns=wanted).to_pylist()
        return _samples(list(enumerate(records, start=1)), f"{path} row", path.name, n, seed)
    raise UserError(f"{path} is neither a .jsonl nor a .parquet file.")


def chat_from_dataset(dataset, name: str, n: int, seed: int) -> list[Sample]:
    """``n`` chat samples from a ``datasets`` split already known to have chat columns."""
    wanted = [c for c in (MESSAGES, PROMPT, RESPONSE, SYSTEM) if c in dataset.column_names]
    records = dataset.select_columns(wanted).to_list()
    return _samples(list(enumerate(records, start=1)), f"hf:{name} row", f"hf:{name}", n, seed)
