"""Distribution-level closeness of a quantised model to its reference, from logits.

Accuracy on a few hundred questions moves in steps of a fraction of a point; these
per-token measures see much smaller changes and need no generation.  All functions
take logits shaped [B, T, V] or [T, V] (the same shape for both models) and an optional
boolean mask shaped [B, T] or [T] that marks the positions to count (padding off).
Work is done in float32 on chunks of positions, so bf16 logits over a 152k vocabulary
never need a full float32 copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Positions per float32 chunk: 1024 x 152064 x 4 bytes is about 600 MB at the worst.
_CHUNK = 1024


def _flat(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [T, V] or [B, T, V], got shape {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def _flat_mask(mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    positions = logits.shape[:-1]
    if mask is None:
        return torch.ones(positions.numel(), dtype=torch.bool, device=logits.device)
    if tuple(mask.shape) != tuple(positions):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits positions {tuple(positions)}")
    return mask.reshape(-1).to(device=logits.device, dtype=torch.bool)


def _check_pair(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> None:
    if ref_logits.shape != cand_logits.shape:
        raise ValueError(
            f"reference logits {tuple(ref_logits.shape)} and candidate logits "
            f"{tuple(cand_logits.shape)} differ in shape"
        )


def token_kl(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(reference || candidate) in nats at every position, shaped like the logits
    without the vocabulary axis; masked-off positions are 0.

    Identical logits give exactly 0: the two log-softmaxes are bit-identical, so every
    term is p * 0."""
    _check_pair(ref_logits, cand_logits)
    ref, cand = _flat(ref_logits), _flat(cand_logits)
    keep = _flat_mask(mask, ref_logits)
    out = torch.zeros(ref.shape[0], dtype=torch.float32, device=ref.device)
    for start in range(0, ref.shape[0], _CHUNK):
        stop = start + _CHUNK
        logp = F.log_softmax(ref[start:stop].float(), dim=-1)
        logq = F.log_softmax(cand[start:stop].float(), dim=-1)
        p = logp.exp()
        # Tokens the reference rules out (p == 0, e.g. -inf logits) contribute nothing,
        # instead of 0 * inf = nan.
        terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
        # KL is never negative; rounding in the sum can dip a hair below zero.
        out[start:stop] = terms.sum(dim=-1).clamp_min(0.0)
    out = torch.where(keep, out, torch.zeros_like(out))
    return out.reshape(ref_logits.shape[:-1])


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    count = int(keep.sum())
    if count == 0:
        raise ValueError("the mask selects no positions")
    return float(values.reshape(-1)[keep].double().sum() / count)


def mean_kl(ref_logits: torch.Tensor, cand_logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean per-token KL(reference || candidate) over the counted positions, in nats."""
    per_token = token_kl(ref_logits, cand_logits, mask)
    return _masked_mean(per_token, _flat_mask(mask, ref_logits))


def top1_agreement(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """Fraction (0 to 1) of counted positions where both models' most likely next token
    is the same."""
    _check_pair(ref_logits, cand_logits)
    same = _flat(ref_logits).argmax(dim=-1) == _flat(cand_logits).argmax(dim=-1)
    return _masked_mean(same.float(), _flat_mask(mask, ref_logits))


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each label, shaped like ``labels``; ``IGNORE_INDEX``
    positions are 0.  ``labels[..., t]`` is the token that ``logits[..., t, :]``
    predicts (already shifted by one)."""
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits positions {tuple(logits.shape[:-1])}")
    flat, targets = _flat(logits), labels.reshape(-1)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], _CHUNK):
        stop = start + _CHUNK
        out[start:stop] = F.cross_entropy(
            flat[start:stop].float(), targets[start:stop], ignore_index=IGNORE_INDEX, reduction="none"
        )
    return out.reshape(labels.shape)


def perplexity(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """exp(mean negative log-likelihood) over the counted positions: those in ``mask``
    whose label is not ``IGNORE_INDEX``.  Labels are already shifted (see ``token_nll``)."""
    nll = token_nll(logits, labels)
    keep = _flat_mask(mask, logits) & (labels.reshape(-1) != IGNORE_INDEX)
    return math.exp(_masked_mean(nll, keep))
