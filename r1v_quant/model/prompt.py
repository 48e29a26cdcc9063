"""Prompt building for R1V: image placeholders, the chat template, thinking, embeddings.

The user writes one `<image>` per image; the model sees `<img>`, then one `<IMG_CONTEXT>`
token per visual token, then `</img>`. The LLM's input embeddings at the context positions
are overwritten with the projected vision features, in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from r1v_quant.errors import UserError

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
THINK_START = "<think>"
THINK_END = "</think>"

CHAT_ROLES = ("system", "user", "assistant")


def image_block(tiles: int, num_image_token: int) -> str:
    """The token text standing for one image of `tiles` tiles."""
    return IMG_START + IMG_CONTEXT * (num_image_token * tiles) + IMG_END


def check_image_markers(text: str, n_images: int) -> None:
    """A message may place fewer `<image>` markers than it has pictures (the rest go first), never more."""
    found = text.count(IMAGE_PLACEHOLDER)
    if found > n_images:
        raise UserError(f"The message has {found} {IMAGE_PLACEHOLDER} marker(s) but {n_images} picture(s) attached; "
                        f"attach one picture per marker (/image PATH) or remove the marker.")


def with_image_placeholders(text: str, n_images: int) -> str:
    """The text as written when it places any `<image>`; else one `<image>` per image up front, one per
    line, as the vendor's chat scripts and vLLM's processor do."""
    if n_images and IMAGE_PLACEHOLDER not in text:
        return (IMAGE_PLACEHOLDER + "\n") * n_images + text
    return text


def served_prompt(parts: Sequence[str | None]) -> str:
    """The user text vLLM's OpenAI chat server makes of one message's content parts (text, or
    None for a picture) for R1V, whose chat template takes the content as one string.

    vLLM joins the text parts with newlines, dropping empty ones, and puts one `<image>` per
    picture, each on its own line, in front: the pictures' places among the text are lost
    (unless the server runs with --interleave-mm-strings, which `serve` does not pass)."""
    texts = [p for p in parts if p]
    markers = [IMAGE_PLACEHOLDER] * sum(p is None for p in parts)
    return "\n".join(markers + (["\n".join(texts)] if texts else []))


def expand_image_placeholders(text: str, tiles_per_image: Sequence[int], num_image_token: int) -> str:
    """Replace each `<image>`, in order, by its image's `<img><IMG_CONTEXT>...</img>` block."""
    if any(t < 1 for t in tiles_per_image):
        raise ValueError(f"every image needs at least one tile, got tiles_per_image={list(tiles_per_image)}.")
    text = with_image_placeholders(text, len(tiles_per_image))
    found = text.count(IMAGE_PLACEHOLDER)
    if found != len(tiles_per_image):
        raise UserError(
            f"The prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {len(tiles_per_image)} image(s) "
            "were given; use one placeholder per image."
        )
    pieces = text.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for tiles, rest in zip(tiles_per_image, pieces[1:]):
        out.append(image_block(tiles, num_image_token))
        out.append(rest)
    return "".join(out)


def _check_messages(messages: Sequence[Mapping[str, object]]) -> None:
    if not messages:
        raise UserError("The conversation has no messages to render.")
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise UserError(f"Message {i} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}.")
        if not isinstance(content, str):
            raise UserError(f"Message {i} ({role}) has no text content.")


def render_chat(tokenizer, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True) -> str:
    """The prompt text from the tokenizer's own chat template.

    The result already starts with the BOS token, so encode it with
    `add_special_tokens=False` or the BOS appears twice.
    """
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(f"{source}/tokenizer_config.json has no chat_template, so a chat prompt cannot be built.")
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str.")
    return rendered


def reply_after_prompt(prompt: str, reply: str) -> str:
    """A written reply as it follows a rendered generation prompt, the way the model would produce it.

    R1 templates open the reasoning block in the generation prompt (``...<think>\\n``), so the
    model's own reply starts inside it. A published reply that opens the block itself would
    open it twice: its ``<think>`` (and the newline the prompt already ends with) is dropped.
    A reply to a prompt that does not open the block is kept as written.
    """
    opened = prompt.rstrip("\n").endswith(THINK_START)
    body = reply.lstrip()
    if not opened or not body.startswith(THINK_START):
        return reply
    body = body[len(THINK_START):]
    if prompt.endswith("\n") and body.startswith("\n"):
        body = body[1:]
    return body


def split_thinking(text: str) -> tuple[str, str]:
    """Split an R1 reply into (thinking, answer).

    The reply may start with `<think>` (or the prompt already ended with it) and its
    thinking closes at the first `</think>`, as vLLM's R1 reasoning parser reads it. A reply
    cut off before `</think>` is all thinking and has no answer.
    """
    body = text.lstrip()
    if body.startswith(THINK_START):
        body = body[len(THINK_START):]
    thinking, closed, answer = body.partition(THINK_END)
    if not closed:
        return body.strip(), ""
    return thinking.strip(), answer.strip()


def merge_image_embeddings(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    context_token_id: int,
) -> torch.Tensor:
    """Put the visual tokens at the `<IMG_CONTEXT>` positions, in reading order; returns a new tensor."""
    if inputs_embeds.shape[:2] != input_ids.shape:
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} and input_ids {tuple(input_ids.shape)} disagree on [B, T]."
        )
    mask = input_ids == context_token_id
    positions = int(mask.sum())
    if positions != image_embeds.shape[0]:
        raise ValueError(
            f"the prompt has {positions} image context tokens but {image_embeds.shape[0]} image embeddings were given."
        )
    if image_embeds.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"image embeddings have width {image_embeds.shape[-1]}, the LLM expects {inputs_embeds.shape[-1]}."
        )
    merged = inputs_embeds.clone()
    # Boolean indexing walks the mask row-major (sample, then position), which is the order
    # the vision features were produced in.
    merged[mask] = image_embeds.to(device=merged.device, dtype=merged.dtype)
    return merged


def truncate_tokens(ids: Sequence[int], max_len: int, img_start_id: int, img_end_id: int) -> list[int]:
    """Keep at most max_len tokens from the start, dropping a whole image block rather than cutting it.

    A partial `<img>...</img>` block would leave context tokens with no matching visual
    features, so when the cut falls inside one the block goes entirely. Count the kept
    `<img>` ids to know how many images remain.
    """
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}.")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    open_at = None
    for pos, tok in enumerate(ids[:max_len]):
        if tok == img_start_id:
            open_at = pos
        elif tok == img_end_id:
            open_at = None
    # A block still open at the cut is one whose `</img>` would be lost.
    cut = max_len if open_at is None else open_at
    return ids[:cut]
