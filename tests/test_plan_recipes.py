"""`plan`'s recipes for R1V-38B per card, against figures worked out by hand from the published shapes,
and exact bytes for an export with a 4-bit lm_head."""

from __future__ import annotations

import json

import pytest
from test_plan import component_of, file_tensor_bytes, small_config, write_export
from typer.testing import CliRunner

from r1v_quant.deploy import compromises
from r1v_quant.deploy.plan import make_plan, plan_model
from r1v_quant.errors import UserError
from r1v_quant.model.config import parse_config
from r1v_quant.units import GiB

# R1V-38B: Qwen2 hidden 5120, 64 layers, 8 KV heads of 128, intermediate 27648, vocab 152064;
# InternViT-6B 3200 wide, 45 layers, MLP 12800, 448-pixel tiles of 14-pixel patches (32 x 32).
D, L, KV, HD, F, V = 5120, 64, 8, 128, 27648, 152064
DV, LV, FV = 3200, 45, 12800

EXPORT = 30_585_369_344                                  # test_plan.test_38b_component_sizes
VISION = 2 * 5_536_496_000                               # bf16, params as in test_plan
PROJECTOR = 2 * ((4 * DV) * 2 + (4 * DV * D + D) + (D * D + D))   # LayerNorm(12800), 12800->5120, 5120->5120
TOWER = VISION + PROJECTOR
assert TOWER == 11_256_564_480                           # 10.48 GiB

# lm_head [V, D] in bf16, and in the AWQ layout (group 128): qweight int32 [D, V/8], qzeros int32
# [D/128, V/8], scales fp16 [D/128, V].
LM_HEAD_BF16 = V * D * 2
LM_HEAD_AWQ = D * (V // 8) * 4 + (D // 128) * (V // 8) * 4 + (D // 128) * V * 2
assert LM_HEAD_AWQ == 389_283_840 + 3_041_280 + 12_165_120 == 404_490_240
LM_HEAD_SAVING = LM_HEAD_BF16 - LM_HEAD_AWQ               # 1.07 GiB

KV_BF16 = 2 * L * KV * HD * 2                            # 256 KiB per token
KV_FP8 = KV_BF16 // 2

# The reserve (plan.py's docstring): runtime 2 GiB; one 2048-token prefill chunk through the widest layer
# plus fp32 logits and probabilities of 256 sequences; the vision activations of the largest image.
RUNTIME = 2 * GiB
LLM_ACT = 2048 * 2 * (3 * D + 3 * F) + 256 * V * 4 * 2
assert LLM_ACT == 714_080_256


def vision_act(tiles: int) -> int:
    per_tile = (1 + 32 * 32) * 2 * (5 * DV + 2 * FV) + 256 * 2 * (2 * (DV * 4) + 2 * D)   # 1025 tokens a tile
    return tiles * per_tile + tiles * 256 * D * 2                                       # + the encoder cache


RESERVE = RUNTIME + LLM_ACT + vision_act(12 + 1)         # 12 tiles + thumbnail
RESERVE_6 = RUNTIME + LLM_ACT + vision_act(6 + 1)
RESERVE_TEXT = RUNTIME + LLM_ACT
assert (RESERVE, RESERVE_6, RESERVE_TEXT) == (4_242_833_664, 3_605_324_544, 2_861_563_904)


def tokens(room: int, per_token: int) -> int:
    return max(room, 0) // per_token // 16 * 16


# Card by card: the cheapest recipe that reaches 32k tokens, else 16k, else 4k.
# 24 GB: 32k is out of reach with images; 16k needs all five image-keeping compromises:
#   0.95 x 24 GiB - (export - tower - lm_head saving) - reserve with 6 tiles, in fp8 KV.
HAND_24 = tokens(int(24 * GiB * 0.95) - (EXPORT - TOWER - LM_HEAD_SAVING) - RESERVE_6, KV_FP8)
#   without the fewer tiles it stays under 16k:
assert tokens(int(24 * GiB * 0.95) - (EXPORT - TOWER - LM_HEAD_SAVING) - RESERVE, KV_FP8) == 15_728
# 32 GB: the tower offload alone leaves 28,032 tokens; with 95% of the card, over 32k.
assert tokens(int(32 * GiB * 0.9) - (EXPORT - TOWER) - RESERVE, KV_BF16) == 28_032
HAND_32 = tokens(int(32 * GiB * 0.95) - (EXPORT - TOWER) - RESERVE, KV_BF16)
# 40 GB: fp8 alone 29,184, 95% alone 22,784; both together pass 32k.
assert tokens(int(40 * GiB * 0.9) - EXPORT - RESERVE, KV_FP8) == 29_184
HAND_40 = tokens(int(40 * GiB * 0.95) - EXPORT - RESERVE, KV_FP8)
HAND_48 = tokens(int(48 * GiB * 0.9) - EXPORT - RESERVE, KV_BF16)
HAND_80 = tokens(int(80 * GiB * 0.9) - EXPORT - RESERVE, KV_BF16)
# Text only: no tower, no vision activations.
HAND_24_TEXT = tokens(int(24 * GiB * 0.95) - (EXPORT - TOWER) - RESERVE_TEXT, KV_FP8)
HAND_32_TEXT = tokens(int(32 * GiB * 0.9) - (EXPORT - TOWER) - RESERVE_TEXT, KV_BF16)


def test_hand_figures():
    assert (HAND_24, HAND_32, HAND_40, HAND_48, HAND_80) == (20_592, 34_592, 45_568, 44_080, 162_048)
    assert (HAND_24_TEXT, HAND_32_TEXT) == (17_472, 33_312)


@pytest.fixture(scope="module")
def plan38():
    return plan_model("r1v-38b")


def test_38b_plan_bytes_behind_the_recipes(plan38):
    b = plan38.basis
    assert plan38.export_total == b.weights == EXPORT
    assert b.tower == TOWER and b.lm_head_saving == LM_HEAD_SAVING
    assert plan38.reserve.total == RESERVE


@pytest.mark.parametrize("card, levers, context, goal", [
    ("24 GB", ("util-95", "fp8-kv", "lm-head-4bit", "tower-offload", "tiles-6"), HAND_24, 16384),
    ("32 GB", ("util-95", "tower-offload"), HAND_32, 32768),
    ("40 GB", ("util-95", "fp8-kv"), HAND_40, 32768),
    ("48 GB", (), HAND_48, 32768),
    ("80 GB", (), HAND_80, 32768),
])
def test_38b_best_recipe_per_card(plan38, card, levers, context, goal):
    best = {c.label: c for c in plan38.cards}[card].best
    assert best.levers == levers and best.max_context == context and best.goal == goal
    assert best.max_model_len == min(context, 131072) and best.images
    if "tower-offload" in levers:
        # pinned host RAM = vision encoder + mlp1; --cpu-offload-gb in whole GiB; bytes / 25 GB/s per encoding step
        assert best.host_pinned == TOWER and best.offload_gib == 11
        assert best.encode_seconds == pytest.approx(TOWER / 25e9) == pytest.approx(0.4503, abs=1e-4)
        assert best.gpu_weights == EXPORT - TOWER - (LM_HEAD_SAVING if "lm-head-4bit" in levers else 0)
        assert best.min_vllm == "0.32"
    else:
        assert best.host_pinned == 0 and best.min_vllm == compromises.BASELINE_VLLM


def test_38b_on_32gb_keeps_the_vision_encoder_bf16_with_16k_or_more(plan38):
    best = plan38.cards[1].best
    assert "text-only" not in best.levers and best.max_context >= 16384
    assert plan38.component("vision").export_bytes == plan38.component("vision").source_bytes   # bf16, not quantised


def test_38b_text_only_rows(plan38):
    cards = {c.label: c for c in plan38.cards}
    assert cards["24 GB"].best_text_only.levers == ("util-95", "fp8-kv", "text-only")
    assert cards["24 GB"].best_text_only.max_context == HAND_24_TEXT
    assert cards["32 GB"].best_text_only.levers == ("text-only",)
    assert cards["32 GB"].best_text_only.max_context == HAND_32_TEXT
    assert cards["32 GB"].best_text_only.gpu_weights == EXPORT - TOWER


def test_cost_order_puts_one_costly_compromise_above_many_cheap_ones():
    assert compromises.COMPROMISES == ("util-95", "fp8-kv", "lm-head-4bit", "tower-offload", "tiles-6", "text-only")
    assert compromises.lever_cost(("util-95", "fp8-kv", "lm-head-4bit")) < compromises.lever_cost(("tower-offload",))
    assert compromises.lever_cost(("util-95", "fp8-kv", "lm-head-4bit", "tower-offload", "tiles-6")) < \
        compromises.lever_cost(("text-only",))


def test_old_vllm_has_no_tower_offload_and_builds_the_tower(plan38):
    old = compromises.parse_version("0.31.0")
    keep_images = frozenset(compromises.COMPROMISES) - {"text-only"}
    r = compromises.best_recipe(plan38.basis, 32 * GiB, keep_images, version=old)
    assert "tower-offload" not in r.levers and r.max_context == 0
    # the best it can do: every other compromise, 0.4 GiB short of any KV cache
    assert r.kv_room == int(32 * GiB * 0.95) - (EXPORT - LM_HEAD_SAVING) - RESERVE_6 < 0
    text = compromises.evaluate(plan38.basis, 48 * GiB, frozenset({"text-only"}), old)
    assert text.gpu_weights == EXPORT and text.notes      # the tower is counted, and the note says so
    assert text.max_context == tokens(int(48 * GiB * 0.9) - EXPORT - RESERVE_TEXT, KV_BF16)


def test_planning_a_4bit_lm_head_export(plan38):
    p = plan_model("r1v-38b", lm_head=True)
    assert p.lm_head_4bit and p.component("lm_head").export_bytes == LM_HEAD_AWQ
    assert p.export_total == EXPORT - LM_HEAD_SAVING
    assert p.basis.lm_head_saving == 0
    assert all("lm-head-4bit" not in c.best.levers for c in p.cards)


# ---------------------------------------------------------------------------------------------
# An export with a 4-bit lm_head: plan's bytes equal the files'


@pytest.mark.parametrize("group", [128, -1])
def test_lm_head_export_bytes_equal_the_files(tmp_path, group):
    raw = small_config()
    write_export(tmp_path, raw, group=group, lm_head=True)
    real = file_tensor_bytes(tmp_path)
    assert {"language_model.lm_head.qweight", "language_model.lm_head.qzeros", "language_model.lm_head.scales"} <= set(real)
    assert "language_model.lm_head.weight" not in real
    plan = plan_model(str(tmp_path))
    assert plan.lm_head_4bit and plan.export_total == sum(real.values())
    for comp in plan.components:
        assert comp.export_bytes == sum(b for n, b in real.items() if component_of(n) == comp.name), comp.name
    # the same export without "lm_head": true would be planned 1000 x 256 bf16 bytes larger, less the AWQ ones
    plain = make_plan(parse_config(raw), group_size=group)
    assert plain.component("lm_head").export_bytes == 1000 * 256 * 2
    assert plain.basis.lm_head_saving == plain.component("lm_head").export_bytes - plan.component("lm_head").export_bytes


def test_lm_head_flag_disagreeing_with_the_export_is_refused(tmp_path):
    write_export(tmp_path, small_config(), lm_head=True)
    with pytest.raises(UserError, match="exported with lm_head 4-bit"):
        plan_model(str(tmp_path), lm_head=False)


def test_cli_prints_the_recipe_table_and_json(tmp_path):
    from test_plan import _app

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--gpu-mem", "32GiB", "--json", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "util-95 + tower-offload" in result.output and "34,592" in result.output
    assert "--offload-backend uva --cpu-offload-gb 11 --cpu-offload-params vision_model mlp1" in result.output
    card = json.loads(out.read_text())["cards"][0]
    assert card["best"]["levers"] == ["util-95", "tower-offload"] and card["best"]["max_context"] == HAND_32
    assert card["best"]["host_pinned"] == TOWER and card["best"]["vllm"] == ">= 0.32"
    result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--gpu-mem", "24GiB", "--quantize-lm-head"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "util-95 + fp8-kv + tower-offload + tiles-6" in result.output and f"{HAND_24:,d}" in result.output
