"""r1v-outliers: the chained-arithmetic skill, the outlier statistics, the committed
instrument and its eval suite."""

from __future__ import annotations

import re

import pytest
import torch

from helpers.outlier_stats import channel_ratio, column_norm_ratios, decoder_input_ratios, meets_threshold
from helpers.outliers import OUTLIERS_DIR, floor_columns, gain_schedule, measure_ratios
from r1v_quant.calib.builtin import builtin_samples
from r1v_quant.calib.chains import (
    FAMILY,
    MAX_VALUE,
    STEPS,
    chain_question,
    chain_samples,
    chain_split,
    outlier_heldout,
)
from r1v_quant.calib.skills import text_question
from r1v_quant.evals.scoring import is_correct
from r1v_quant.evals.suites import suite_loader

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def test_chain_replies_write_every_step_and_box_the_last_value():
    for i in range(200):
        sample, reply = chain_question("calib", 0, i)
        start = int(re.search(r"Start at (\d+)\.", sample.prompt).group(1))
        steps = STEP.findall(reply)
        assert len(steps) == STEPS
        value = start
        for a, op, b, c in steps:
            assert int(a) == value                       # each step starts where the last ended
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert int(c) == value and 0 <= value <= MAX_VALUE
        assert sample.answer == str(value) and reply.endswith(f"\\boxed{{{value}}}")
    assert chain_question("eval", 3, 17)[0].prompt == chain_question("eval", 3, 17)[0].prompt


def test_chain_answers_are_scored_by_the_boxed_value():
    sample, reply = chain_question("eval", 0, 5)
    body = reply[len("<think>\n"):]
    assert is_correct(sample, body, think_opened=True)
    wrong = str((int(sample.answer) + 1) % (MAX_VALUE + 1))
    assert not is_correct(sample, body.replace(f"\\boxed{{{sample.answer}}}", f"\\boxed{{{wrong}}}"), think_opened=True)


def test_held_out_chains_are_never_trained_chains():
    held = [chain_question("eval", 0, i)[0] for i in range(300)]
    trained = {chain_question("calib", 0, i)[0].prompt for i in range(3000)}
    assert not {s.prompt for s in held} & trained
    for s in held:
        numbers = [int(x) for x in re.findall(r"\d+", s.prompt)]
        words = re.findall(r"(add|subtract) \d+", s.prompt.lower())
        ops = [("+" if w == "add" else "-", b) for w, b in zip(words, numbers[1:])]
        assert chain_split(numbers[0], ops) == "eval"


def test_a_suite_never_asks_a_held_out_chain_twice():
    prompts = [s.prompt for s, _ in chain_samples("eval", 0, 1000)]
    assert len(set(prompts)) == 1000
    suite = [s.prompt for s, f in outlier_heldout(400) if f == FAMILY]
    assert suite == prompts[:200]
    numbers = {int(x) for p in prompts for x in re.findall(r"\d+", p)}
    assert numbers <= set(range(MAX_VALUE + 1)) and MAX_VALUE < 10   # one digit, one token


def test_channel_ratio_of_a_known_tensor():
    means = torch.ones(256)
    means[7] = 120.0
    means[:10] *= 0.5                                    # below the median: no effect on it
    assert channel_ratio(means) == pytest.approx(120.0 * 0.5)
    with pytest.raises(ValueError):
        channel_ratio(torch.ones(2, 3))


def _tiny_qwen2(width: int = 64, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=width, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def test_decoder_input_ratios_see_a_large_norm_gain():
    model = _tiny_qwen2()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 100.0
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    rows = decoder_input_ratios(model, lambda: model(ids))
    assert [r["layer"] for r in rows] == [0, 1]
    # The first norm reads the embeddings, even across channels: the gain is the ratio.
    assert 70 < rows[0]["attn"] < 140 and rows[0]["attn_top"] == 5
    assert rows[0]["mlp"] < 10 and rows[1]["attn"] < 10
    assert meets_threshold(rows, 50.0) == (1, 4)


def test_floor_columns_restores_shrunk_reading_columns_only():
    model = _tiny_qwen2()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:, 3] *= 0.01
            layer.mlp.up_proj.weight[:, 9] *= 5.0
    before = column_norm_ratios(model, [3, 9])
    floor_columns(model, [3, 9], 1.0)
    after = column_norm_ratios(model, [3, 9])
    q0 = next(r for r in after if r["layer"] == 0 and r["weight"] == "q_proj")
    assert next(r for r in before if r["layer"] == 0 and r["weight"] == "q_proj")["ratios"][0] < 0.05
    assert q0["ratios"][0] == pytest.approx(1.0, abs=0.02)
    up0 = [r for r in after if r["layer"] == 0 and r["weight"] == "up_proj"][0]
    assert up0["ratios"][1] > 4.0                        # a floor, not a clamp


def test_gain_schedule_is_geometric_then_held():
    start, final = torch.tensor([1.0, 2.0]), torch.tensor([100.0, 50.0])
    assert torch.allclose(gain_schedule(start, final, 0, 10), start)
    assert torch.allclose(gain_schedule(start, final, 5, 10), torch.tensor([10.0, 10.0]))
    assert torch.allclose(gain_schedule(start, final, 99, 10), final)


def test_the_suite_is_held_out_from_training_and_calibration():
    name, kind, load = suite_loader("r1v-outliers", None)
    assert (name, kind) == ("r1v-outliers", "qa")
    samples = load(None, 0)
    assert len(samples) == 400
    families = [f for _, f in outlier_heldout(400)]
    assert families.count(FAMILY) == 200
    assert all("-eval-" in s.id for s in samples)
    trained_ids = {chain_question("calib", 0, i)[0].id for i in range(400)}
    trained_ids |= {text_question("calib", 0, i)[0].id for i in range(400)}
    trained_ids |= {s.id for s in builtin_samples(64, seed=0, split="calib")}
    assert not trained_ids & {s.id for s in samples}


@pytest.fixture(scope="module")
def instrument():
    from r1v_quant.model.r1v import load_model

    return load_model(OUTLIERS_DIR, device="cpu")


def test_the_committed_instrument_has_outliers_and_ordinary_weights(instrument):
    import json

    record = json.loads((OUTLIERS_DIR / "training.json").read_text())
    channels = record["recipe"]["outlier_channels"]
    held = outlier_heldout(400)
    rows = measure_ratios(instrument, [s for s, _ in held[:2] + held[200:202]])   # two chains, two pictures
    above, inputs = meets_threshold(rows, 50.0)
    assert inputs == 2 * instrument.config.num_layers and above > inputs // 2
    assert all(r["attn_top"] in channels and r["mlp_top"] in channels for r in rows)
    ratios = [v for row in column_norm_ratios(instrument.model, channels) for v in row["ratios"]]
    assert min(ratios) >= 0.95 and max(ratios) < 5.0


@pytest.mark.slow
def test_round_to_nearest_costs_the_instrument_chains(instrument):
    """The instrument discriminates: w4 g128 RTN spoils held-out chains the bf16 model gets
    right, by an interval that excludes no loss. (The full 400-question figure is in the README.)"""
    from helpers.train import answer_questions
    from r1v_quant.evals.stats import paired_difference
    from r1v_quant.quant.baselines import build_rtn

    chains = [(s, f) for s, f in outlier_heldout(400) if f == FAMILY][:60]
    ref = [r["correct"] for r in answer_questions(instrument, chains, max_new_tokens=64)]
    rtn = [r["correct"] for r in answer_questions(build_rtn(OUTLIERS_DIR, 128, "cpu", "bf16"), chains,
                                                  max_new_tokens=64)]
    assert sum(ref) >= 36                                 # 60% of chains, chance is 10%
    delta = paired_difference(ref, rtn)
    assert delta.hi < 0 and delta.value <= -10
