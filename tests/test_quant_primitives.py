import pytest
import torch

from r1v_quant.errors import UserError
from r1v_quant.int4.format import awq_codes, check_group_size, pack_awq, unpack_awq
from r1v_quant.int4.kernels import awq_to_int4pack, int4pack, int4unpack, tinygemm_scales_and_zeros
from r1v_quant.quant.primitives import (
    awq_dequantize,
    awq_tensors,
    check_awq_shape,
    dequantize,
    fake_quantize,
    minmax_params,
    quantize,
)


def _weights(out_features=64, in_features=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    # A few outlier channels, as real LLM weights have.
    w[:, 3] *= 20
    return w.to(dtype)


def _reference_dequantize(qweight, qzeros, scales, group_size):
    """Written from the format description only: nibble i of packed column c is output 8c + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    in_features, n_packed = qweight.shape
    out_features = n_packed * 8
    w = torch.empty(out_features, in_features, dtype=torch.float32)
    qw = qweight.to(torch.int64) & 0xFFFFFFFF  # the unsigned bit pattern
    qz = qzeros.to(torch.int64) & 0xFFFFFFFF
    for c in range(n_packed):
        for i in range(8):
            col = 8 * c + order[i]
            q = (qw[:, c] >> (4 * i)) & 0xF  # [in]
            z = (qz[:, c] >> (4 * i)) & 0xF  # [in / g]
            s = scales[:, col].to(torch.float32)  # [in / g]
            w[col] = (q.float() - z.float().repeat_interleave(group_size)) * s.repeat_interleave(group_size)
    return w


def test_pack_known_values():
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    # order [0,2,4,6,1,3,5,7]: nibble i holds column order[i], so nibbles read 0,2,4,6,1,3,5,7 upward.
    assert pack_awq(codes).item() == 0x75316420
    assert pack_awq(torch.full((1, 8), 15, dtype=torch.uint8)).item() == -1
    assert pack_awq(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)).item() == -(2**28)
    assert pack_awq(codes).dtype == torch.int32


def test_pack_unpack_identity():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (37, 96), generator=g, dtype=torch.uint8)
    packed = pack_awq(codes)
    assert packed.shape == (37, 12) and packed.dtype == torch.int32
    assert torch.equal(unpack_awq(packed), codes)
    words = torch.randint(-(2**31), 2**31 - 1, (5, 7), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(pack_awq(unpack_awq(words)), words)


def test_pack_rejects_odd_width():
    with pytest.raises(UserError, match="multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.uint8))


def test_hand_worked_group():
    w = torch.tensor([[-1.5, 0.0, 0.75, 3.0]])
    scales, zeros = minmax_params(w, 4)
    # (3.0 - -1.5) / 15 = 0.3, rounded up to the next float16 value.
    assert scales.item() == 0.300048828125
    assert zeros.item() == 5
    q = quantize(w, scales, zeros, 4)
    assert q.tolist() == [[0, 5, 7, 15]]
    s = 0.300048828125
    assert dequantize(q, scales, zeros, 4).tolist() == [[-5 * s, 0.0, 2 * s, 10 * s]]


@pytest.mark.parametrize("group_size", [32, 128])
def test_error_bound_and_ranges(group_size):
    w = _weights()
    scales, zeros = minmax_params(w, group_size)
    assert scales.shape == zeros.shape == (64, 256 // group_size)
    assert torch.equal(scales, scales.half().float()), "scales must be float16-exact"
    assert zeros.min() >= 0 and zeros.max() <= 15
    q = quantize(w, scales, zeros, group_size)
    assert q.dtype == torch.uint8 and q.max() <= 15
    err = (w - dequantize(q, scales, zeros, group_size)).abs().reshape(64, -1, group_size)
    bound = scales.unsqueeze(-1) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-9).all()
    # Rounding to nearest: the error is well under the bound on average.
    assert err.mean() < 0.3 * scales.mean()


def test_one_signed_and_constant_groups_are_covered():
    w = torch.cat([torch.linspace(0.5, 0.6, 32), torch.linspace(-0.9, -0.2, 32), torch.full((32,), 0.25)]).reshape(1, 96)
    scales, _ = minmax_params(w, 32)
    wq = fake_quantize(w, 32)
    err = (w - wq).abs().reshape(3, 32)
    assert (err <= scales.reshape(3, 1) / 2 * (1 + 1e-5)).all()
    zero_group = fake_quantize(torch.zeros(2, 32), 32)
    assert torch.equal(zero_group, torch.zeros(2, 32))


def test_fake_quantize_matches_quantize_dequantize_and_leaves_input():
    for dtype in (torch.float32, torch.bfloat16):
        w = _weights(dtype=dtype)
        before = w.clone()
        scales, zeros = minmax_params(w, 64)
        expected = dequantize(quantize(w, scales, zeros, 64), scales, zeros, 64)
        got = fake_quantize(w, 64)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)
        assert torch.equal(w, before)


def test_awq_tensors_shapes_and_dtypes():
    t = awq_tensors(_weights(64, 256), 128)
    assert t["qweight"].shape == (256, 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (2, 64) and t["scales"].dtype == torch.float16


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_independent_dequantizer_agrees_bit_for_bit(group_size):
    w = _weights(48, 256, seed=group_size, dtype=torch.bfloat16)
    t = awq_tensors(w, group_size)
    ours = awq_dequantize(t["qweight"], t["qzeros"], t["scales"], group_size)
    ref = _reference_dequantize(t["qweight"], t["qzeros"], t["scales"], group_size)
    assert torch.equal(ours, ref)
    # What the search measured is exactly what the stored tensors hold.
    assert torch.equal(fake_quantize(w, group_size), ref)
    err = (w.float() - ref).abs().reshape(48, -1, group_size)
    assert (err <= t["scales"].float().t().unsqueeze(-1) / 2 * (1 + 1e-5)).all()


def test_awq_codes_layout():
    w = _weights(16, 64)
    t = awq_tensors(w, 32)
    q, z = awq_codes(t["qweight"], t["qzeros"])
    scales, zeros = minmax_params(w, 32)
    assert torch.equal(q, quantize(w, scales, zeros, 32))
    assert torch.equal(z.int(), zeros)


def test_group_size_errors_name_the_layer():
    with pytest.raises(UserError, match=r"layer blk\.q_proj: group size 128 does not divide the 100"):
        check_group_size(100, 128, "blk.q_proj")
    for bad in (0, -2, 2.0, True, "big"):
        with pytest.raises(UserError):
            check_group_size(128, bad)
    assert check_group_size(256, 256) == 256
    assert check_group_size(96, -1) == 96  # -1: one group per row
    with pytest.raises(UserError, match="multiple of 8"):
        check_awq_shape(12, 128, 32, "x")
    with pytest.raises(UserError, match="does not divide"):
        awq_tensors(torch.zeros(16, 96), 64)
    with pytest.raises(UserError, match="does not divide"):
        fake_quantize(torch.zeros(16, 96), 64)


def test_non_finite_and_too_wide_weights_are_rejected():
    w = _weights(8, 32)
    w[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        minmax_params(w, 32)
    with pytest.raises(UserError, match="float16"):
        minmax_params(torch.tensor([[-1e6, 1e6] * 16]), 32)


def test_tinygemm_table_reproduces_awq_dequantisation():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (4, 64), generator=g).float()
    z = torch.randint(0, 16, (4, 2), generator=g)
    s = torch.rand(4, 2, generator=g).half()
    table = tinygemm_scales_and_zeros(s.t(), z.t(), torch.float32)  # [groups, out, 2]
    assert table.shape == (2, 4, 2)
    kernel_view = (q.reshape(4, 2, 32) - 8) * table[..., 0].t().unsqueeze(-1) + table[..., 1].t().unsqueeze(-1)
    awq_view = (q.reshape(4, 2, 32) - z.unsqueeze(-1)) * s.float().unsqueeze(-1)
    assert torch.allclose(kernel_view, awq_view, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"), reason="torch < 2.6")
@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_cpu_int4_kernel_on_converted_tensors(group_size):
    w = _weights(48, 512, seed=7)
    t = awq_tensors(w, group_size)
    packed, table = awq_to_int4pack(t["qweight"], t["qzeros"], t["scales"], torch.bfloat16)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, table)
    ref = x.float() @ awq_dequantize(**t, group_size=group_size).t()
    # bf16 scales/offsets and a bf16 result: a few bf16 ulps of the output scale.
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


_UNPACK_SHAPES = [(16, 32), (48, 64), (80, 256), (64, 128), (208, 512), (256, 768)]


def _check_unpack_round_trips(shapes):
    for out_features, in_features in shapes:
        gen = torch.Generator().manual_seed(out_features)
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen)
        packed = int4pack(codes)
        for _ in range(2):  # the first call checks the learnt layout, the second reuses it
            assert torch.equal(int4unpack(packed, out_features, in_features), codes), (out_features, in_features)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"), reason="torch < 2.6")
def test_int4unpack_inverts_int4pack():
    _check_unpack_round_trips(_UNPACK_SHAPES)
    with pytest.raises(RuntimeError, match="4-bit values"):
        int4unpack(int4pack(torch.zeros(16, 32, dtype=torch.uint8)), 16, 64)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"), reason="torch < 2.6")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_int4unpack_learns_each_cpu_layout(capability):
    """The CPU packer's block layout differs by instruction set (16/32/64-row blocks)."""
    import inspect
    import os
    import subprocess
    import sys

    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    script = "\n".join([
        "import torch",
        "from r1v_quant.int4.kernels import int4pack, int4unpack",
        inspect.getsource(_check_unpack_round_trips),
        f"_check_unpack_round_trips({_UNPACK_SHAPES!r})",
        "print(torch.backends.cpu.get_cpu_capability())",
    ])
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == capability.upper()


def _fake_tiled_pack(codes, inner_k_tiles):
    """A stand-in for the CUDA layout: int32 [N/8, K/(16t), 32, t/2], nibbles shuffled within 8-row tiles."""
    n, k = codes.shape
    perm = torch.randperm(8 * k, generator=torch.Generator().manual_seed(k))
    nib = codes.to(torch.uint8).reshape(n // 8, 8 * k)[:, perm].reshape(-1)
    return (nib[0::2] | (nib[1::2] << 4)).view(torch.int32).reshape(n // 8, k // (16 * inner_k_tiles), 32, inner_k_tiles // 2)


def _fake_global_pack(codes, inner_k_tiles):
    """A layout with no row blocks at all: one shuffle of the whole matrix."""
    n, k = codes.shape
    perm = torch.randperm(n * k, generator=torch.Generator().manual_seed(n * 100003 + k))
    nib = codes.to(torch.uint8).reshape(-1)[perm]
    return nib[0::2] | (nib[1::2] << 4)


@pytest.mark.parametrize("packer", [_fake_tiled_pack, _fake_global_pack])
def test_int4unpack_learns_any_nibble_layout(monkeypatch, packer):
    from r1v_quant.int4 import kernels as primitives

    monkeypatch.setattr(primitives, "int4pack", packer)
    monkeypatch.setattr(primitives, "_code_sources", {})
    monkeypatch.setattr(primitives, "_verified_rows", {})
    for out_features, in_features in [(64, 128), (72, 256), (200, 128), (8, 128)]:
        gen = torch.Generator().manual_seed(out_features)
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen)
        packed = packer(codes, 8)
        for _ in range(2):
            assert torch.equal(primitives.int4unpack(packed, out_features, in_features, 8), codes)
    expected_rows = 64 if packer is _fake_tiled_pack else 200
    assert primitives._verified_rows[(torch.device("cpu"), 200, 128, 8)] == expected_rows
