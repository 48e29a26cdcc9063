"""How sure we are about an accuracy and about the gap between two models.

Every model answers the same questions, so the comparison is paired: the bootstrap
resamples questions (keeping each question's two outcomes together) and McNemar's test
looks only at the questions where the two models disagree.  All values are in percent
(accuracy) or percentage points (differences, candidate minus reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from r1v_quant.errors import UserError

# Rows of bootstrap indices drawn at once: bounds memory at about 32 MB of int64
# however many questions and resamples there are.
_BOOT_CELLS_PER_CHUNK = 4_000_000


class Estimate(NamedTuple):
    """A value with its confidence interval, all in the same unit."""

    value: float
    lo: float
    hi: float


def _as_bools(name: str, correct: Sequence[bool]) -> np.ndarray:
    values = np.asarray(list(correct), dtype=bool)
    if values.ndim != 1 or values.size == 0:
        raise UserError(f"{name} has no scored answers, so no accuracy can be computed.")
    return values


def _paired(ref_correct: Sequence[bool], cand_correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    ref = _as_bools("The reference's result list", ref_correct)
    cand = _as_bools("The candidate's result list", cand_correct)
    if ref.size != cand.size:
        raise UserError(
            f"The reference has {ref.size} scored answers and the candidate {cand.size}; "
            "a paired comparison needs the same questions for both."
        )
    return ref, cand


def _z(conf: float) -> float:
    if not 0.0 < conf < 1.0:
        raise UserError(f"Confidence level {conf} is not between 0 and 1.")
    return NormalDist().inv_cdf(0.5 + conf / 2.0)


def accuracy_interval(correct: Sequence[bool], conf: float = 0.95) -> Estimate:
    """Accuracy in percent with its Wilson score interval.

    Wilson rather than the normal approximation because scores near 0 or 100 percent
    and small suites are common here, where the normal interval leaves [0, 100]."""
    values = _as_bools("The result list", correct)
    n = values.size
    p = float(values.mean())
    z = _z(conf)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 % or 100 % the matching bound is exactly 0 or 1; rounding would leave ~1e-15.
    lo = 0.0 if p == 0.0 else max(0.0, centre - half)
    hi = 1.0 if p == 1.0 else min(1.0, centre + half)
    return Estimate(100.0 * p, 100.0 * lo, 100.0 * hi)


def paired_difference(
    ref_correct: Sequence[bool],
    cand_correct: Sequence[bool],
    n_boot: int = 2000,
    seed: int = 0,
    conf: float = 0.95,
) -> Estimate:
    """Candidate minus reference accuracy in points, with a paired percentile-bootstrap
    interval.  The same seed gives the same interval."""
    ref, cand = _paired(ref_correct, cand_correct)
    if n_boot < 1:
        raise UserError(f"The bootstrap needs at least one resample, not {n_boot}.")
    per_question = cand.astype(np.int8) - ref.astype(np.int8)
    n = per_question.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _BOOT_CELLS_PER_CHUNK // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = per_question[idx].mean(axis=1)
    tail = (1.0 - conf) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return Estimate(100.0 * float(per_question.mean()), 100.0 * float(lo), 100.0 * float(hi))


def discordant_counts(ref_correct: Sequence[bool], cand_correct: Sequence[bool]) -> tuple[int, int]:
    """(b, c): questions only the reference got right, and only the candidate got right."""
    ref, cand = _paired(ref_correct, cand_correct)
    return int(np.sum(ref & ~cand)), int(np.sum(~ref & cand))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: under "no
    difference", b follows Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); each next term from the last, not from scratch
    for k in range(1, min(b, c) + 1):
        term = term * (n - k + 1) // k
        tail += term
    # Exact integers, one correctly rounded division: no underflow for large n.
    return min(1.0, 2 * tail / 2**n)


def mcnemar_p(ref_correct: Sequence[bool], cand_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for a paired comparison of two models."""
    return mcnemar_exact_p(*discordant_counts(ref_correct, cand_correct))


def answer_agreement(ref_answers: Sequence[str | None], cand_answers: Sequence[str | None]) -> float:
    """Percent of questions where both models committed to the same extracted answer
    (two missing answers do not count as agreeing)."""
    if len(ref_answers) != len(cand_answers) or not ref_answers:
        raise UserError(
            f"Answer lists of {len(ref_answers)} and {len(cand_answers)} items cannot be "
            "compared; both need the same, non-empty set of questions."
        )
    same = sum(1 for a, b in zip(ref_answers, cand_answers) if a is not None and a == b)
    return 100.0 * same / len(ref_answers)
