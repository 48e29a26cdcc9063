"""Named calibration sets and mixtures of them, from one spec string.

Accepted specs::

    builtin                 the offline procedural set (its "calib" split)
    mmmu-sample             MMMU validation questions (from --calib-path or the caches)
    text:PATH               paragraphs of a .txt file or "text" fields of a .jsonl file
    chat:PATH               conversations of a .jsonl or .parquet file: a "messages" list, or
                            "prompt" and "response" columns (calib/chat.py)
    hf:NAME[:column]        a column ("text" by default) of a Hugging Face data set; a set with a
                            "messages" column or "prompt" and "response" columns is read as chat data
    PATH                    a .jsonl file of conversations, a .parquet file of conversations, or
                            a folder of parquet files or one .parquet file in MMMU's layout
    A+B[+...]               a mixture; ``mix`` weights split ``n`` between the parts

A spec that names an existing file or folder is read as a path before any "+" splits it.
A part that yields fewer samples than its share is not topped up from the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from r1v_quant.errors import UserError

from .builtin import builtin_samples
from .chat import is_chat_columns, is_chat_jsonl, load_chat_file, parquet_columns
from .mmmu import load_mmmu
from .sample import Sample
from .text import load_hf_text, load_text

ACCEPTED_FORMS = (
    "builtin, mmmu-sample, text:PATH (.txt or .jsonl), chat:PATH (.jsonl or .parquet), hf:NAME[:column], "
    "a folder or .parquet file in MMMU's layout, or a mixture such as mmmu-sample+text:PATH"
)


def split_counts(n: int, weights: Sequence[float]) -> list[int]:
    """``n`` split in proportion to ``weights`` by largest remainder; ties go to earlier parts."""
    total = float(sum(weights))
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_spec(spec: str) -> list[str]:
    """The parts of a mixture spec; an existing path is one part even if it holds '+'."""
    if not spec:
        raise UserError(f"no calibration set was named; use {ACCEPTED_FORMS}.")
    if "+" not in spec or Path(spec).expanduser().exists():
        return [spec]
    parts = [part.strip() for part in spec.split("+")]
    if not all(parts):
        raise UserError(f"calibration set {spec!r} has an empty part; use {ACCEPTED_FORMS}.")
    return parts


def check_mix(mix: Sequence[float] | None, parts: Sequence[str]) -> list[float]:
    if mix is None:
        return [1.0] * len(parts)
    weights = [float(w) for w in mix]
    if len(weights) != len(parts):
        raise UserError(f"--mix has {len(weights)} weight(s) but the calibration set has {len(parts)} part(s).")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError("--mix weights must be non-negative numbers with a positive sum.")
    return weights


def part_loader(part: str, calib_path: str | Path | None) -> Callable[[int, int], list[Sample]]:
    """A loader ``(n, seed) -> samples`` for one non-mixture spec; bad specs fail here, early."""
    if part == "builtin":
        return lambda n, seed: builtin_samples(n, seed=seed, split="calib")
    if part == "mmmu-sample":
        return lambda n, seed: load_mmmu(calib_path, n=n, seed=seed)
    if part.startswith("text:") and len(part) > len("text:"):
        return lambda n, seed: load_text(part[len("text:"):], n=n, seed=seed)
    if part.startswith("chat:") and len(part) > len("chat:"):
        return lambda n, seed: load_chat_file(part[len("chat:"):], n=n, seed=seed)
    if part.startswith("hf:") and len(part) > len("hf:"):
        name, _, column = part[len("hf:"):].partition(":")
        return lambda n, seed: load_hf_text(name, column=column or None, n=n, seed=seed)
    path = Path(part).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        if not is_chat_jsonl(path):
            raise UserError(f"{path} is not chat data (its first row has no 'messages' list and no 'prompt' and "
                            "'response' fields); pass text:PATH for a .jsonl of \"text\" fields.")
        return lambda n, seed: load_chat_file(path, n=n, seed=seed)
    if path.is_file() and path.suffix == ".parquet" and is_chat_columns(parquet_columns(path)):
        return lambda n, seed: load_chat_file(path, n=n, seed=seed)
    if path.is_dir() or path.suffix == ".parquet":
        return lambda n, seed: load_mmmu(path, n=n, seed=seed)
    raise UserError(f"unknown calibration set {part!r}; use {ACCEPTED_FORMS}.")


def load_calibration(
    spec: str,
    n: int = 128,
    seed: int = 0,
    calib_path: str | Path | None = None,
    mix: Sequence[float] | None = None,
) -> list[Sample]:
    """The calibration samples a spec names, parts concatenated in the spec's order."""
    if n <= 0:
        raise UserError(f"the number of calibration samples must be positive (got {n}).")
    parts = split_spec(spec.strip())
    counts = split_counts(n, check_mix(mix, parts))
    samples: list[Sample] = []
    loaders = [part_loader(part, calib_path) for part in parts]
    for load, count in zip(loaders, counts):
        if count:
            samples.extend(load(count, seed))
    if not samples:
        raise UserError(f"calibration set {spec!r} yielded no samples.")
    return samples
