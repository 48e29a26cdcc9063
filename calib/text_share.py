"""A floor on the share of text tokens in the calibration set (`awq --text-share`).

A picture costs hundreds of tokens and its question a few dozen, so a multimodal set is mostly
image tokens, and the text the model reasons in is a few percent of the calibration. Balancing
the searches reweights those few text tokens but cannot add coverage. With a share asked, the
last image-bearing samples make room under the token cap, and text-only samples fill it until
text is at least the asked share of all tokens.

The fill comes from the set itself: the entries of a mixture's text parts (text:PATH,
hf:NAME) not already drawn, or, for a set without text parts, the built-in questions as text
(no picture, each followed by its reference reasoning reply), drawn after the built-in items
the set uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from r1v_quant.errors import UserError
from r1v_quant.model.prompt import IMG_CONTEXT

from .builtin import text_form
from .encode import Encoded, encode_sample, encode_samples
from .sample import Sample
from .sets import part_loader, split_spec

# The last fill sample is cut to what the share still needs, but never below this many tokens:
# a shorter piece is a chat header with nothing in it.
MIN_FILL_TOKENS = 16
_EVERY_ENTRY = 2**31  # a loader asked for more entries than any source holds returns them all


def check_text_share(value) -> float:
    """The share as a float in [0, 1]; one sentence otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    if not ok:
        raise UserError(f"--text-share {value} must be a number from 0 to 1 (the least share of text tokens in the "
                        "calibration set, e.g. 0.25).")
    return float(value)


@dataclass(frozen=True)
class ShareNote:
    """What share of text tokens was asked and reached, and with what fill."""

    asked: float
    reached: float
    fill_samples: int = 0
    fill_tokens: int = 0
    dropped: int = 0           # image-bearing samples left out to make room
    source: str = ""
    short: str | None = None   # why the asked share was not reached

    def line(self) -> str:
        if self.asked == 0:
            return f"{self.reached:.1%} (no floor asked: --text-share 0)"
        text = f"{self.reached:.1%} (asked {self.asked:.1%}"
        if self.fill_samples:
            text += f"; {self.fill_samples} text-only samples, {self.fill_tokens} tokens, from {self.source}"
            if self.dropped:
                text += f", in place of {self.dropped} image-bearing samples"
        elif not self.short:
            text += "; the set already had it"
        return text + (f"; not reached: {self.short})" if self.short else ")")


def text_parts(spec: str) -> list[str]:
    return [p for p in split_spec(spec.strip()) if p.startswith(("text:", "hf:", "chat:"))]


def fill_source(spec: str, seed: int, samples: int, calib_path: str | Path | None,
                used: set[str]) -> tuple[str, Iterator[Sample]]:
    """Where the fill comes from, and its samples in order (the set's own entries excluded)."""
    parts = text_parts(spec)
    if not parts:
        def builtin_texts() -> Iterator[Sample]:
            index = samples  # past every built-in item the set itself can use
            while True:
                yield text_form(seed, index)
                index += 1

        return "the built-in questions as text", builtin_texts()

    def part_texts() -> Iterator[Sample]:
        for part in parts:
            for sample in part_loader(part, calib_path)(_EVERY_ENTRY, seed):
                if sample.id not in used:
                    yield sample

    return "the unused entries of " + " and ".join(parts), part_texts()


def text_tokens(encoded: Iterable[Encoded], context_id: int) -> tuple[int, int]:
    """(all tokens, text tokens): every token that is not an image-context token is text."""
    total = text = 0
    for e in encoded:
        total += len(e.ids)
        text += len(e.ids) - e.ids.count(context_id)
    return total, text


def text_needed(total: int, text: int, share: float, cap: int) -> int:
    """Text tokens to add so that text is at least ``share`` of all tokens (all the room at share 1)."""
    if share >= 1:
        return cap - total
    return max(0, math.ceil((share * total - text) / (1 - share)))


def encode_with_text_share(samples: list[Sample], fill: tuple[str, Iterator[Sample]] | None, cfg, tok, seq_len: int,
                           max_tokens: int, share: float) -> tuple[list[Encoded], int, ShareNote]:
    """`encode_samples`, then image-bearing samples dropped from the end and text-only ones added
    until text is at least ``share`` of the tokens, within ``max_tokens``.

    At share 0 (or when the set already has the share) the tokens are exactly `encode_samples`'.
    """
    context = tok.convert_tokens_to_ids(IMG_CONTEXT)
    encoded, skipped = encode_samples(samples, cfg, tok, seq_len, max_tokens) if share < 1 else ([], 0)
    if share >= 1:  # nothing of the set can stay but its text-only samples
        text_only = [s for s in samples if not s.images]
        if text_only:
            encoded, skipped = encode_samples(text_only, cfg, tok, seq_len, max_tokens)
    total, text = text_tokens(encoded, context)
    if share == 0 or (encoded and text >= share * total):
        return encoded, skipped, ShareNote(share, text / max(total, 1))
    dropped = 0
    while total + text_needed(total, text, share, max_tokens) > max_tokens:
        last = max((i for i, e in enumerate(encoded) if e.pixel_values is not None), default=None)
        if last is None:
            break
        gone = encoded.pop(last)
        total, text = total - len(gone.ids), text - (len(gone.ids) - gone.ids.count(context))
        dropped += 1
    name, pool = fill if fill is not None else ("", iter(()))
    left, added, added_tokens = text_needed(total, text, share, max_tokens), 0, 0
    for sample in pool:
        room = max_tokens - total
        if left <= 0 or room < MIN_FILL_TOKENS:
            break
        enc = encode_sample(sample, cfg, tok, min(seq_len, room, max(left, MIN_FILL_TOKENS)))
        if len(enc.ids) < 2:
            continue
        encoded.append(enc)
        total, text = total + len(enc.ids), text + len(enc.ids) - enc.ids.count(context)
        left, added, added_tokens = left - len(enc.ids), added + 1, added_tokens + len(enc.ids)
    if not encoded:
        raise UserError(f"--text-share {share:g} leaves no image-bearing samples and the set has no text to fill "
                        "with; lower --text-share or add a text part such as +text:PATH.")
    reached = text / total
    short = None
    if reached < share and share < 1:
        short = ("the text to fill with ran out" if left > 0 and max_tokens - total >= MIN_FILL_TOKENS
                 else "the token cap left no room")
    return encoded, skipped, ShareNote(share, reached, added, added_tokens, dropped, name, short)
