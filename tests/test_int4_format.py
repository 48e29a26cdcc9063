"""The AutoAWQ GEMM format's one owner: reading quantization_config, the group-size rule, the
tensor table every other module asks, and the package's place below the model and quantisation code."""

import ast
from pathlib import Path

import pytest
import torch

from r1v_quant.errors import UserError
from r1v_quant.int4.format import (
    awq_shapes,
    check_awq_tensors,
    check_group_size,
    quantization_config,
    read_quantization_config,
)
from r1v_quant.int4.kernels import awq_to_int4pack
from r1v_quant.int4.linear import AWQLinear
from r1v_quant.model.config import parse_config
from r1v_quant.quant.baselines import rtn_linear
from r1v_quant.quant.primitives import awq_tensors

ROOT = Path(__file__).resolve().parents[1] / "r1v_quant"
HAS_CPU_INT4 = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def test_reader_knows_the_aliases_and_defaults():
    qc = read_quantization_config({"quant_method": "AWQ", "w_bit": 4, "q_group_size": 64, "version": "GEMM"})
    assert (qc.quant_method, qc.bits, qc.group_size, qc.zero_point, qc.version) == ("awq", 4, 64, True, "GEMM")
    qc.check_loadable("x")
    assert read_quantization_config({"quant_method": "awq", "bits": 4}).group_size == 128
    written = quantization_config(32, ["vision_model", "mlp1"])
    back = read_quantization_config(written)
    assert (back.bits, back.group_size, back.modules_to_not_convert) == (4, 32, ["vision_model", "mlp1"])


@pytest.mark.parametrize("qc, match", [
    ("awq", "quantization_config is str 'awq', not a JSON object"),
    (["awq"], "not a JSON object"),
    ({"quant_method": "awq", "bits": 4, "group_size": "big"}, "group_size is 'big', not an integer"),
    ({"quant_method": "awq", "bits": "4"}, "bits is '4', not an integer"),
    ({"quant_method": "awq", "bits": 4, "group_size": True}, "group_size is True, not an integer"),
])
def test_reader_refuses_malformed_configs_in_one_sentence(qc, match):
    with pytest.raises(UserError, match=match) as err:
        read_quantization_config(qc, "m/config.json")
    assert str(err.value).count(". ") == 0 and str(err.value).startswith("m/config.json: ")


def _small_raw(**quant):
    from test_plan import small_config

    return {**small_config(), **quant}


@pytest.mark.parametrize("qc", ["awq", {"quant_method": "awq", "bits": 4, "group_size": "big"}])
def test_plan_and_the_loader_refuse_a_malformed_quantization_config(qc):
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.model.r1v import build_empty

    if not isinstance(qc, dict):  # not even an object: the one config reader refuses it before anything is built
        with pytest.raises(UserError, match="quantization_config is 'awq'; it must be an object"):
            parse_config(_small_raw(quantization_config=qc))
        return
    cfg = parse_config(_small_raw(quantization_config=qc))
    with pytest.raises(UserError, match="quantization_config"):
        make_plan(cfg)
    with pytest.raises(UserError, match="quantization_config"):
        build_empty(cfg)  # what chat and eval load an export with


def test_minus_one_is_one_group_per_row_everywhere():
    assert check_group_size(96, -1) == 96
    assert awq_shapes(16, 96, -1) == awq_shapes(16, 96, 96)
    assert AWQLinear(96, 16, -1, device="meta").group_size == 96
    with pytest.raises(UserError, match="group size 64 does not divide the 96 input channels"):
        awq_shapes(16, 96, 64)


def test_the_layer_buffers_are_the_format_table():
    layer = AWQLinear(256, 64, 128, bias=False, device="meta")
    table = awq_shapes(64, 256, 128)
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in layer.state_dict().items()} == table
    t = awq_tensors(torch.randn(64, 256), 128)
    assert check_awq_tensors(t["qweight"], t["qzeros"], t["scales"], None, 128) == (256, 64)
    with pytest.raises(UserError, match="scales is torch.float32"):
        check_awq_tensors(t["qweight"], t["qzeros"], t["scales"].float(), None, 128)


@pytest.mark.skipif(not HAS_CPU_INT4, reason="torch < 2.6 has no CPU int4 kernel")
def test_the_layer_packs_with_the_one_conversion():
    lin = torch.nn.Linear(256, 64)
    layer = rtn_linear(lin, 128)
    qweight, qzeros, scales = layer.qweight.clone(), layer.qzeros, layer.scales
    assert layer.prepare(torch.bfloat16)
    packed, table = awq_to_int4pack(qweight, qzeros, scales, torch.bfloat16, 1)
    assert torch.equal(layer._packed, packed) and torch.equal(layer._scale_table(torch.bfloat16), table)


def _imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
    return found


def test_int4_sits_below_model_and_quant():
    int4 = _imports(ROOT / "int4")
    assert not {m for m in int4 if m.startswith(("r1v_quant.model", "r1v_quant.quant", "r1v_quant.deploy"))}
    model = _imports(ROOT / "model")
    assert not {m for m in model if m.startswith(("r1v_quant.quant", "r1v_quant.deploy"))}
