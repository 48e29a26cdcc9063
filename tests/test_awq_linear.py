import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.int4.linear import AWQLinear, prepare_awq, replace_linear, swap_to_empty_awq
from r1v_quant.quant.baselines import rtn_linear
from r1v_quant.quant.primitives import awq_dequantize, awq_tensors, fake_quantize

HAS_CPU_INT4 = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _linear(in_features=256, out_features=64, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(4)
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close_bf16(a, b):
    scale = b.float().abs().max().item()
    return torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale)


def test_state_dict_names_shapes_and_dtypes():
    m = rtn_linear(_linear(dtype=torch.bfloat16), 128)
    sd = m.state_dict()
    assert list(sd) == ["qweight", "qzeros", "scales", "bias"]
    assert sd["qweight"].shape == (256, 8) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (2, 8) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (2, 64) and sd["scales"].dtype == torch.float16
    assert sd["bias"].dtype == torch.bfloat16
    assert (m.in_features, m.out_features, m.group_size) == (256, 64, 128)
    assert list(rtn_linear(_linear(bias=False), 128).state_dict()) == ["qweight", "qzeros", "scales"]
    assert list(m.parameters()) == []


def test_from_linear_equals_float_linear_on_fake_quantised_weights():
    lin = _linear()
    m = rtn_linear(lin, 64)
    x = _x(3, 5, 256)
    y = m(x)
    assert y.shape == (3, 5, 64) and y.dtype == torch.float32
    expected = F.linear(x, fake_quantize(lin.weight.detach(), 64), lin.bias)
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
    # And close to the unquantised layer: 4-bit RTN on random weights loses a few percent.
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < 0.1


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_kernel_matches_dequantise_path(group_size, bias, monkeypatch):
    lin = _linear(bias=bias, dtype=torch.bfloat16)
    m = rtn_linear(lin, group_size)
    x = _x(2, 7, 256, dtype=torch.bfloat16)
    fast = m(x)
    assert m.prepared, "bf16 on CPU should take the int4 kernel"
    monkeypatch.setattr("r1v_quant.int4.linear._HAS_INT4_OPS", False)   # the dequantise path, as without the kernel
    slow = m(x)
    assert fast.dtype == slow.dtype == torch.bfloat16 and fast.shape == (2, 7, 64)
    assert _close_bf16(fast, slow)
    assert _close_bf16(fast, F.linear(x.float(), m.dequantized_weight(), None if lin.bias is None else lin.bias.float()))


def test_kernel_cache_is_built_once_and_refreshed_on_load():
    m = rtn_linear(_linear(dtype=torch.bfloat16), 128)
    x = _x(4, 256, dtype=torch.bfloat16)
    m(x)
    packed, table = m._packed, m._scale_table(x.dtype)
    m(x)
    assert m._packed is packed and m._scale_table(x.dtype) is table
    other = rtn_linear(_linear(seed=5, dtype=torch.bfloat16), 128)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), other(x))
    third = rtn_linear(_linear(seed=6, dtype=torch.bfloat16), 128)
    m.scales = third.scales  # replacing one buffer by assignment is noticed too
    assert not torch.equal(m(x), other(x))
    m.load_state_dict(other.state_dict())
    m(x)
    with torch.no_grad():
        m.scales.mul_(2)  # and so is an in-place change
    assert torch.allclose(m(x).float(), 2 * other(x).float() - other.bias.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype_follows_input(dtype):
    m = rtn_linear(_linear(), 128)
    y = m(_x(3, 256, dtype=dtype))
    assert y.dtype == dtype and y.shape == (3, 64)


def test_bias_is_added():
    lin = _linear()
    with_bias = rtn_linear(lin, 128)
    lin.bias = None
    without = rtn_linear(lin, 128)
    x = _x(2, 256)
    assert torch.allclose(with_bias(x) - without(x), with_bias.bias.expand(2, -1), atol=1e-5)


def test_widths_the_cpu_kernel_cannot_take_still_work():
    lin = _linear(in_features=96, out_features=24, dtype=torch.bfloat16)  # 24 % 16 != 0
    m = rtn_linear(lin, 32)
    x = _x(3, 96, dtype=torch.bfloat16)
    y = m(x)
    assert not m.prepared and m.qweight is not None
    assert _close_bf16(y, F.linear(x.float(), m.dequantized_weight(), lin.bias.float()))
    assert m(torch.empty(0, 96, dtype=torch.bfloat16)).shape == (0, 24)


def test_gradient_reaches_the_input():
    m = rtn_linear(_linear(dtype=torch.bfloat16), 128)
    x = _x(2, 256, dtype=torch.bfloat16).requires_grad_()
    m(x).float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_model_wide_casts_keep_float16_scales():
    m = rtn_linear(_linear(), 128)
    scales = m.scales.clone()
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and torch.equal(m.scales, scales)
    assert m.bias.dtype == torch.bfloat16
    assert m.qweight.dtype == torch.int32
    assert list(m.state_dict()) == ["qweight", "qzeros", "scales", "bias"]
    m.to("meta")
    assert m.scales.is_meta and m.qweight.is_meta
    m.to_empty(device="cpu")
    assert m.scales.device.type == "cpu" and m.scales.dtype == torch.float16


def test_empty_on_meta_then_assign():
    src = rtn_linear(_linear(dtype=torch.bfloat16), 64)
    m = AWQLinear.empty(256, 64, 64, bias=True)
    assert m.qweight.is_meta
    m.load_state_dict(src.state_dict(), assign=True)
    x = _x(3, 256, dtype=torch.bfloat16)
    assert torch.equal(m(x), src(x))


def test_from_tensors_checks_shapes_and_dtypes():
    t = awq_tensors(_linear().weight.detach(), 64)
    with pytest.raises(UserError, match="layer q: scales is torch.float32"):
        AWQLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"].float(), None, 64, name="q")
    with pytest.raises(UserError, match="qzeros"):
        AWQLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"], None, 128, name="q")
    with pytest.raises(UserError, match="bias"):
        AWQLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"], torch.zeros(3), 64)
    with pytest.raises(UserError, match="does not divide"):
        rtn_linear(_linear(in_features=96), 64, name="mlp.down_proj")
    with pytest.raises(UserError, match="multiple of 8"):
        AWQLinear(128, 20, 32)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(128, 64), "o_proj": nn.Linear(64, 128, bias=False)})
        self.norm = nn.LayerNorm(128)

    def forward(self, x):
        return self.attn["o_proj"](self.attn["q_proj"](self.norm(x)))


def test_swap_to_awq_replaces_named_linears():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    x = _x(2, 3, 128)
    names = ["0.attn.q_proj", "1.attn.o_proj"]
    tensors = {}
    for name in names:
        lin = model.get_submodule(name)
        tensors[name] = dict(awq_tensors(lin.weight.detach(), 32))
        if lin.bias is not None:
            tensors[name]["bias"] = lin.bias.detach()
    ref = model(x)
    for name, t in tensors.items():
        replace_linear(model, name, lambda old, t=t: AWQLinear.from_tensors(
            t["qweight"], t["qzeros"], t["scales"], t.get("bias"), 32))
    assert isinstance(model[0].attn["q_proj"], AWQLinear) and isinstance(model[0].attn["o_proj"], nn.Linear)
    assert isinstance(model[1].attn["o_proj"], AWQLinear)
    assert (model(x) - ref).norm() / ref.norm() < 0.1

    # Rebuild the same layout on meta and assign the quantised state dict.
    fresh = nn.Sequential(_Block(), _Block())
    assert swap_to_empty_awq(fresh, names, 32) == names
    assert fresh[0].attn["q_proj"].qweight.is_meta
    fresh.load_state_dict(model.state_dict(), assign=True)
    assert torch.equal(fresh(x), model(x))


def test_swap_errors():
    model = nn.Sequential(_Block())
    with pytest.raises(UserError, match="no module named 0.attn.k_proj"):
        swap_to_empty_awq(model, ["0.attn.k_proj"], 32)
    with pytest.raises(UserError, match="not a Linear"):
        swap_to_empty_awq(model, ["0.norm"], 32)


def _held_storage_bytes(module: nn.Module) -> dict[int, int]:
    """Bytes of every distinct tensor storage reachable from the module's own attributes."""
    held: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v)

    walk(vars(module))
    return held


def _layer(group_size=128, in_features=512, out_features=256, seed=0):
    return rtn_linear(_linear(in_features, out_features, seed=seed, dtype=torch.bfloat16), group_size)


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
@pytest.mark.parametrize("inference", [True, False])
def test_first_forward_keeps_one_copy_of_the_codes(inference):
    m = _layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    qweight_bytes = m.qweight.numel() * 4
    x = _x(3, 512, dtype=torch.bfloat16)
    with torch.inference_mode(inference), torch.no_grad():
        y = m(x)
    assert m.prepared and m.qweight is None
    held = _held_storage_bytes(m)
    # The packed codes are the only tensor anywhere near qweight's size...
    assert [b for b in held.values() if b >= qweight_bytes // 4] == [qweight_bytes]
    # ...and the rest is qzeros, scales, bias and the kernel's bf16 (scale, offset) table.
    table_bytes = m.scales.numel() * 2 * 2
    small = sum(before[k].numel() * before[k].element_size() for k in ("qzeros", "scales", "bias"))
    assert sum(held.values()) == qweight_bytes + small + table_bytes

    sd = m.state_dict()
    assert list(sd) == ["qweight", "qzeros", "scales", "bias"]
    for k in sd:
        assert sd[k].dtype == before[k].dtype and torch.equal(sd[k], before[k]), k
    assert m.prepared, "state_dict() must not undo the packing"
    fresh = AWQLinear.empty(512, 256, 128)
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh(x), y)
    # Loading into the prepared layer itself (outside inference mode) works too.
    m.load_state_dict(_layer(seed=3).state_dict())
    assert not m.prepared and torch.equal(m(x), _layer(seed=3)(x))


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
def test_packed_layer_still_serves_every_other_path():
    import copy
    import io

    m = _layer(group_size=64)
    qweight = m.qweight.clone()
    x32 = _x(2, 512)
    y32 = m(x32)  # float32: dequantise path, nothing packed
    assert not m.prepared
    assert m.prepare() and m.prepared
    assert not _layer().prepare(torch.float32), "no kernel for float32 activations: nothing to pack"
    assert torch.equal(m(x32), y32), "dequantise path from the packed codes"
    assert torch.equal(m.awq_qweight(), qweight)

    # A dtype cast keeps the packing; partial loads keep the codes.
    m.to(torch.bfloat16)
    assert m.prepared
    partial = {k: v for k, v in m.state_dict().items() if k != "qweight"}
    m.load_state_dict(partial, strict=False)
    assert torch.equal(m.qweight, qweight)
    m.prepare()

    # Copies and pickles carry plain AutoAWQ tensors; the original stays packed.
    for clone in (copy.deepcopy(m), _pickled(m, io)):
        assert not clone.prepared and torch.equal(clone.qweight, qweight)
        assert torch.equal(clone(_x(2, 512, dtype=torch.bfloat16)), m(_x(2, 512, dtype=torch.bfloat16)))
    assert m.prepared

    # Leaving the device unpacks (the layout is the device's own).
    m.to("meta")
    assert not m.prepared and m.qweight.is_meta and m.qweight.shape == qweight.shape

    m = _layer()
    m.prepare()
    m.unprepare()
    assert not m.prepared and torch.equal(m.qweight, _layer().qweight)

    model = nn.Sequential(_layer(), nn.ReLU(), _layer(in_features=256, out_features=512))
    assert prepare_awq(model) == 2
    assert all(layer.prepared for layer in (model[0], model[2]))


def _pickled(m, io):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
def test_qweight_assigned_over_packed_codes_wins():
    m = _layer()
    x = _x(2, 512, dtype=torch.bfloat16)
    m(x)
    other = _layer(seed=4)
    m.qweight = other.qweight
    assert not m.prepared
    assert torch.equal(m.state_dict()["qweight"], other.qweight)
    expected = F.linear(x.float(), awq_dequantize(other.qweight, m.qzeros, m.scales, 128), m.bias.float())
    assert _close_bf16(m(x), expected) and m.prepared


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
def test_loaded_export_holds_its_codes_once(tiny_export):
    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.r1v import load_model

    loaded = load_model(tiny_export, device="cpu")  # bf16, as chat and eval run it
    ids = loaded.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = loaded.model(ids).logits
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, AWQLinear)}
    assert layers
    for name, m in layers.items():
        assert m.prepared and m.qweight is None, name
        qweight_bytes = m.in_features * m.out_features // 2
        assert [b for b in _held_storage_bytes(m).values() if b >= qweight_bytes // 4] == [qweight_bytes], name
    ckpt = Checkpoint(tiny_export)
    sd = loaded.model.state_dict()
    for name in layers:
        for leaf in ("qweight", "qzeros", "scales"):
            assert torch.equal(sd[f"{name}.{leaf}"], ckpt.get(f"{name}.{leaf}")), f"{name}.{leaf}"
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, logits)


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
def test_qweight_is_rebuilt_in_chunks(monkeypatch):
    from r1v_quant.int4 import linear

    monkeypatch.setattr(linear, "_REBUILD_CODES", 256 * 3)  # 3 input channels at a time, ragged end
    m = _layer()
    qweight = m.qweight.clone()
    assert m.prepare()
    assert torch.equal(m.awq_qweight(), qweight)
