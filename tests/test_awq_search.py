"""The AWQ search on synthetic layers: folding is exact, salient channels are protected, padding is ignored."""

import torch
from torch import nn

from r1v_quant.model.vision import RMSNorm
from r1v_quant.quant.awq import (
    apply_clip,
    candidate_scales,
    fold_scales,
    masked_mean_abs,
    search_clip,
    search_scales,
)
from r1v_quant.quant.primitives import fake_quantize


def salient_inputs(tokens=512, width=256, salient=(3, 77, 150, 201), gain=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, list(salient)] *= gain
    return x


def linear(width_in, width_out, seed=1):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(width_in, width_out, bias=False)
    lin.weight.data = torch.randn(width_out, width_in, generator=g) * 0.02
    return lin


def output_error(lin, w_q, x):
    ref = x @ lin.weight.data.T
    return ((x @ w_q.T - ref).pow(2).mean() / ref.pow(2).mean()).item()


def test_awq_beats_round_to_nearest_on_salient_channels():
    x = salient_inputs()
    lin = linear(256, 384)
    w = lin.weight.data.clone()
    rtn_err = output_error(lin, fake_quantize(w, 128), x)

    res = search_scales([lin], x, lin, group_size=128)
    assert torch.equal(lin.weight.data, w)  # the search restores the weights
    assert res.alpha > 0
    # The quantised weight the export would hold: quantise w*s, undo s on the input side.
    s = res.scales
    awq_err = output_error(lin, fake_quantize(w * s, 128) / s, x)
    assert awq_err < 0.5 * rtn_err, (awq_err, rtn_err)
    assert res.loss <= res.loss_at_zero


def test_folding_into_norm_and_linear_leaves_float_function_unchanged():
    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-6)
    norm.weight.data = torch.rand(256) + 0.5
    a, b = linear(256, 128, seed=2), linear(256, 64, seed=3)
    x = torch.randn(10, 256)
    before = torch.cat([a(norm(x)), b(norm(x))], -1)
    s = candidate_scales(masked_mean_abs(salient_inputs()), torch.rand(256) + 0.1, 0.5)
    fold_scales(norm, [a, b], s)
    after = torch.cat([a(norm(x)), b(norm(x))], -1)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-6)

    # Into a previous linear (with bias): up_proj -> down_proj.
    up, down = nn.Linear(64, 256), linear(256, 64, seed=4)
    y = torch.randn(7, 64)
    before = down(up(y))
    fold_scales(up, [down], s)
    assert torch.allclose(before, down(up(y)), rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_statistics_or_scales():
    x = salient_inputs(tokens=64)
    samples = [x[:40], x[40:]]
    # A padded batch: the second sample padded with garbage to 40 tokens, masked out.
    pad = torch.full((16, 256), 1e3)
    batch = torch.stack([samples[0], torch.cat([samples[1], pad])])
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :] = True
    mask[1, :24] = True
    unpadded = masked_mean_abs(torch.cat(samples))
    padded = masked_mean_abs(batch, mask)
    assert torch.allclose(unpadded, padded, rtol=1e-6)
    w_mean = torch.rand(256) + 0.1
    assert torch.allclose(candidate_scales(unpadded, w_mean, 0.4), candidate_scales(padded, w_mean, 0.4), rtol=1e-6)


def test_clip_search_never_hurts_and_bounds_weights():
    x = salient_inputs(seed=5)
    lin = linear(256, 128, seed=6)
    lin.weight.data[0, 0] = 0.5  # an outlier weight the clip should consider shrinking
    w = lin.weight.data.clone()
    max_val = search_clip(w, x, group_size=128)
    assert max_val.shape == (128, 2)
    org = w.abs().reshape(128, 2, 128).amax(-1)
    assert torch.all(max_val <= org + 1e-7) and torch.all(max_val >= 0.5 * org - 1e-7)
    clipped = apply_clip(w, max_val, 128)
    assert clipped.abs().reshape(128, 2, 128).amax(-1).le(max_val + 1e-7).all()
    assert output_error(lin, fake_quantize(clipped, 128), x) <= output_error(lin, fake_quantize(w, 128), x) + 1e-9
