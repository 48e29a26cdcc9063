"""Calibration samples -> language-model input embeddings, exactly as chat and eval pose them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.model.prompt import IMG_CONTEXT, IMG_END, IMG_START, render_chat, reply_after_prompt, truncate_tokens


@dataclass
class Encoded:
    sample_id: str
    ids: list[int]
    pixel_values: torch.Tensor | None  # tiles of the images whose blocks survived truncation


def encode_sample(sample: Sample, cfg, tok, seq_len: int) -> Encoded:
    from r1v_quant.model.generate import encode_prompt

    img_start = tok.convert_tokens_to_ids(IMG_START)
    img_end = tok.convert_tokens_to_ids(IMG_END)
    pixels, tiles = None, []
    response = sample.response
    if sample.kind == "text":
        ids = tok(sample.prompt, add_special_tokens=True).input_ids
    elif sample.kind == "chat":
        # the turns as the chat template renders them (it writes BOS itself), the reply after its generation prompt
        rendered = render_chat(tok, sample.messages, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False).input_ids
        response = reply_after_prompt(rendered, response or "")
    else:
        ids_t, pixels, tiles = encode_prompt(cfg, tok, sample.prompt, sample.images)
        ids = ids_t[0].tolist()
    if response:
        ids = ids + tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = truncate_tokens(ids, seq_len, img_start, img_end)
    kept_images = ids.count(img_start)
    if pixels is not None and kept_images:
        pixels = pixels[: sum(tiles[:kept_images])]
    else:
        pixels = None
    return Encoded(sample.id, ids, pixels)


def is_image_stub(sample: Sample, enc: Encoded, img_start: int) -> bool:
    """A sample posed with images whose every image block was cut: a few prompt tokens asking about nothing."""
    return bool(sample.images) and enc.ids.count(img_start) == 0


def encode_samples(samples: list[Sample], cfg, tok, seq_len: int, max_tokens: int) -> tuple[list[Encoded], int]:
    """Encode in order until the total-token cap; the sample that crosses it is truncated to fit.

    Returns the encoded samples and how many image stubs were skipped: a sample whose image block
    does not fit `seq_len` (or the room left under the cap) is left out rather than kept as the
    handful of tokens before its image.
    """
    img_start = tok.convert_tokens_to_ids(IMG_START)
    out: list[Encoded] = []
    used = skipped = 0
    for sample in samples:
        room = max_tokens - used
        if room <= 0:
            break
        enc = encode_sample(sample, cfg, tok, min(seq_len, room))
        if is_image_stub(sample, enc, img_start):
            skipped += 1
            continue
        if len(enc.ids) < 2:
            continue
        out.append(enc)
        used += len(enc.ids)
    if not out:
        raise UserError("the calibration set has no usable tokens (every sample was empty after encoding, or its "
                        "image did not fit --seq-len).")
    return out, skipped


def composition(encoded: list[Encoded], tok, skipped: int) -> dict[str, str]:
    """What the calibration tokens are: samples, tokens, image share, tiles, and the stubs left out."""
    tokens = sum(len(e.ids) for e in encoded)
    tiles = sum(0 if e.pixel_values is None else e.pixel_values.shape[0] for e in encoded)
    with_images = sum(e.pixel_values is not None for e in encoded)
    return {"samples": f"{len(encoded)} ({with_images} with images, {len(encoded) - with_images} text only)",
            "tokens": f"{tokens} ({image_token_share(encoded, tok):.1%} image tokens)",
            "image tiles": str(tiles),
            "image stubs skipped": f"{skipped} (samples whose image block did not fit)"}


@torch.no_grad()
def embed_encoded(front, encoded: list[Encoded], device: torch.device) -> Iterator[torch.Tensor]:
    """[1, T, D] float32 CPU tensors: token embeddings with the visual tokens merged in."""
    for enc in encoded:
        ids = torch.tensor([enc.ids], device=device)
        pixels = None if enc.pixel_values is None else enc.pixel_values.to(device, front.mlp1[1].weight.dtype)
        yield front.input_embeddings(ids, pixels).float().cpu()


def image_token_share(encoded: list[Encoded], tok) -> float:
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    total = sum(len(e.ids) for e in encoded)
    return sum(e.ids.count(ctx) for e in encoded) / max(total, 1)

