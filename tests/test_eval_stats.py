import numpy as np
import pytest

from r1v_quant.errors import UserError
from r1v_quant.evals.stats import (
    accuracy_interval,
    answer_agreement,
    discordant_counts,
    mcnemar_exact_p,
    mcnemar_p,
    paired_difference,
)


def test_wilson_interval_against_hand_computation():
    # 8 of 10 at 95%: z = 1.959964, centre = (0.8 + z^2/20) / (1 + z^2/10) = 0.716744,
    # half width = z * sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.226577.
    acc, lo, hi = accuracy_interval([True] * 8 + [False] * 2)
    assert acc == pytest.approx(80.0)
    assert lo == pytest.approx(49.0167, abs=1e-3)
    assert hi == pytest.approx(94.3321, abs=1e-3)


def test_wilson_interval_stays_inside_0_100():
    acc, lo, hi = accuracy_interval([True] * 20)
    assert (acc, hi) == (100.0, 100.0)
    assert lo == pytest.approx(100 * 20 / (20 + 1.959964**2), abs=1e-3)
    acc, lo, hi = accuracy_interval([False] * 20)
    assert (acc, lo) == (0.0, 0.0) and 0 < hi < 20


def test_wilson_wider_at_higher_confidence():
    data = [True] * 30 + [False] * 20
    _, lo95, hi95 = accuracy_interval(data, 0.95)
    _, lo99, hi99 = accuracy_interval(data, 0.99)
    assert lo99 < lo95 and hi99 > hi95


def test_empty_results_are_refused():
    with pytest.raises(UserError):
        accuracy_interval([])
    with pytest.raises(UserError):
        paired_difference([True, False], [True])


def test_paired_difference_point_value_and_determinism():
    ref = [True] * 70 + [False] * 30
    cand = [True] * 65 + [False] * 35
    first = paired_difference(ref, cand, n_boot=1000, seed=3)
    assert first.value == pytest.approx(-5.0)
    assert first.lo < -5.0 < first.hi
    assert paired_difference(ref, cand, n_boot=1000, seed=3) == first
    assert paired_difference(ref, cand, n_boot=1000, seed=4) != first


def test_paired_difference_of_identical_models_is_exactly_zero():
    ref = [True, False, True, True, False] * 20
    assert tuple(paired_difference(ref, ref)) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_covers_the_true_difference():
    # Paired data with a known population gap of -5 points: the candidate loses 8 % of
    # the reference's right answers (0.7 * 0.08 = 5.6) and gains 2 % of its wrong
    # ones (0.3 * 0.02 = 0.6).  A 95 % interval should cover -5 in most repetitions.
    rng = np.random.default_rng(1)
    covered = 0
    trials = 40
    for t in range(trials):
        ref = rng.random(600) < 0.7
        flip = np.where(ref, rng.random(600) < 0.08, rng.random(600) < 0.02)
        cand = ref ^ flip
        _, lo, hi = paired_difference(ref.tolist(), cand.tolist(), n_boot=500, seed=t)
        covered += lo <= -5.0 <= hi
    assert covered >= 0.85 * trials


def test_bootstrap_chunks_give_the_same_answer(monkeypatch):
    import r1v_quant.evals.stats as stats

    ref = [True, False, True] * 30
    cand = [True, True, False] * 30
    whole = paired_difference(ref, cand, n_boot=300, seed=0)
    monkeypatch.setattr(stats, "_BOOT_CELLS_PER_CHUNK", 90 * 7)  # 7 rows at a time
    assert paired_difference(ref, cand, n_boot=300, seed=0) == whole


def test_mcnemar_exact_known_counts():
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096.
    assert mcnemar_exact_p(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(3000, 2000) < 1e-40  # large n: no underflow to nan, no overflow


def test_mcnemar_from_outcomes():
    # 10 questions only the reference got right, 2 only the candidate, 50 both.
    ref = [True] * 10 + [False] * 2 + [True] * 50 + [False] * 8
    cand = [False] * 10 + [True] * 2 + [True] * 50 + [False] * 8
    assert discordant_counts(ref, cand) == (10, 2)
    assert mcnemar_p(ref, cand) == pytest.approx(0.0385742, abs=1e-7)


def test_answer_agreement():
    assert answer_agreement(["A", "B", None, "C"], ["A", "C", None, "C"]) == 50.0
