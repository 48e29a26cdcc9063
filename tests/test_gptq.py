"""GPTQ rounding: the error feedback lowers the output error, and its codes fit the AutoAWQ layout exactly."""

import pytest
import torch

from r1v_quant.errors import UserError
from r1v_quant.int4.format import awq_codes, awq_dequantize, to_awq
from r1v_quant.quant.gptq import (
    accumulate_hessian,
    gptq_quantize,
    inverse_factor,
    output_error,
    static_order,
)
from r1v_quant.quant.primitives import dequantize, minmax_params, quantize

GS = 32


def correlated_layer(out_f=64, in_f=128, tokens=2048, seed=0):
    """A random linear and inputs whose channels are correlated and of unequal size, as a layer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = (torch.randn(tokens, in_f, generator=g) @ mix + 0.3 * torch.randn(tokens, in_f, generator=g))
    x = x * torch.linspace(0.2, 3.0, in_f)[torch.randperm(in_f, generator=g)]
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, x


def test_error_feedback_beats_round_to_nearest_at_the_same_scales():
    w, x = correlated_layer()
    h = x.t() @ x / x.shape[0]
    res = gptq_quantize(w, h, GS, damp=0.01)
    scales, zeros = minmax_params(w, GS)
    assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)
    rtn = dequantize(quantize(w, scales, zeros, GS), scales, zeros, GS)
    gptq = dequantize(res.codes, res.scales, res.zeros, GS)
    err_rtn, err_gptq = output_error(w, rtn, h), output_error(w, gptq, h)
    # Measured on the tokens themselves too, not only through H.
    direct = ((x @ (gptq - w).t()).pow(2).sum() / (x @ (rtn - w).t()).pow(2).sum()).item()
    assert err_gptq < 0.7 * err_rtn
    assert direct == pytest.approx(err_gptq / err_rtn, rel=1e-3)
    assert res.retries == 0 and res.dead == 0 and res.damp == 0.01
    assert int(res.codes.max()) <= 15 and res.codes.dtype == torch.uint8


def test_packed_tensors_unpack_to_exactly_the_gptq_codes():
    w, x = correlated_layer(out_f=48, in_f=96, seed=1)
    res = gptq_quantize(w, x.t() @ x, GS)
    packed = to_awq(res.codes, res.zeros, res.scales)
    codes, zeros = awq_codes(packed["qweight"], packed["qzeros"])
    assert torch.equal(codes, res.codes) and torch.equal(zeros.to(torch.int32), res.zeros)
    assert torch.equal(packed["scales"].t().float(), res.scales)  # the scales were float16 values already
    assert torch.equal(awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], GS),
                       dequantize(res.codes, res.scales, res.zeros, GS))


def test_static_order_keeps_groups_contiguous():
    w, x = correlated_layer(seed=2)
    h = x.t() @ x
    order = static_order(h)
    diag = torch.diagonal(h)[order]
    assert torch.all(diag[:-1] >= diag[1:])
    assert not torch.equal(order, torch.arange(order.numel()))  # the order does differ from the channels'
    res = gptq_quantize(w, h, GS)
    # Every group's grid is its contiguous channels' min/max, whatever order the columns were rounded in.
    assert torch.equal(res.scales, minmax_params(w, GS)[0])
    assert torch.equal(res.zeros, minmax_params(w, GS)[1])


def test_diagonal_moment_gives_round_to_nearest():
    """With uncorrelated inputs there is no error to feed forward: the codes are round-to-nearest's."""
    w, _ = correlated_layer(seed=3)
    h = torch.diag(torch.rand(w.shape[1]) + 0.5)
    res = gptq_quantize(w, h, GS)
    assert torch.equal(res.codes, quantize(w, res.scales, res.zeros, GS))


def test_range_weight_sets_the_grid_and_clamped_weights_are_fed_forward():
    w, x = correlated_layer(seed=4)
    h = x.t() @ x
    clipped = w.clamp(-0.06, 0.06)
    res = gptq_quantize(w, h, GS, range_weight=clipped)
    assert torch.equal(res.scales, minmax_params(clipped, GS)[0])
    rtn = dequantize(quantize(w, res.scales, res.zeros, GS), res.scales, res.zeros, GS)
    assert output_error(w, dequantize(res.codes, res.scales, res.zeros, GS), h) < 0.7 * output_error(w, rtn, h)


def test_dead_input_channels_get_zero_weights():
    w, x = correlated_layer(seed=5)
    dead = torch.tensor([3, 40, 41, 100])
    x[:, dead] = 0
    res = gptq_quantize(w, x.t() @ x, GS)
    assert res.dead == 4 and res.retries == 0
    deq = dequantize(res.codes, res.scales, res.zeros, GS)
    assert torch.all(deq[:, dead] == 0)
    live = torch.ones(w.shape[1], dtype=torch.bool)
    live[dead] = False
    assert torch.all(deq[:, live].abs() <= w[:, live].abs().amax() + res.scales.amax())


def test_cholesky_failure_retries_with_more_dampening():
    # Eigenvalues 3 and -1 per 2x2 block (mean diagonal 1): positive definite only once the dampening passes 1.
    h = torch.block_diag(*[torch.tensor([[1.0, 2.0], [2.0, 1.0]])] * 16)
    u, used, retries = inverse_factor(h, 0.01)
    assert retries == 3 and used == pytest.approx(10.0)
    hd = h + used * torch.eye(32)
    assert torch.allclose(u.t() @ u, torch.linalg.inv(hd), atol=1e-5)
    w, _ = correlated_layer(out_f=16, in_f=32, seed=6)
    res = gptq_quantize(w, h, GS, damp=0.01)
    assert res.retries == 3 and res.damp == pytest.approx(10.0)


def test_non_finite_moment_is_refused():
    h = torch.eye(32)
    h[1, 2] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        inverse_factor(h, 0.01)


def test_hessian_accumulates_weighted_over_chunks():
    _, x = correlated_layer(tokens=300, seed=7)
    wt = torch.rand(300)
    chunks = [(x[a:a + 64].to(torch.bfloat16), wt[a:a + 64]) for a in range(0, 300, 64)]
    h = accumulate_hessian(chunks, x.shape[1])
    xb = x.to(torch.bfloat16).float()
    assert h.dtype == torch.float32
    assert torch.allclose(h, (xb * wt[:, None]).t() @ xb, rtol=1e-4, atol=1e-4)
