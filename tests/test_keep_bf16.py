"""`awq --keep-bf16`: linear groups kept in bf16 inside an AWQ export, named so vLLM's substring rule cannot over-match."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from r1v_quant.errors import UserError
from r1v_quant.model.kept import (
    GROUPS,
    group_entries,
    group_modules,
    is_skipped,
    keep_entries,
    kept_groups,
    kept_linears,
    parse_keep_list,
)
from r1v_quant.model.topology import FUSED_LINEARS, QUANT_LINEARS
from tests.conftest import run_cli

LAYERS = "language_model.model.layers."
SETTINGS = dict(samples=2, seq_len=384, max_tokens=768)
KEEP = [(0, "qkv"), (0, "o"), (1, "gate_up"), (1, "down")]


# ---------------------------------------------------------------------------------------------
# Names


def _vllm_prefixes(num_layers: int) -> list[str]:
    """The prefixes vLLM gives the decoder's linear modules: fused q/k/v and gate/up."""
    out = []
    for i in range(num_layers):
        for leaf in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            out.append(f"{LAYERS}{i}.{leaf}")
    return out


def _skipped_current(prefix: str, entries: list[str]) -> bool:
    """vLLM's current rule: a fused module is skipped when each unfused part's prefix contains an entry (all or none)."""
    proj = prefix.rsplit(".", 1)[1]
    if proj in FUSED_LINEARS:
        parts = {any(e in prefix.replace(proj, p) for e in entries) for p in FUSED_LINEARS[proj]}
        assert len(parts) == 1, f"{prefix}: some but not all parts skipped"
        return parts.pop()
    return any(e in prefix for e in entries)


def _skipped_older(prefix: str, entries: list[str]) -> bool:
    """Older vLLM releases: the fused prefix itself contains an entry."""
    return any(e in prefix for e in entries)


@pytest.mark.parametrize("layer", [1, 2, 10, 19])
@pytest.mark.parametrize("group", list(GROUPS))
def test_a_kept_group_matches_itself_only_under_both_vllm_rules(layer, group):
    """`layers.1.` must not keep layers 10 to 19: every entry ends at a module boundary."""
    entries = keep_entries(["vision_model", "mlp1"], [(layer, group)])
    fused = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
    want = [f"{LAYERS}{layer}.{fused[group]}"]
    for rule in (_skipped_current, _skipped_older):
        assert [p for p in _vllm_prefixes(20) if rule(p, entries)] == want, rule.__name__
    assert kept_linears(20, entries) == set(group_modules(layer, group))
    assert kept_groups(20, entries) == [(layer, group)]


def test_every_layer_group_pair_keeps_exactly_its_own_linears():
    for i in range(20):
        for g in GROUPS:
            assert kept_linears(20, group_entries(i, g)) == set(group_modules(i, g))


def test_group_entries_list_each_linear_and_the_fused_name():
    assert group_entries(3, "qkv") == [f"{LAYERS}3.self_attn.q_proj", f"{LAYERS}3.self_attn.k_proj",
                                       f"{LAYERS}3.self_attn.v_proj", f"{LAYERS}3.self_attn.qkv_proj"]
    assert group_entries(3, "down") == [f"{LAYERS}3.mlp.down_proj"]
    assert is_skipped(f"{LAYERS}3.self_attn.k_proj", [f"{LAYERS}3.self_attn.qkv_proj"])  # older vLLM's fused prefix
    assert not is_skipped(f"{LAYERS}13.self_attn.k_proj", group_entries(3, "qkv"))


def test_a_fused_group_kept_in_part_is_refused():
    with pytest.raises(UserError, match="fuses them"):
        kept_groups(4, [f"{LAYERS}2.mlp.gate_proj"])


def test_parse_keep_list_forms():
    assert parse_keep_list("3.down, 0.qkv", 4) == [(0, "qkv"), (3, "down")]
    assert parse_keep_list(f"{LAYERS}2.self_attn.k_proj,{LAYERS}1.mlp.gate_up_proj,layers.1.o", 4) == [
        (1, "o"), (1, "gate_up"), (2, "qkv")]
    for bad, words in (("4.down", "layers 0 to 3"), ("1.mlp", "not a linear group"), ("vision_model.x", "neither"),
                       (",", "names no group")):
        with pytest.raises(UserError, match=words):
            parse_keep_list(bad, 4)


# ---------------------------------------------------------------------------------------------
# The choice


def test_choose_takes_the_most_gain_per_byte_that_still_fits():
    from r1v_quant.quant.keep import choose

    costs = {"qkv": 6, "o": 4, "gate_up": 20, "down": 10}
    gains = {(0, "qkv"): 6.0, (0, "o"): 8.0, (1, "gate_up"): 30.0, (1, "down"): 9.0, (2, "o"): 0.0, (2, "down"): -1.0}
    # Per byte: 0.o 2.0, 1.gate_up 1.5, 0.qkv 1.0, 1.down 0.9; none without gain.
    assert choose(gains, costs, 4) == [(0, "o")]
    # gate_up (20) no longer fits after o (4): the cheaper ones behind it still do.
    assert choose(gains, costs, 23) == [(0, "qkv"), (0, "o"), (1, "down")]
    assert choose(gains, costs, 24) == [(0, "o"), (1, "gate_up")]
    assert choose(gains, costs, 30) == [(0, "qkv"), (0, "o"), (1, "gate_up")]  # in model order
    assert choose(gains, costs, 10**9) == [(0, "qkv"), (0, "o"), (1, "gate_up"), (1, "down")]


def test_group_costs_and_auto_room_against_the_arithmetic():
    """38B at group size 128: a decoder linear param costs 2 bytes kept, 0.5 + 2.5/128 bytes 4-bit."""
    from r1v_quant.deploy.plan import kv_bytes_per_token, make_plan
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.keep import card_room, group_costs, linear_params

    cfg, _ = resolve_config("r1v-38b")
    d, f, kv = 5120, 27648, 1024
    costs = group_costs(cfg, 128)
    assert costs["qkv"].params == d * (d + 2 * kv) and costs["o"].params == d * d
    assert costs["gate_up"].params == 2 * d * f and costs["down"].params == d * f
    for c in costs.values():
        assert c.kept == 2 * c.params and c.awq * 128 == c.params * (64 + 2.5)
    assert linear_params(cfg) == 64 * (d * (d + 2 * kv) + d * d + 3 * d * f)
    assert linear_params(cfg) * 2 / 2**30 == pytest.approx(58.12, abs=0.01)          # plan's 58.12 GiB of bf16 linears
    card = make_plan(cfg, gpu_mems=[("48", 48 * 2**30)]).cards[0]
    assert card_room(cfg, 48 * 2**30, 32768, 128) == card.kv_room_bytes - 32768 * kv_bytes_per_token(cfg)


def test_auto_fills_the_card_room_pinned(monkeypatch):
    """resolve('auto') spends exactly the plan's room beyond the context, greedily by gain per extra byte."""
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant import keep

    cfg, _ = resolve_config("r1v-38b")
    costs = keep.group_costs(cfg, 128)
    room = keep.card_room(cfg, 48 * 2**30, 32768, 128)
    # Gains proportional to extra bytes but falling with depth: the first layers win, whole layers at a time.
    gains = {i: {g: (64 - i) * c.extra / 1e9 for g, c in costs.items()} for i in range(64)}
    chosen, info = keep.resolve(keep.KeepRequest("auto", card_bytes=48 * 2**30, context=32768), cfg, 128, gains)
    per_layer = sum(c.extra for c in costs.values())
    whole = room // per_layer
    assert [i for i, _ in chosen][: 4 * whole] == [i for i in range(whole) for _ in range(4)]
    assert info["extra_bytes"] <= room < info["extra_bytes"] + min(c.extra for c in costs.values()) + per_layer
    assert info["room_bytes"] == room
    with pytest.raises(UserError, match="cannot hold"):
        keep.resolve(keep.KeepRequest("auto", card_bytes=24 * 2**30, context=32768), cfg, 128, gains)


def test_share_keeps_at_most_that_share_of_parameters():
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant import keep

    cfg, _ = resolve_config("r1v-38b")
    costs = keep.group_costs(cfg, 128)
    # The same gain per parameter within a layer, falling with depth.
    gains = {i: {g: c.params / (i + 1) for g, c in costs.items()} for i in range(64)}
    chosen, info = keep.resolve(keep.KeepRequest("share", share=0.05), cfg, 128, gains)
    # A layer (487.6M parameters) is 1/64 = 1.5625%: three whole layers (4.6875%), then of the 0.3125% left
    # (97.5M) layer 3's qkv (36.7M) and o (26.2M) fit, its gate_up (283M) and down (142M) do not; of the
    # 34.6M still left layer 4's qkv does not fit and its o does.
    assert chosen == [(i, g) for i in range(3) for g in GROUPS] + [(3, "qkv"), (3, "o"), (4, "o")]
    assert info["params_share"] == pytest.approx((3 * 487587840 + 36700160 + 2 * 26214400) / (64 * 487587840))


def test_parse_keep_requests():
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.keep import parse_keep

    cfg, _ = resolve_config("r1v-38b")
    auto = parse_keep("auto", cfg, "40GiB", 65536)
    assert (auto.mode, auto.card_bytes, auto.context) == ("auto", 40 * 2**30, 65536)
    assert parse_keep("5%", cfg).share == pytest.approx(0.05)
    assert parse_keep("0.qkv,63.down", cfg).groups == ((0, "qkv"), (63, "down"))
    for args, words in ((("auto", cfg), "needs --budget"), (("5%", cfg, "40GiB"), "auto only"),
                        (("150%", cfg), "between 0% and 100%"), (("64.down", cfg), "layers 0 to 63")):
        with pytest.raises(UserError, match=words):
            parse_keep(*args)


# ---------------------------------------------------------------------------------------------
# Kept weights and the export


def test_kept_weights_compute_what_the_source_computes(tiny_dir):
    """Fold AWQ-like scales into a layer as `awq` does, then rebuild each linear with `kept_weight`: same outputs."""
    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.config import load_config
    from r1v_quant.model.topology import QWEN2_GROUPS
    from r1v_quant.quant.awq import fold_scales
    from r1v_quant.quant.keep import SCALES_PREFIX, kept_weight
    from r1v_quant.quant.pipeline import LayerRunner, foldable, load_decoder_layer

    cfg, ckpt = load_config(tiny_dir), Checkpoint(tiny_dir)
    source = load_decoder_layer(cfg, ckpt, 1, torch.device("cpu"), torch.float32)
    layer = load_decoder_layer(cfg, ckpt, 1, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    scales = {}
    for g in QWEN2_GROUPS:
        if foldable(layer, g):
            s = torch.rand(layer.get_submodule(g.linears[0]).in_features, generator=gen) * 4 + 0.25
            fold_scales(layer.get_submodule(g.prev), [layer.get_submodule(n) for n in g.linears], s)
            scales[SCALES_PREFIX + g.name] = s
    assert set(scales) == {SCALES_PREFIX + g for g in ("qkv", "gate_up", "down")}  # tiny has GQA: no o fold
    for name in QUANT_LINEARS:
        src_w = ckpt.get(f"{LAYERS}1.{name}.weight")
        layer.get_submodule(name).weight.data = kept_weight(src_w, name, scales, torch.float32)
    runner = LayerRunner(cfg, torch.device("cpu"))
    x = torch.randn(1, 37, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(runner.layer(layer, x), runner.layer(source, x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mixed_export(tiny_dir, tmp_path_factory):
    from r1v_quant.quant.keep import KeepRequest
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint

    out = tmp_path_factory.mktemp("mixed") / "r1v-tiny-mixed"
    quantize_checkpoint(str(tiny_dir), out, AWQSettings(grid=5), CalibrationRecipe("builtin", **SETTINGS), device="cpu",
                        keep=KeepRequest("list", groups=tuple(KEEP)))
    return out


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_mixed_export_lists_and_stores_the_kept_groups(mixed_export):
    from r1v_quant.deploy.inspect_export import inspect

    qc = json.loads((mixed_export / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == keep_entries(["vision_model", "mlp1"], KEEP)
    tensors = {}
    for shard in mixed_export.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    kept = {m for i, g in KEEP for m in group_modules(i, g)}
    for i in range(4):
        for name in QUANT_LINEARS:
            module = f"{LAYERS}{i}.{name}"
            if module in kept:
                assert tensors[module + ".weight"].dtype == torch.bfloat16 and module + ".qweight" not in tensors
            else:
                assert module + ".qweight" in tensors and module + ".weight" not in tensors
    report = inspect(mixed_export)
    assert report.ok, [c.message for c in report.failures]
    assert report.check("sizes match the plan").status == "pass"
    assert sorted(report.quantised["kept_bf16"]) == sorted(kept)
    card = (mixed_export / "README.md").read_text()
    assert "4 decoder linear groups" in card and "language_model.model.layers.1.mlp.down_proj" in card
    saved = json.loads((mixed_export / "r1v_quant_report.json").read_text())
    assert saved["kept_bf16"]["groups"] == ["0.qkv", "0.o", "1.gate_up", "1.down"]


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_kept_linears_compute_the_source_function(tiny_dir, mixed_export):
    """Layer 0's attention and layer 1's MLP are wholly kept: the export computes them as the source does."""
    from r1v_quant.model.r1v import load_model
    from r1v_quant.quant.pipeline import LayerRunner

    src = load_model(tiny_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    exp = load_model(mixed_export, device="cpu", dtype="fp32", with_tokenizer=False)
    s0, e0 = (m.model.language_model.model.layers[0] for m in (src, exp))
    s1, e1 = (m.model.language_model.model.layers[1] for m in (src, exp))
    assert type(e0.self_attn.q_proj) is torch.nn.Linear and type(e0.mlp.down_proj).__name__ == "AWQLinear"
    runner = LayerRunner(src.config, torch.device("cpu"))
    x = torch.randn(1, 21, src.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def rel(want, got):
        return ((got - want).norm() / want.norm()).item()

    with torch.no_grad():
        attn = rel(*(runner.attention(lay, lay.input_layernorm(x)) for lay in (s0, e0)))
        mlp = rel(*(lay.mlp(lay.post_attention_layernorm(x)) for lay in (s1, e1)))
        quantised_mlp = rel(*(lay.mlp(lay.post_attention_layernorm(x)) for lay in (s0, e0)))
    # Only bf16 rounding of the folded weights and norms remains, far below what 4 bits leave.
    assert attn < 1e-2 and mlp < 1e-2, (attn, mlp)
    assert quantised_mlp > 5 * max(attn, mlp), (quantised_mlp, attn, mlp)


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_runtime_logits_equal_plain_dequantisation_of_the_stored_tensors(mixed_export):
    """Our loader's logits on a mixed export equal those of a plain model given each stored tensor, dequantised."""
    from r1v_quant.int4.format import awq_dequantize
    from r1v_quant.model.config import load_config
    from r1v_quant.model.r1v import R1VModel, load_model

    exp = load_model(mixed_export, device="cpu", dtype="fp32", with_tokenizer=False)
    cfg = load_config(mixed_export)
    plain = R1VModel(cfg).float().eval()  # every linear an nn.Linear (only the loader swaps in AWQLinear)
    tensors = {}
    for shard in mixed_export.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    state = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            state[module + ".weight"] = awq_dequantize(t, tensors[module + ".qzeros"], tensors[module + ".scales"],
                                                       cfg.quantization["group_size"])
        elif leaf not in ("qzeros", "scales"):
            state[name] = t.float()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    plain.language_model.model.rotary_emb = exp.model.language_model.model.rotary_emb
    ids = torch.randint(0, 200, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exp.model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def _edit_list(src, dst, fn):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["quantization_config"]["modules_to_not_convert"] = fn(raw["quantization_config"]["modules_to_not_convert"])
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_inspect_fails_when_the_list_and_the_tensors_disagree(mixed_export, tmp_path):
    from r1v_quant.deploy.inspect_export import inspect

    cases = {
        "dropped": (lambda e: [x for x in e if ".layers.1.mlp.down_proj" not in x], "leaves uncovered"),
        "quantised listed": (lambda e: e + group_entries(2, "down"), "also matches"),
        "names nothing": (lambda e: e + ["language_model.model.layers.9.mlp.down_proj"], "name no linear"),
        "bare layer": (lambda e: e + ["layers.3."], "also matches"),
    }
    for label, (fn, words) in cases.items():
        report = inspect(_edit_list(mixed_export, tmp_path / label.replace(" ", "-"), fn))
        msg = {c.name: c.message for c in report.failures}.get("modules_to_not_convert", "")
        assert words in msg, (label, msg)


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_plan_of_a_mixed_export_counts_kept_bytes(mixed_export):
    from r1v_quant.deploy.inspect_export import inspect
    from r1v_quant.deploy.plan import plan_model

    plan = plan_model(str(mixed_export))
    assert plan.export_total == inspect(mixed_export).total_bytes
    assert any("kept in bf16" in n for n in plan.notes)


# ---------------------------------------------------------------------------------------------
# Sensitivity and the auto choice


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_sensitivity_is_measured_without_changing_the_layer_result(tiny_dir):
    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.activations import ActivationStore
    from r1v_quant.quant.pipeline import LayerRunner, load_decoder_layer, quantize_layer
    from r1v_quant.quant.recipe import AWQSettings

    cfg, ckpt = load_config(tiny_dir), Checkpoint(tiny_dir)
    store = ActivationStore()
    gen = torch.Generator().manual_seed(3)
    for n in (60, 90):
        store.append(torch.randn(1, n, cfg.hidden_size, generator=gen))
    runs = []
    for measure in (False, True):
        layer = load_decoder_layer(cfg, ckpt, 0, torch.device("cpu"), torch.float32)
        runs.append(quantize_layer(LayerRunner(cfg, torch.device("cpu")), layer, store,
                                   AWQSettings(grid=4, sensitivity=measure), torch.float32))
    (t0, out0, r0), (t1, out1, r1) = runs
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert all(torch.equal(a, b) for a, b in zip(out0, out1))
    assert r0.sensitivity == {} and set(r1.sensitivity) == set(GROUPS)
    # Keeping a group float removes part of the error, never more than all of it.
    assert all(0 < v <= r1.rel_err_awq ** 2 for v in r1.sensitivity.values()), r1.sensitivity
    assert {k for k in t1 if k.startswith("awq_scales.")} == {"awq_scales.qkv", "awq_scales.gate_up", "awq_scales.down"}


@pytest.mark.slow  # an awq run on the tiny checkpoint
def test_share_export_keeps_the_groups_the_report_ranks_first(tiny_dir, tmp_path):
    """--keep-bf16 30%: the export keeps what `choose` picks from the sensitivities its own report records."""
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.keep import choose, group_costs, linear_params

    out = tmp_path / "share"
    code, _, _ = run_cli(["awq", "--model", tiny_dir, "--out", out, "--samples", "2", "--seq-len", "384", "--max-tokens",
                          "768", "--grid", "4", "--no-kl-check", "--device", "cpu", "--keep-bf16", "30%"])
    assert code == 0
    report = json.loads((out / "r1v_quant_report.json").read_text())
    cfg = load_config(tiny_dir)
    gains = {(r["index"], g): v for r in report["layers"] for g, v in r["sensitivity"].items()}
    want = choose(gains, {g: c.params for g, c in group_costs(cfg, 128).items()}, int(0.3 * linear_params(cfg)))
    assert report["kept_bf16"]["groups"] == [f"{i}.{g}" for i, g in want] and want
    assert report["awq"]["sensitivity"] is True
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == keep_entries(["vision_model", "mlp1"], want)


def test_awq_keep_flags_are_checked_before_work(tiny_dir, tmp_path, capsys):
    for extra, words in ((["--budget", "40GiB"], "go with --keep-bf16 auto"), (["--keep-bf16", "auto"], "needs --budget"),
                         (["--keep-bf16", "9.down"], "layers 0 to 3"),
                         (["--keep-bf16", "auto", "--budget", "1GiB"], "cannot hold")):
        code, _, err = run_cli(["awq", "--model", tiny_dir, "--out", tmp_path / "x", "--device", "cpu", *extra], capsys)
        assert code == 2 and words in err, (extra, err)
        assert not (tmp_path / "x").exists()


def test_plan_shows_what_auto_would_keep(capsys):
    from r1v_quant.deploy.plan import context_tokens, plan_model
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.keep import group_costs, plan_keep

    code, out, _ = run_cli(["plan", "--model", "r1v-38b", "--gpu-mem", "48GiB,80GiB"], capsys)
    assert code == 0 and "keep-bf16 auto" in out
    plan = plan_model("r1v-38b", gpu_mems=[("48GiB", 48 * 2**30), ("80GiB", 80 * 2**30)])
    cfg, _ = resolve_config("r1v-38b")
    all_extra = 64 * sum(c.extra for c in group_costs(cfg, 128).values())
    fits = plan_keep(plan, 32768)
    for card, fit in zip(plan.cards, fits):
        room = card.kv_room_bytes - 32768 * plan.kv_bytes_per_token
        assert fit.room_bytes == room and fit.auto_share == pytest.approx(min(1, room / all_extra))
        assert fit.context_after == context_tokens(card.kv_room_bytes - int(fit.auto_share * all_extra),
                                                   plan.kv_bytes_per_token)
        assert 32768 <= fit.context_after < 32768 + 16 + (0 if fit.auto_share < 1 else 10**7)
        assert fit.context_at[0.05] == context_tokens(card.kv_room_bytes - int(0.05 * all_extra), plan.kv_bytes_per_token)
    # plan's figures: 2.76 GiB beyond 32k on a 48 GiB card keep about 6%.
    assert fits[0].room_bytes / 2**30 == pytest.approx(2.76, abs=0.01) and fits[0].auto_share == pytest.approx(0.064, abs=0.003)
    assert f"{fits[0].auto_share:.1%}" in out
