"""Conversations with images, turned into model inputs, and streamed generation through transformers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from r1v_quant.model.images import load_image, preprocess
from r1v_quant.model.prompt import (
    check_image_markers,
    expand_image_placeholders,
    render_chat,
    split_thinking,
    with_image_placeholders,
)


@dataclass
class Sampling:
    """The vendor's defaults: temperature 0.6, top_p 0.95, repetition_penalty 1.05."""

    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    max_new_tokens: int = 2048
    greedy: bool = False
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": 1.0, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None,
                "repetition_penalty": self.repetition_penalty}


@dataclass
class Turn:
    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Conversation:
    """A multi-turn chat; each user turn carries its own images, placed at its `<image>` markers."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def add_user(self, text: str, images: list[Image.Image] | None = None) -> None:
        images = list(images or [])
        # Refused here: a turn without pictures is never expanded, so a stray marker would reach the model as text.
        check_image_markers(text, len(images))
        self.turns.append(Turn("user", with_image_placeholders(text, len(images)), images))

    def add_assistant(self, text: str) -> None:
        self.turns.append(Turn("assistant", text))

    def reset(self) -> None:
        self.turns.clear()

    @property
    def images(self) -> list[Image.Image]:
        return [im for t in self.turns for im in t.images]


def user_turn(text: str, images: list[Image.Image] | None = None) -> Conversation:
    """A conversation of one user message: how a single question (a sample, a prompt) is posed."""
    conv = Conversation()
    conv.add_user(text, images)
    return conv


def encode_prompt(cfg, tok, text: str, images: list[Image.Image] | None = None):
    """`encode_conversation` of one user message: (ids [1, T], pixel values or None, tiles per image)."""
    return encode_conversation(cfg, tok, user_turn(text, images))


def encode_conversation(cfg, tok, conv: Conversation) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Token ids [1, T], pixel values [tiles, 3, H, W] (or None) and tiles per image, for the next reply."""
    pixel_values, tiles = (None, [])
    if conv.images:
        pixel_values, tiles = preprocess(conv.images, cfg)
    messages = [] if conv.system is None else [{"role": "system", "content": conv.system}]
    cursor = 0
    for turn in conv.turns:
        text = turn.text
        if turn.images:
            text = expand_image_placeholders(text, tiles[cursor: cursor + len(turn.images)], cfg.num_image_token)
            cursor += len(turn.images)
        messages.append({"role": turn.role, "content": text})
    prompt = render_chat(tok, messages, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    return ids, pixel_values, tiles


class _TextStream(BaseStreamer):
    """Decodes generated ids incrementally and hands new text to a callback; the
    end-of-sequence token ends the reply and is not part of its text."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tok, self.on_text = tokenizer, on_text
        self.eos = tokenizer.eos_token_id
        self.ids: list[int] = []
        self.sent = 0
        self.skip_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:
            self.skip_prompt = False
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist() if int(v) != self.eos)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        # Hold back an incomplete UTF-8 sequence until its remaining bytes arrive.
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


@dataclass
class Reply:
    token_ids: list[int]
    text: str
    thinking: str
    answer: str
    finished: bool  # False when max_new_tokens ran out before the end-of-sequence token


@torch.inference_mode()
def generate(loaded, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, sampling: Sampling,
             on_text: Callable[[str], None] | None = None) -> Reply:
    model, tok = loaded.model, loaded.tokenizer
    ids = input_ids.to(loaded.device)
    embeds = model.input_embeddings(ids, None if pixel_values is None else pixel_values.to(loaded.device, loaded.dtype))
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    eos = tok.eos_token_id
    out = model.language_model.generate(
        input_ids=ids,
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        streamer=_TextStream(tok, on_text) if on_text else None,
        **sampling.generate_kwargs(),
    )
    new = out[0, ids.shape[1]:].tolist()
    finished = bool(new) and new[-1] == eos
    body = new[:-1] if finished else new
    text = tok.decode(body, skip_special_tokens=False)
    thinking, answer = split_thinking(text)
    return Reply(new, text, thinking, answer, finished)


def reply_to(loaded, conv: Conversation, sampling: Sampling, on_text=None) -> Reply:
    ids, pixels, _ = encode_conversation(loaded.config, loaded.tokenizer, conv)
    return generate(loaded, ids, pixels, sampling, on_text)


def greedy_ids(model_dir, prompt_text: str, max_new_tokens: int = 16, image_paths=(), device: str | None = None) -> list[int]:
    """Greedy reply token ids for one user message: the reference other engines are compared with."""
    from r1v_quant.model.r1v import load_model

    loaded = load_model(model_dir, device=device)
    conv = user_turn(prompt_text, [load_image(Path(p)) for p in image_paths])
    return reply_to(loaded, conv, Sampling(greedy=True, max_new_tokens=max_new_tokens)).token_ids
