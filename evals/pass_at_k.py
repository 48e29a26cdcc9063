"""pass@1 over k samples per question, with intervals that respect the k draws.

With ``--samples-per-question k`` every question is asked k times (sampled decoding), and
pass@1 is the mean over questions of the share of a question's k replies that are right.
The k replies to one question are not independent draws of the suite, so the intervals
resample questions, each with all of its replies (a cluster bootstrap): accuracy from the
per-question means, the candidate's difference from the per-question mean differences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals.stats import Estimate

_REPLICA = "#"


def replicate(samples: Sequence[Sample], k: int) -> list[Sample]:
    """Each question k times in a row, the copies told apart by ``#j`` after the id."""
    if k < 1:
        raise UserError(f"--samples-per-question must be at least 1 (got {k}).")
    if k == 1:
        return list(samples)
    return [dataclasses.replace(s, id=f"{s.id}{_REPLICA}{j}") for s in samples for j in range(k)]


def question_of(sample_id: str) -> str:
    return sample_id.rsplit(_REPLICA, 1)[0] if _REPLICA in sample_id else sample_id


def per_question(values: Sequence[float], clusters: Sequence[Hashable]) -> np.ndarray:
    """Mean of ``values`` within each cluster, clusters in order of first appearance."""
    if len(values) != len(clusters):
        raise UserError(f"{len(values)} outcomes were given for {len(clusters)} questions.")
    sums: dict[Hashable, list[float]] = {}
    for value, cluster in zip(values, clusters):
        sums.setdefault(cluster, []).append(float(value))
    return np.array([np.mean(v) for v in sums.values()], dtype=np.float64)


def _bootstrap(means: np.ndarray, n_boot: int, seed: int, conf: float) -> Estimate:
    if means.size == 0:
        raise UserError("there are no questions to estimate an accuracy from.")
    rng = np.random.default_rng(seed)
    draws = means[rng.integers(0, means.size, size=(n_boot, means.size))].mean(axis=1)
    tail = (1.0 - conf) / 2.0 * 100.0
    lo, hi = np.percentile(draws, [tail, 100.0 - tail])
    return Estimate(100.0 * float(means.mean()), 100.0 * float(lo), 100.0 * float(hi))


def pass_at_1(correct: Sequence[bool], clusters: Sequence[Hashable], n_boot: int = 2000, seed: int = 0,
              conf: float = 0.95) -> Estimate:
    """pass@1 in percent with a cluster-bootstrap interval over questions."""
    return _bootstrap(per_question([bool(c) for c in correct], clusters), n_boot, seed, conf)


def paired_pass_at_1(ref_correct: Sequence[bool], cand_correct: Sequence[bool], clusters: Sequence[Hashable],
                     n_boot: int = 2000, seed: int = 0, conf: float = 0.95) -> Estimate:
    """Candidate minus reference pass@1 in points, questions resampled with both models' replies."""
    if len(ref_correct) != len(cand_correct):
        raise UserError(f"the two models answered {len(ref_correct)} and {len(cand_correct)} questions.")
    diffs = [int(bool(c)) - int(bool(r)) for r, c in zip(ref_correct, cand_correct)]
    return _bootstrap(per_question(diffs, clusters), n_boot, seed, conf)
