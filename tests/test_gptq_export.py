"""`awq --rounding gptq` end to end: the export passes inspect, reads back as its tensors say, and reruns exactly."""

import json

import pytest
import torch
from test_awq_export import independent_dequant

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.layout import is_quant_linear
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe, fingerprint
from r1v_quant.quant.run import quantize_checkpoint

GPTQ = AWQSettings(grid=5, rounding="gptq")
CALIB = CalibrationRecipe("builtin", samples=2, seq_len=384, max_tokens=768)


@pytest.fixture(scope="module")
def gptq_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "r1v-tiny-gptq"
    quantize_checkpoint(str(tiny_dir), out, GPTQ, CALIB, device="cpu", compute_dtype="float32")
    return out


def test_settings_validate_and_fingerprint_the_rounding():
    nearest = AWQSettings(grid=5)
    assert "rounding" not in nearest.to_json()  # exports made before the option keep their bytes
    assert GPTQ.to_json()["rounding"] == "gptq" and GPTQ.to_json()["gptq_damp"] == 0.01
    assert fingerprint(nearest.to_json()) != fingerprint(GPTQ.to_json())
    assert fingerprint(GPTQ.to_json()) != fingerprint(AWQSettings(grid=5, rounding="gptq", gptq_damp=0.1).to_json())
    assert "rounding" in GPTQ.display() and "rounding" not in nearest.display()
    for bad in ({"rounding": "stochastic"}, {"gptq_damp": 0.0}, {"gptq_damp": 2.0}, {"gptq_damp": float("nan")}):
        with pytest.raises(UserError):
            AWQSettings(**bad)


def test_gptq_export_passes_inspect_and_records_its_rounding(gptq_export):
    from r1v_quant.deploy.inspect_export import inspect

    report = inspect(gptq_export)
    assert report.ok, [c for c in report.checks if not c.ok]
    saved = json.loads((gptq_export / "r1v_quant_report.json").read_text())
    assert saved["awq"]["rounding"] == "gptq" and saved["awq"]["gptq_damp"] == 0.01
    assert all("gptq_damp_raised" in layer and "dead_inputs" in layer for layer in saved["layers"])
    assert "GPTQ" in (gptq_export / "README.md").read_text()


def test_runtime_logits_equal_a_plain_dequantisation(tiny_dir, gptq_export):
    """Our runtime on the export against the source model with every stored tensor put in by hand."""
    from r1v_quant.evals.quick import heldout_prompts
    from r1v_quant.model.r1v import load_model

    runtime = load_model(gptq_export, device="cpu", dtype="fp32")
    plain = load_model(tiny_dir, device="cpu", dtype="fp32")
    out = Checkpoint(gptq_export)
    replaced = 0
    with torch.no_grad():
        for name in Checkpoint(tiny_dir).names():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and is_quant_linear(module):
                w = independent_dequant(out.get(module + ".qweight"), out.get(module + ".qzeros"),
                                        out.get(module + ".scales"), 128)
                plain.model.get_submodule(module).weight.copy_(w)
                replaced += 1
            elif name.startswith("language_model.model.layers."):  # norms and biases, as stored (bf16)
                plain.model.get_parameter(name).copy_(out.get(name).float())
        assert replaced == 7 * plain.config.num_layers
        with_images, text_only = heldout_prompts(runtime, 2)
        for ids, pixels in with_images + text_only:
            a, b = runtime.model(ids, pixels).logits, plain.model(ids, pixels).logits
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


@pytest.mark.slow
def test_gptq_layer_error_is_below_nearest(tiny_dir, tmp_path, gptq_export):
    """On the same calibration tokens, the per-layer output error GPTQ leaves is below round-to-nearest's."""
    nearest = quantize_checkpoint(str(tiny_dir), tmp_path / "nearest", AWQSettings(grid=5), CALIB, device="cpu",
                                  compute_dtype="float32")
    saved = json.loads((gptq_export / "r1v_quant_report.json").read_text())["layers"]
    ratios = [g["rel_err_awq"] / n.rel_err_awq for g, n in zip(saved, nearest.layers)]
    assert max(ratios) < 0.9, ratios


@pytest.mark.slow
def test_resume_with_gptq_is_byte_identical_and_refuses_other_roundings(tiny_dir, tmp_path, gptq_export):
    resumed, work = tmp_path / "resumed", tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(str(tiny_dir), resumed, GPTQ, CALIB, device="cpu", compute_dtype="float32",
                            work_dir=work, stop_after=1)
    with pytest.raises(UserError, match="other settings"):
        quantize_checkpoint(str(tiny_dir), resumed, AWQSettings(grid=5), CALIB, device="cpu",
                            compute_dtype="float32", work_dir=work, resume=True, keep_work=True)
    quantize_checkpoint(str(tiny_dir), resumed, GPTQ, CALIB, device="cpu", compute_dtype="float32", work_dir=work,
                        resume=True)
    names = sorted(p.name for p in gptq_export.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for n in names:
        assert (gptq_export / n).read_bytes() == (resumed / n).read_bytes(), n


def test_memory_model_counts_the_second_moments_and_awq_refuses_a_budget_without_room():
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.memory_check import layer_device_bytes
    from r1v_quant.quant.memory_model import predict
    from r1v_quant.quant.run import check_fits

    cfg, _ = resolve_config("r1v-38b")
    budget = int(21.6 * 2**30)  # a free 24 GiB card's default
    plain, gptq = predict(cfg, 65536, budget), predict(cfg, 65536, budget, gptq=True)
    h = 27648**2 * 4
    assert gptq.device_parts["gptq: second moments"] >= 3 * h
    assert gptq.device_peak == plain.device_peak <= 22 * 2**30  # the searches stay the peak at the defaults
    assert layer_device_bytes(gptq) == layer_device_bytes(plain)
    assert plain.min_budget < 3 * h < gptq.min_budget
    dev = torch.device("cuda")
    check_fits(cfg, CalibrationRecipe(), 128, 8 * 2**30, dev, torch.bfloat16, 2**30)  # nearest fits in 8 GiB
    with pytest.raises(UserError, match="--rounding gptq"):
        check_fits(cfg, CalibrationRecipe(), 128, 8 * 2**30, dev, torch.bfloat16, 2**30, gptq=True)
