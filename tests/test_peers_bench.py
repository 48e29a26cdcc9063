"""benchmarks/peers.py's evaluation step on a tiny checkpoint: the reference and the RTN
baseline answer the same questions and come back compared (the peers themselves run in their
own environments and are not needed for this)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


def _peers():
    spec = importlib.util.spec_from_file_location("peers_bench", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_evaluate_compares_the_rtn_baseline_with_the_reference(tiny_dir, tmp_path):
    peers = _peers()
    s = peers.Settings(model=Path(tiny_dir), work=tmp_path, questions=2, suite="builtin", max_new_tokens=8,
                       batch_size=2)
    out = peers.evaluate(s, [], ["rtn"])
    assert out["questions"] == 2 and not out["failed"]
    assert set(out["models"]) == {"reference (bf16)", "rtn"}
    assert set(out["comparisons"]) == {"rtn"}
    rtn = out["comparisons"]["rtn"]
    assert rtn["mean_kl"] is not None and rtn["mean_kl"] >= 0 and 0 <= rtn["top1_agreement"] <= 100


# ---------------------------------------------------------------- seeds pooled


def test_pooled_seeds_of_identical_seeds_is_the_single_paired_interval():
    from r1v_quant.evals.stats import paired_difference

    peers = _peers()
    rng = __import__("random").Random(3)
    ref = [rng.random() < 0.5 for _ in range(60)]
    cand = [r if rng.random() < 0.8 else not r for r in ref]
    out = peers.pooled_seeds(ref, [cand, cand, cand], n_boot=500, seed=7)
    single = paired_difference(ref, cand, n_boot=500, seed=7)
    # Three copies of one seed change nothing: each question's mean difference is the seed's own.
    assert out["per_seed"] == pytest.approx([single.value] * 3)
    assert (out["mean"], out["min"], out["max"]) == pytest.approx((single.value,) * 3)
    assert (out["pooled"], out["pooled_lo"], out["pooled_hi"]) == pytest.approx((single.value, single.lo, single.hi))


def test_pooled_seeds_averages_each_question_over_the_seeds():
    peers = _peers()
    ref = [True, True, False, False]
    seeds = [[True, False, False, False],   # -25 points
             [True, True, True, True],      # +50 points
             [True, True, False, False]]    # 0
    out = peers.pooled_seeds(ref, seeds, n_boot=2000, seed=0)
    assert out["per_seed"] == pytest.approx([-25.0, 50.0, 0.0])
    assert out["mean"] == pytest.approx(25.0 / 3) and out["pooled"] == pytest.approx(25.0 / 3)
    assert (out["min"], out["max"]) == (-25.0, 50.0)
    # Per question, averaged over the seeds: 0, -1/3, +2/3, +1/3 (times 100); a resample of the four
    # questions can only lie between the smallest and the largest of them.
    assert -100 / 3 - 1e-9 <= out["pooled_lo"] <= out["pooled"] <= out["pooled_hi"] <= 200 / 3 + 1e-9
    assert out["pooled_lo"] < out["pooled_hi"]


def test_pooled_seeds_refuses_seeds_that_answered_other_questions():
    peers = _peers()
    with pytest.raises(ValueError):
        peers.pooled_seeds([True, False], [[True, False], [True]])
    with pytest.raises(ValueError):
        peers.pooled_seeds([True, False], [])


def test_ours_variant_arguments_and_calibration_set():
    peers = _peers()
    assert peers.parse_ours_variant('gptq=--rounding gptq') == ("ours-gptq", ["--rounding", "gptq"])
    assert peers.parse_ours_variant("g_t=--rounding gptq --traces self")[1] == ["--rounding", "gptq", "--traces", "self"]
    assert peers.parse_ours_variant('x=--calib "text:a b.jsonl"')[1] == ["--calib", "text:a b.jsonl"]
    assert peers.ours_calibration(["--rounding", "gptq"]) == ("text", ["--rounding", "gptq"])
    assert peers.ours_calibration(["--rounding", "gptq", "--traces", "self"]) == (
        "builtin", ["--rounding", "gptq", "--traces", "self"])
    assert peers.ours_calibration(["--calib", "text:x.jsonl", "--grid", "40"]) == ("text:x.jsonl", ["--grid", "40"])
    with pytest.raises(SystemExit):
        peers.parse_ours_variant("--rounding gptq")


# ---------------------------------------------------------------- the conversions' checks


def _codes(rows=16, cols=256, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (rows, cols // 128), generator=g, dtype=torch.uint8)
    # float16-exact scales, as every tool here stores them
    scales = (torch.rand(rows, cols // 128, generator=g) * 0.05 + 1e-3).to(torch.float16).float()
    return codes, zeros, scales


def _dense(codes, zeros, scales):
    z = zeros.repeat_interleave(128, dim=1).float()
    s = scales.repeat_interleave(128, dim=1)
    return (codes.float() - z) * s


def test_codes_to_gemm_is_lossless_and_the_check_accepts_it():
    peers = _peers()
    codes, zeros, scales = _codes()
    qweight, qzeros, s16, change = peers.codes_to_gemm(codes, zeros, scales)
    assert qweight.dtype == qzeros.dtype == __import__("torch").int32 and s16.dtype == __import__("torch").float16
    assert tuple(qweight.shape) == (256, 2) and tuple(qzeros.shape) == (2, 2) and tuple(s16.shape) == (2, 16)
    assert change == 0.0
    assert peers.dense_mismatch(qweight, qzeros, s16, _dense(codes, zeros, scales), "m") == 0.0


def test_codes_to_gemm_reports_scales_that_are_not_float16_exact():
    peers = _peers()
    codes, zeros, scales = _codes()
    scales = scales.clone()
    scales[0, 0] = 0.1  # not a float16 value: the conversion would round it
    *_, change = peers.codes_to_gemm(codes, zeros, scales)
    assert 1e-6 < change < 1e-3


def test_dense_check_catches_a_wrong_nibble_order_a_wrong_zero_and_a_wrong_shape():
    import torch

    from r1v_quant.int4.format import pack_awq

    peers = _peers()
    codes, zeros, scales = _codes(seed=1)
    qweight, qzeros, s16, _ = peers.codes_to_gemm(codes, zeros, scales)
    truth = _dense(codes, zeros, scales)
    # Plain sequential nibbles (not AutoAWQ's interleaved order) read back as other codes.
    plain = torch.zeros(256, 2, dtype=torch.int64)
    c = codes.t().to(torch.int64).reshape(256, 2, 8)
    for i in range(8):
        plain |= c[..., i] << (4 * i)
    plain = torch.where(plain >= 2**31, plain - 2**32, plain).to(torch.int32)
    with pytest.raises(ValueError, match="differ"):
        peers.dense_mismatch(plain, qzeros, s16, truth, "m")
    shifted = zeros.clone()
    shifted[3, 1] = (int(shifted[3, 1]) + 1) % 16
    with pytest.raises(ValueError, match="differ"):
        peers.dense_mismatch(qweight, pack_awq(shifted.t()), s16, truth, "m")
    with pytest.raises(ValueError, match="is"):
        peers.dense_mismatch(qweight, qzeros, s16, truth[:, :128], "m")


def test_codes_to_gemm_refuses_signed_or_wide_codes():
    import torch

    peers = _peers()
    codes, zeros, scales = _codes()
    with pytest.raises(ValueError):
        peers.codes_to_gemm(codes.to(torch.int8) - 8, zeros, scales)
    with pytest.raises(ValueError):
        peers.codes_to_gemm(codes + 16, zeros, scales)
