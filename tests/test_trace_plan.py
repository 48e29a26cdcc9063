"""The trace phase at the 38B config: which path each card takes, its memory and every phase's time,
pinned against arithmetic written out here; and `awq`'s refusal before loading anything."""

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from r1v_quant.deploy.cards import CARDS, card_for
from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.model.footprint import estimate_reserve
from r1v_quant.quant import trace_plan as tp

GiB = 1024**3
MINI = Path(__file__).resolve().parents[1] / "models" / "r1v-mini"

# The 38B language model: 64 layers, hidden 5120, intermediate 27648, 8 KV heads of 128, vocabulary 152064.
LAYERS, HIDDEN, INTER, KV_WIDTH, VOCAB = 64, 5120, 27648, 8 * 128, 152064
LINEAR_PARAMS = LAYERS * (2 * HIDDEN * HIDDEN + 2 * KV_WIDTH * HIDDEN + 3 * HIDDEN * INTER)
LLM_PARAMS = LINEAR_PARAMS + 2 * VOCAB * HIDDEN + LAYERS * (2 * HIDDEN + HIDDEN + 2 * KV_WIDTH) + HIDDEN
KV_BF16 = 2 * LAYERS * KV_WIDTH * 2                 # K and V, every layer, 2 bytes
SOURCE = 76_784_317_184                            # the bf16 checkpoint's tensor bytes (71.5 GiB), as `plan` lists them
SOURCE_LLM = 65_527_752_704                        # of which the language model
EXPORT, EXPORT_LLM = 30_585_369_344, 19_328_804_864
SAMPLES, PROMPT, TRACE, TOKENS, GRID = 128, 2048, 1024, 65536, 20
CONTEXT = PROMPT + TRACE
# what each card's best serving recipe of the export is (deploy/compromises.py), and the KV context it leaves
RECIPES = {24: (("util-95", "fp8-kv", "lm-head-4bit", "tower-offload", "tiles-6"), 0.95, 20592, KV_BF16 // 2),
           32: (("util-95", "tower-offload"), 0.95, 34592, KV_BF16),
           48: ((), 0.9, 44080, KV_BF16),
           80: ((), 0.9, 162048, KV_BF16)}
CHIPS = {24: (165.2e12, 1008e9), 32: (209.5e12, 1792e9), 48: (362.05e12, 864e9), 80: (989.4e12, 3352e9)}


@pytest.fixture(scope="module")
def cfg():
    return resolve_config("r1v-38b")[0]


def job():
    return tp.TraceJob(SAMPLES, PROMPT, TRACE)


def test_the_inputs_are_the_38b_configs(cfg):
    assert tp.weight_totals(cfg) == {"source": SOURCE, "source llm": SOURCE_LLM, "export": EXPORT, "export llm": EXPORT_LLM}
    assert tp.llm_params(cfg) == LLM_PARAMS
    assert SOURCE / GiB == pytest.approx(71.51, abs=0.01)


def generation(flops, bandwidth, gpus, weights, kv, batch):
    flops, bandwidth = flops * 0.5 * gpus, bandwidth * 0.8 * gpus
    step = max((weights + batch * (PROMPT + TRACE / 2) * kv) / bandwidth, 2 * LLM_PARAMS * batch / flops)
    return SAMPLES * PROMPT * 2 * LLM_PARAMS / flops + math.ceil(SAMPLES / batch) * TRACE * step


def layer_loop(flops):
    return 2 * LINEAR_PARAMS * TOKENS * (GRID + 4) / (flops * 0.5) + SOURCE_LLM / 1e9


EXPORT_SECONDS = (SOURCE - SOURCE_LLM + EXPORT) / 1e9


@pytest.mark.parametrize("gib", [24, 32, 48, 80])
def test_one_card_of_each_size_bootstraps_through_vllm_with_its_recipe(cfg, gib):
    card = gib * GiB
    r = tp.plan_card(cfg, f"{gib} GB", card, job(), TOKENS)
    vllm_full, transformers_full, four_bit = r.tried
    # bf16 through vLLM: the weights and vLLM's reserve exceed 90% of the card
    reserve = estimate_reserve(cfg, dtype="bfloat16").total
    assert SOURCE + reserve > 0.9 * card and not vllm_full.fits and vllm_full.batch == 0
    # bf16 through transformers: weights, one sequence's KV, one prompt's prefill and one image, within awq's budget
    need = (SOURCE + KV_BF16 * CONTEXT + PROMPT * (3 * HIDDEN + 3 * INTER) * 2
            + estimate_reserve(cfg, max_batched_tokens=1, dtype="bfloat16").vision_activations)
    assert transformers_full.device_bytes == need and transformers_full.budget == int(card - max(2 * GiB, 0.1 * card))
    assert not transformers_full.fits
    # so the 4-bit bootstrap, with the card's recipe: as many traces at once as its KV context holds
    levers, util, context, kv = RECIPES[gib]
    assert r.path is four_bit and r.bootstrap and four_bit.engine == "vllm" and four_bit.levers == levers
    assert four_bit.device_bytes == int(card * util) and four_bit.batch == context // CONTEXT
    flops, bandwidth = CHIPS[gib]
    assert card_for(card).bf16_tflops * 1e12 == flops
    times = {t.phase: t.seconds for t in r.times}
    assert list(times) == ["bootstrap layer loop", "bootstrap export", "trace generation", "layer loop", "export"]
    assert times["trace generation"] == pytest.approx(generation(flops, bandwidth, 1, EXPORT_LLM, kv, context // CONTEXT),
                                                      rel=1e-12)
    assert times["layer loop"] == times["bootstrap layer loop"] == pytest.approx(layer_loop(flops), rel=1e-12)
    assert times["export"] == pytest.approx(EXPORT_SECONDS, rel=1e-12)


def test_the_figures_a_user_reads(cfg):
    """Batch and minutes per card, as `plan --calibrate --traces self` prints them (the arithmetic above)."""
    got = {gib: tp.plan_card(cfg, "x", gib * GiB, job(), TOKENS) for gib in (24, 32, 48, 80)}
    assert {g: r.path.batch for g, r in got.items()} == {24: 6, 32: 11, 48: 14, 80: 52}
    assert {g: round(r.total_seconds / 60) for g, r in got.items()} == {24: 57, 32: 41, 48: 30, 80: 12}


def test_two_80gb_cards_serve_the_full_precision_model_with_tensor_parallel(cfg):
    card = 80 * GiB
    r = tp.plan_card(cfg, "80 GB", card, job(), TOKENS, gpus=2)
    reserve = estimate_reserve(cfg, dtype="bfloat16").total
    room = int(0.9 * card) - SOURCE // 2 - reserve
    batch = min(SAMPLES, room // (KV_BF16 * CONTEXT // 2))
    assert r.path.engine == "vllm" and r.path.model == tp.FULL and r.path.gpus == 2 and r.path.batch == batch == 86
    times = {t.phase: t.seconds for t in r.times}
    assert list(times) == ["trace generation", "layer loop", "export"]      # no bootstrap pass
    assert times["trace generation"] == pytest.approx(generation(*CHIPS[80], 2, SOURCE_LLM, KV_BF16, batch), rel=1e-12)


def test_an_engine_asked_for_restricts_the_paths(cfg):
    r = tp.plan_card(cfg, "80 GB", 80 * GiB, job(), TOKENS, engine="transformers")
    assert r.path is None and [p.engine for p in r.tried] == ["transformers"]
    sentence = tp.no_path_sentence(job(), "an 80 GB card", r.tried)
    assert "--traces bootstrap" in sentence and "--tensor-parallel-size" in sentence and "chat:PATH" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".")


def test_the_card_table_is_one_place_and_the_nearest_card_stands_for_other_sizes():
    assert [c.memory_gib for c in CARDS] == sorted(c.memory_gib for c in CARDS)
    assert card_for(81559 * 2**20).name == "H100 SXM" and card_for(40 * GiB).name.startswith("A100")
    assert card_for(28 * GiB).memory_gib == 24       # a tie goes to the smaller card


def test_plan_prints_each_cards_trace_path_and_writes_it_as_json(tmp_path, cfg, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    out = tmp_path / "plan.json"
    code, text, err = run_cli(["plan", "-m", "r1v-38b", "--calibrate", "--traces", "self", "--gpu-mem", "24,32,48,80",
                               "--json", str(out)], capsys)
    assert code == 0, err
    assert "Trace path and predicted wall time per card" in text and "bootstrap" in text
    for chip in ("RTX 4090", "RTX 5090", "L40S", "H100 SXM"):
        assert chip in text
    rows = json.loads(out.read_text())
    assert [r["trace"]["batch"] for r in rows] == [6, 11, 14, 52]
    assert rows[0]["trace"]["levers"] == list(RECIPES[24][0]) and rows[0]["assumed_chip"] == "RTX 4090"
    assert rows[3]["seconds"]["layer loop"] == pytest.approx(layer_loop(CHIPS[80][0]), rel=1e-9)


def test_plan_without_traces_is_unchanged(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, text, _ = run_cli(["plan", "-m", "r1v-38b", "--calibrate", "--gpu-mem", "24", "--json", str(out)], capsys)
    assert code == 0 and "Trace path" not in text
    assert "trace" not in json.loads(out.read_text())[0]


@pytest.mark.slow
def test_awq_refuses_a_trace_phase_that_cannot_fit_before_loading_anything(tmp_path, monkeypatch, capsys):
    from r1v_quant.model import r1v
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.memory_model import predict

    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setenv("R1V_QUANT_CACHE", str(tmp_path / "cache"))
    mini = load_config(MINI)
    # a budget the layer pass fits in but the whole model, its KV cache and one prefill do not
    layer_floor = predict(mini, 4 * 2048, 2**30, device="cpu", act_bytes=4, seq_len=2048).min_budget
    trace_need = tp.transformers_path(mini, tp.TraceJob(4, 2048, 1024), 0, tp.weight_totals(mini)["source"], 0).device_bytes
    budget = (layer_floor + trace_need) // 2 // 2**20
    assert layer_floor < budget * 2**20 < trace_need
    out = tmp_path / "out"
    code, _, err = run_cli(["awq", "-m", str(MINI), "-o", str(out), "--traces", "self", "--samples", "4", "--device",
                            "cpu", "--max-device-memory", f"{budget}MiB", "--no-kl-check", "--compute-dtype", "float32"], capsys)
    assert code == 2, err
    message = " ".join(err.split("error: ", 1)[1].split())
    assert message.startswith("the trace phase (4 prompts, 3,072 tokens of context each) does not fit the cpu budget")
    assert "--traces bootstrap" in message and "--trace-model" in message and "chat:PATH" in message
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_the_path_awq_is_about_to_take_on_gpus_at_hand(cfg):
    j = job()
    one = tp.runtime_path(cfg, j, "vllm", SOURCE, False, 0, gpus=1, gpu_bytes=80 * GiB)
    two = tp.runtime_path(cfg, j, "vllm", SOURCE, False, 0, gpus=2, gpu_bytes=80 * GiB)
    assert not one.fits and two.fits and two.batch == 86
    boot = tp.runtime_path(cfg, j, "vllm", EXPORT_LLM, True, 0, gpu_bytes=24 * GiB)
    assert boot.fits and boot.model == tp.FOUR_BIT and boot.batch == 6
    assert tp.runtime_path(cfg, j, "vllm", SOURCE, False, 0) is None          # vLLM on CPU: its own KV setting
    with pytest.raises(Exception, match=r"^the trace phase \(128 prompts, 3,072 tokens of context each\) does not fit "
                                        r"1 x 80 GPU \(it needs 76\.\d\d GiB per device\); use --traces bootstrap"):
        tp.check_trace_phase(one, j, "1 x 80 GPU")


def test_awqs_pre_check_counts_the_trace_models_weights(tmp_path):
    import torch

    from r1v_quant.errors import UserError
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.recipe import CalibrationRecipe
    from r1v_quant.quant.run import trace_check

    mini = load_config(MINI)
    calib = CalibrationRecipe("builtin", samples=4, traces="self")
    need = tp.transformers_path(mini, tp.TraceJob(4, 2048, 1024), 0, tp.weight_totals(mini)["source"], 0).device_bytes
    trace_check(mini, calib, MINI, torch.device("cpu"), need, 128)()                  # exactly enough
    with pytest.raises(UserError, match="does not fit the cpu budget of"):
        trace_check(mini, calib, MINI, torch.device("cpu"), need - 1, 128)()
    # a bootstrap not made yet is counted at its predicted 4-bit size, smaller than the source
    boot = CalibrationRecipe("builtin", samples=4, traces="bootstrap")
    trace_check(mini, boot, None, torch.device("cpu"), need - 1, 128)()
