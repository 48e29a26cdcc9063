"""The memory model of `awq`: predictions from the same plan the pipeline makes, `plan --calibrate`, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.quant.chunks import headroom_budget
from r1v_quant.quant.memory_model import GiB, auto_spill_above, calibration_tokens, config_plan, largest_on_device, predict

MiB = 1024**2


def test_plan_calibrate_38b_on_a_24gib_card_fits_with_the_defaults(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, text, _ = run_cli(["plan", "--model", "r1v-38b", "--calibrate", "--gpu-mem", "24GiB", "--json", out], capsys)
    assert code == 0, text
    (row,) = json.loads(out.read_text())
    assert row["tokens"] == 65536 and row["fits"] is True
    assert row["device_peak"] <= 22 * GiB
    assert row["host_peak"] <= 32 * 10**9
    assert row["max_tokens_on_device"] >= 65536
    assert "24GiB" in text and "yes" in text


def test_prediction_is_the_pipelines_plan_plus_fixed_parts():
    cfg, _ = resolve_config("r1v-38b")
    budget = headroom_budget(24 * GiB)
    p = predict(cfg, 65536, budget, act_bytes=2)
    assert p.plan == config_plan(cfg, 65536, budget, 2)
    layer = sum(v for k, v in p.device_parts.items() if not k.startswith("front"))
    front = sum(v for k, v in p.device_parts.items() if k.startswith("front"))
    assert p.device_peak == max(layer, front)
    # At the 38B widths the stored hidden-width tensors are 6 x tokens x 5120 bf16 values.
    assert p.device_parts["stored"] == 6 * 65536 * 5120 * 2
    # A larger calibration that no longer fits moves the stored tensors to the host, and the model follows.
    most = largest_on_device(cfg, budget)
    assert config_plan(cfg, most, budget, 2).stored_on_device
    assert not config_plan(cfg, most + 1, budget, 2).stored_on_device
    big = predict(cfg, most + 1, budget, act_bytes=2)
    assert big.host_parts["stored tensors (host)"] == 6 * (most + 1) * 5120 * 2
    assert big.device_peak <= budget


def test_activations_spill_past_the_threshold_and_the_model_says_how_much():
    cfg, _ = resolve_config("r1v-38b")
    acts = 65536 * 5120 * 4
    p = predict(cfg, 65536, 20 * GiB, spill_above=GiB)
    assert p.spilled == acts - GiB and p.host_parts["activations in RAM"] == GiB
    assert predict(cfg, 65536, 20 * GiB, spill_above=None).spilled == 0
    assert auto_spill_above(40 * GiB) == 10 * GiB and auto_spill_above(2 * GiB) == GiB
    assert calibration_tokens(128, 2048, 65536) == 65536 and calibration_tokens(4, 100, 65536) == 400


def test_layer_plan_of_a_loaded_layer_equals_the_config_plan(tiny_dir):
    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.pipeline import layer_plan, load_decoder_layer

    cfg = load_config(tiny_dir)
    layer = load_decoder_layer(cfg, Checkpoint(tiny_dir), 0, torch.device("cpu"), torch.float32)
    for tokens, budget in ((768, 12 * MiB), (6144, 64 * MiB), (300, GiB)):
        assert layer_plan(layer, tokens, budget, torch.device("cpu"), torch.float32) == config_plan(cfg, tokens, budget, 4)


def test_awq_refuses_a_budget_below_one_layer_before_any_work(tiny_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, text, err = run_cli(["awq", "--model", tiny_dir, "--out", out, "--device", "cpu", "--samples", "2",
                               "--max-device-memory", "1MiB", "--no-kl-check"], capsys)
    assert code == 2
    said = (text + err).strip()
    from r1v_quant.model.config import load_config

    need = predict(load_config(tiny_dir), 2 * 2048, MiB, device="cpu", act_bytes=4).min_budget
    assert need > MiB
    flat = said.replace("\n", " ")
    assert "--max-device-memory 1MiB cannot hold one decoder layer" in flat
    assert f"pass --max-device-memory {-(-need // MiB)}MiB or more" in flat
    assert flat.count("error:") == 1
    assert not out.exists() and not (tmp_path / ".never.awq-work").exists()


def test_out_of_memory_during_layers_names_what_to_lower_and_resume(tiny_dir, tmp_path, monkeypatch):
    import r1v_quant.quant.run as run
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe

    def boom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run, "run_awq", boom)
    with pytest.raises(UserError) as e:
        run.quantize_checkpoint(str(tiny_dir), tmp_path / "x", AWQSettings(grid=3),
                                CalibrationRecipe("builtin", samples=2, seq_len=2048, max_tokens=4096), device="cpu",
                                max_device_memory=64 * MiB)
    msg = str(e.value)
    assert "ran out of memory within a budget of 0.1 GiB" in msg
    assert "lower --max-device-memory" in msg and "--resume" in msg
    assert not (tmp_path / "x").exists()


def test_on_cpu_the_stored_tensors_count_as_growing_host_memory():
    # On CPU the layer's stored tensors and down_proj inputs live in RAM: the working set
    # (peak less these) is what stays flat as the calibration grows, with the chunk held by the budget.
    from r1v_quant.model.config import parse_config
    from r1v_quant.quant.chunks import chunk_token_bytes
    from r1v_quant.quant.memory_model import layer_weight_bytes
    from r1v_quant.synthetic.checkpoint import tiny_config
    from r1v_quant.synthetic.slices import slice_sizes

    cfg = parse_config(tiny_config(1024, slice_sizes("real", 1), {"bos": 0, "eos": 1, "pad": 1}))
    budget = 2 * layer_weight_bytes(cfg, 4) + 4 * 512 * chunk_token_bytes(5120, 27648, 4)
    small, large = (predict(cfg, t, budget, device="cpu", act_bytes=4, seq_len=256, spill_above=8 * GiB)
                    for t in (600, 2400))
    for p in (small, large):
        assert p.plan.chunk_tokens == 512 and p.plan.stored_on_device and p.plan.keep_down_inputs
        assert "stored" in p.host_parts and "front weights" not in p.host_parts
        # between layers (float32 in RAM, the next inputs, the work-folder write) + stored + down inputs
        assert p.stored_activations == (4 * 5120 * 3 + 6 * 5120 * 4 + 27648 * 4) * p.tokens
    assert small.host_peak - small.stored_activations == large.host_peak - large.stored_activations


def test_memory_check_tells_the_model_the_settings_the_command_gets(tiny_dir):
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.memory_check import RunSettings, layer_device_bytes, prediction, working_set

    s = RunSettings(device="cpu", samples=4, seq_len=512, max_tokens=2000, grid=3, budget=300 * MiB + 12345,
                    spill_above=GiB + 7, compute_dtype="float32")
    args = s.cli_args()
    assert args[args.index("--max-device-memory") + 1] == "300MiB" and s.budget == 300 * MiB
    assert args[args.index("--offload-above") + 1] == "1024MiB" and s.spill_above == GiB
    p = prediction(tiny_dir, 1500, s)
    assert p == predict(load_config(tiny_dir), 1500, 300 * MiB, device="cpu", act_bytes=4, seq_len=512,
                        spill_above=GiB)
    assert working_set(p.host_peak, p) == p.host_peak - p.stored_activations > 0
    assert layer_device_bytes(p) == sum(v for k, v in p.device_parts.items() if not k.startswith("front"))
