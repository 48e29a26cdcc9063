"""Posing each question to a model, its replies, and teacher forcing: the model's next-token
log-probabilities on a fixed sequence, summarised (the reference) or compared with that summary
(every other model). The KL is coarse-grained over the reference's top-k tokens and one bin for
the rest; see `r1v_quant.evals.run`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals.settings import EvalSettings


@dataclass
class Prompt:
    ids: torch.Tensor                 # [1, T] on CPU
    pixels: torch.Tensor | None       # [tiles, 3, H, W] on CPU


def encode(loaded, sample: Sample, text_tokens: int) -> Prompt:
    """What the model reads: the chat prompt (question suites) or the text itself."""
    from r1v_quant.model.generate import encode_prompt

    tok = loaded.tokenizer
    if sample.kind == "text":
        ids = tok(sample.prompt, add_special_tokens=True).input_ids[:text_tokens]
        return Prompt(torch.tensor([ids]), None)
    ids, pixels, _ = encode_prompt(loaded.config, tok, sample.prompt, sample.images)
    return Prompt(ids, pixels)


def prompt_opens_think(tok, ids: torch.Tensor) -> bool:
    """Whether the rendered generation prompt already opened the reasoning block, so a
    reply without ``</think>`` is unfinished rather than an answer."""
    tail = tok.decode(ids[0, -8:].tolist(), skip_special_tokens=False)
    return tail.rstrip().endswith("<think>")


def embed_prompt(loaded, prompt: Prompt) -> torch.Tensor:
    pixels = None if prompt.pixels is None else prompt.pixels.to(loaded.device, loaded.dtype)
    return loaded.model.input_embeddings(prompt.ids.to(loaded.device), pixels)


# ---------------------------------------------------------------- generation


@dataclass
class Reply:
    ids: list[int]        # generated tokens, the end-of-sequence token included when reached
    text: str             # decoded, end-of-sequence token left out
    finished: bool        # False when max_new_tokens ran out first


def _sampling(settings: EvalSettings):
    from r1v_quant.model.generate import Sampling

    return Sampling(temperature=settings.temperature, top_p=settings.top_p,
                    repetition_penalty=settings.repetition_penalty, max_new_tokens=settings.max_new_tokens,
                    greedy=settings.greedy)


def _left_pad(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0]:] = r
    return out


def cut_reply(tok, row: list[int], eos: int) -> Reply:
    finished = eos in row
    ids = row[: row.index(eos) + 1] if finished else row
    body = ids[:-1] if finished else ids
    return Reply(ids, tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False), finished)


@torch.inference_mode()
def generate_batch(loaded, prompts: Sequence[Prompt], embeds: Sequence[torch.Tensor], settings: EvalSettings,
                   seed: int) -> list[Reply]:
    """Replies to several prompts at once (``embeds``: each prompt's [T, D] input embeddings):
    left-padded, one generate call."""
    tok, lm = loaded.tokenizer, loaded.model.language_model
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = _left_pad([p.ids[0].to(loaded.device) for p in prompts], pad)
    mask = _left_pad([torch.ones(p.ids.shape[1], dtype=torch.long, device=loaded.device) for p in prompts], 0)
    if not settings.greedy:
        torch.manual_seed(seed)
    out = lm.generate(input_ids=ids, inputs_embeds=_left_pad(list(embeds), 0.0), attention_mask=mask,
                      max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                      **_sampling(settings).generate_kwargs())
    return [cut_reply(tok, row, eos) for row in out[:, ids.shape[1]:].tolist()]


def batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), in a fixed order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + size] for i in range(0, len(order), size)]


# ---------------------------------------------------------------- teacher forcing


@dataclass
class RefDist:
    """The reference at the measured positions of one sequence."""

    logp: torch.Tensor      # [P, k] float32, its k largest log-probs, descending
    ids: torch.Tensor       # [P, k] int64, their tokens
    tail: torch.Tensor      # [P] float32, log of the mass outside them (-inf when k covers the vocabulary)
    top1: torch.Tensor      # [P] int64, its most likely token
    nll: torch.Tensor       # [P] float32, -log p(actual next token)


_DIST_FIELDS = ("logp", "ids", "tail", "top1", "nll")


@dataclass
class Closeness:
    """One model against the reference on one sequence, summed over positions."""

    kl: float = 0.0
    top1_same: int = 0
    nll: float = 0.0
    positions: int = 0


@dataclass
class ItemResult:
    """One model on one question or text."""

    sample_id: str
    reply: Reply | None = None
    think_opened: bool = False
    close: Closeness = field(default_factory=Closeness)


_LOGIT_CHUNK = 512  # positions per float32 [chunk, vocab] block: bounds memory on a 152k vocabulary


def _measured(prompt_len: int, reply_ids: Sequence[int] | None, kl_positions: int) -> tuple[torch.Tensor, int, int]:
    """(tokens appended after the prompt, first measured position, number of measured positions)."""
    if reply_ids is None:  # text: every next-token prediction of the text itself
        return torch.empty(0, dtype=torch.long), 0, prompt_len - 1
    reply = torch.tensor(list(reply_ids)[:kl_positions], dtype=torch.long)
    return reply, prompt_len - 1, reply.numel()


@torch.inference_mode()
def position_logprobs(loaded, prompt_embeds: torch.Tensor, prompt_ids: torch.Tensor, reply_ids: Sequence[int] | None,
                      kl_positions: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 log-probs [c, vocab], next tokens [c]) at the measured positions, in chunks.

    ``prompt_embeds`` [T, D] are the prompt's input embeddings, pictures merged in; the
    reply is appended as plain token embeddings, so a stray image token written by an
    untrained model never asks for a picture."""
    lm = loaded.model.language_model
    reply, start, count = _measured(prompt_ids.shape[0], reply_ids, kl_positions)
    if count <= 0:
        return
    embeds = prompt_embeds
    if reply.numel():
        embeds = torch.cat([embeds, lm.get_input_embeddings()(reply.to(loaded.device)).to(embeds.dtype)])
    tokens = torch.cat([prompt_ids.cpu(), reply]).to(loaded.device)
    hidden = lm.model(inputs_embeds=embeds[None], use_cache=False).last_hidden_state[0]
    for lo in range(start, start + count, _LOGIT_CHUNK):
        hi = min(lo + _LOGIT_CHUNK, start + count)
        # stays on the device: only the top-k summary or a few sums ever leave it
        yield torch.log_softmax(lm.lm_head(hidden[lo:hi]).float(), dim=-1), tokens[lo + 1:hi + 1]


def _tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)


def summarize(logp: torch.Tensor, targets: torch.Tensor, k: int) -> RefDist:
    """The reference's summary of some positions, moved to the CPU for the cache."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    dist = RefDist(values, ids, _tail(logp, ids), logp.argmax(dim=-1), -logp.gather(1, targets[:, None]).squeeze(1))
    return RefDist(*(getattr(dist, f).cpu() for f in _DIST_FIELDS))


def concat_dists(parts: Sequence[RefDist], k: int) -> RefDist:
    if not parts:
        empty = torch.empty(0)
        return RefDist(empty.reshape(0, k), empty.reshape(0, k).long(), empty, empty.long(), empty)
    return RefDist(*(torch.cat([getattr(p, f) for p in parts]) for f in _DIST_FIELDS))


# Tail log-masses below this are treated alike on both sides: exp(-80) is far below any
# measurable effect, and clamping both the same way keeps identical models at exactly 0.
_TAIL_FLOOR = -80.0


def coarse_kl(ref: RefDist, cand_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || candidate) over the reference's top-k tokens plus one
    bin for the rest (see the module doc); exactly 0 when the candidate is the reference."""
    lq = cand_logp.gather(1, ref.ids)
    head = (ref.logp.exp() * (ref.logp - lq)).sum(dim=-1)
    rt, ct = ref.tail.clamp_min(_TAIL_FLOOR), _tail(cand_logp, ref.ids).clamp_min(_TAIL_FLOOR)
    tail = torch.where(torch.isneginf(ref.tail), torch.zeros_like(rt), rt.exp() * (rt - ct))
    return (head + tail).clamp_min(0.0)


def closeness(ref: RefDist, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Closeness:
    """Compare a model's log-prob chunks with the reference's summary of the same positions."""
    out, at = Closeness(), 0
    for logp, targets in chunks:
        n = logp.shape[0]
        part = RefDist(*(getattr(ref, f)[at:at + n].to(logp.device) for f in _DIST_FIELDS))
        out.kl += float(coarse_kl(part, logp).double().sum())
        out.top1_same += int((logp.argmax(dim=-1) == part.top1).sum())
        out.nll += float(-logp.gather(1, targets[:, None]).double().sum())
        out.positions += n
        at += n
    if at != ref.top1.shape[0]:
        raise UserError("the reference's cached outputs do not match the sequence being compared; "
                        "clear the eval cache (--no-cache or --cache-dir) and run again.")
    return out


# ---------------------------------------------------------------- the same KL from top-k log-probabilities


def summary_from_topk(logp: torch.Tensor, ids: torch.Tensor, nll: torch.Tensor) -> RefDist:
    """The reference's summary when only its top-k log-probabilities are known (an engine such
    as vLLM returns those): ``logp``/``ids`` [P, k] in descending order, ``nll`` [P] of the next
    token. The rest's mass is what the top k leave (-inf when they hold all of it)."""
    rest = 1.0 - logp.double().exp().sum(dim=-1)
    tail = torch.where(rest > 0, rest.clamp_min(1e-300).log(), torch.full_like(rest, float("-inf")))
    return RefDist(logp.float(), ids.long(), tail.float(), ids[:, 0].long(), nll.float())


def coarse_kl_topk(ref: RefDist, cand_ids: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """`coarse_kl` when the candidate, too, is known only by its top-K' log-probabilities
    (``cand_ids``/``cand_logp`` [P, K']): the same bins, the reference's top-k tokens and the rest.

    A reference token outside the candidate's top K' has no known candidate probability; it
    joins the rest bin on both sides, which merges two bins and so never raises the KL. With
    K' covering the reference's top k (the usual case when K' = 2k), this equals `coarse_kl`
    on the candidate's full distribution."""
    match = ref.ids[:, :, None] == cand_ids[:, None, :]                     # [P, k, K']
    found = match.any(dim=-1)                                              # [P, k]
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    lq = torch.where(match, cand_logp.double()[:, None, :], neg_inf).amax(dim=-1)
    lp = ref.logp.double()
    head = torch.where(found, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(dim=-1)
    # The rest bin's mass, on each side: the reference's tail plus its tokens the candidate did not rank.
    ref_rest = torch.logsumexp(torch.cat([ref.tail.double()[:, None], torch.where(found, neg_inf, lp)], dim=1), dim=1)
    cand_rest_mass = 1.0 - torch.where(found, lq.exp(), torch.zeros_like(lq)).sum(dim=-1)
    # rounded as the reference's stored tail is, so that a model compared with itself scores exactly 0
    cand_rest = cand_rest_mass.clamp_min(math.exp(_TAIL_FLOOR)).log().float().double()
    rt, ct = ref_rest.clamp_min(_TAIL_FLOOR), cand_rest.clamp_min(_TAIL_FLOOR)
    tail = torch.where(torch.isneginf(ref_rest), torch.zeros_like(rt), rt.exp() * (rt - ct))
    return (head + tail).clamp_min(0.0).float()
