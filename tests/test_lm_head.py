"""`awq --quantize-lm-head`: the search, the fold into the final norm, the export, the runtime, inspect and memory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from test_awq_export import independent_dequant
from torch import nn

from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.quant.awq import candidate_scales, fold_scales, search_linear_scales, search_scales_chunked
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe

HEAD = "language_model.lm_head"
NORM = "language_model.model.norm.weight"
SETTINGS = AWQSettings(grid=5, lm_head=True)
CALIB = CalibrationRecipe("builtin", samples=2, seq_len=384, max_tokens=768)


@pytest.fixture(scope="module")
def head_export(tiny_dir, tmp_path_factory):
    from r1v_quant.quant.run import quantize_checkpoint

    out = tmp_path_factory.mktemp("lm-head") / "r1v-tiny-awq-head"
    result = quantize_checkpoint(str(tiny_dir), out, SETTINGS, CALIB, device="cpu", compute_dtype="float32")
    assert result.head is not None and result.head.index == 4
    return out


# ---------------------------------------------------------------------------------------------
# The search and the fold, on their own


def _chunks(x, w_tok, block, size):
    return lambda: [(x[a:a + size], w_tok[a:a + size], block) for a in range(0, x.shape[0], size)]


def test_linear_search_picks_what_the_block_search_picks():
    """The objective from the weight difference is the block search's logit MSE, without stored targets."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 256, generator=gen) * torch.linspace(0.1, 4, 256)  # uneven channels: alpha matters
    w_tok = torch.rand(96, generator=gen)
    w_tok /= w_tok.sum()
    lin = nn.Linear(256, 64, bias=False)
    lin.weight.data = torch.randn(64, 256, generator=gen)
    ref = search_scales_chunked([lin], _chunks(x, w_tok, lin, 32), 128, grid=10)
    got = search_linear_scales(lin.weight.data, _chunks(x, w_tok, None, 40), 128, grid=10)
    assert got.alpha == ref.alpha and got.alpha > 0
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)
    assert got.loss_at_zero == pytest.approx(ref.loss_at_zero, rel=1e-4)
    assert torch.allclose(got.scales, ref.scales)


def test_fold_into_the_final_norm_is_exact_before_quantisation(tiny_dir):
    """Dividing the norm's weight by s and multiplying lm_head's inputs by s leaves the float logits as they were."""
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.head import load_head

    norm, head, norm_dtype = load_head(load_config(tiny_dir), Checkpoint(tiny_dir), torch.device("cpu"), torch.float32)
    assert norm_dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, head.in_features, generator=gen) * 3
    before = head(norm(x))
    s = candidate_scales(torch.rand(head.in_features, generator=gen) + 0.05, torch.rand(head.in_features) + 0.05, 0.5)
    assert s.max() / s.min() > 4
    fold_scales(norm, [head], s)
    assert torch.allclose(head(norm(x)), before, rtol=1e-5, atol=1e-5)


def test_row_block_packing_gives_the_whole_weights_bytes():
    from r1v_quant.quant.awq import ROW_BLOCK
    from r1v_quant.quant.head import pack_head
    from r1v_quant.quant.primitives import awq_tensors

    w = torch.randn(ROW_BLOCK + 24, 256, generator=torch.Generator().manual_seed(2))
    whole, blocked = awq_tensors(w, 128), pack_head(w, 128)
    for leaf in ("qweight", "qzeros", "scales"):
        assert torch.equal(blocked[f"{HEAD}.{leaf}"], whole[leaf]), leaf


# ---------------------------------------------------------------------------------------------
# The export


def test_export_names_shapes_dtypes_and_config(tiny_dir, head_export):
    cfg = json.loads((head_export / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["lm_head"] is True and qc["group_size"] == 128 and qc["modules_to_not_convert"] == ["vision_model", "mlp1"]
    vocab, hidden = cfg["llm_config"]["vocab_size"], cfg["llm_config"]["hidden_size"]
    out, src = Checkpoint(head_export), Checkpoint(tiny_dir)
    assert f"{HEAD}.weight" not in out.shard_of
    assert (tuple(out.shape_of(f"{HEAD}.qweight")), out.get(f"{HEAD}.qweight").dtype) == ((hidden, vocab // 8), torch.int32)
    assert (tuple(out.shape_of(f"{HEAD}.qzeros")), out.get(f"{HEAD}.qzeros").dtype) == ((hidden // 128, vocab // 8), torch.int32)
    assert (tuple(out.shape_of(f"{HEAD}.scales")), out.get(f"{HEAD}.scales").dtype) == ((hidden // 128, vocab), torch.float16)
    assert out.get(NORM).dtype == src.get(NORM).dtype and not torch.equal(out.get(NORM), src.get(NORM))
    for name in src.names():
        if name.startswith(("vision_model.", "mlp1.", "language_model.model.embed_tokens.")):
            assert torch.equal(src.get(name).view(torch.uint8), out.get(name).view(torch.uint8)), name
    card = (head_export / "README.md").read_text()
    assert "linears and `lm_head` are 4-bit AWQ" in card and "carries `lm_head`'s AWQ scales" in card
    report = json.loads((head_export / "r1v_quant_report.json").read_text())
    assert report["awq"]["lm_head"] is True and len(report["layers"]) == 4
    assert 0 < report["lm_head"]["rel_err_awq"] < report["lm_head"]["rel_err_rtn"]


def test_exported_norm_and_head_carry_the_same_scales(tiny_dir, head_export):
    """The norm is the source's divided by s, and lm_head quantises the source's weight times s: per
    input channel, the dequantised head's least-squares slope against the source weight is s_j
    (quantisation noise averages out over the vocabulary), not 1."""
    out, src = Checkpoint(head_export), Checkpoint(tiny_dir)
    s = src.get(NORM).float() / out.get(NORM).float()
    w = src.get(f"{HEAD}.weight").float()
    dq = independent_dequant(out.get(f"{HEAD}.qweight"), out.get(f"{HEAD}.qzeros"), out.get(f"{HEAD}.scales"), 128)
    slope = (dq * w).sum(0) / (w * w).sum(0)
    assert (slope / s - 1).abs().max() < 0.04  # measured 0.025 (clipping shrinks a little)
    assert (slope - 1).abs().max() > 0.15       # measured 0.24: the scales are not all near 1


@pytest.mark.slow
def test_runtime_loads_the_4bit_head_and_generates(tiny_dir, head_export, capsys):
    from r1v_quant.evals.quick import heldout_prompts, prompt_kl
    from r1v_quant.int4.linear import AWQLinear
    from r1v_quant.model.r1v import load_model

    loaded = load_model(head_export, device="cpu", dtype="fp32")
    head = loaded.model.language_model.lm_head
    assert isinstance(head, AWQLinear)
    out = Checkpoint(head_export)
    ref = independent_dequant(out.get(f"{HEAD}.qweight"), out.get(f"{HEAD}.qzeros"), out.get(f"{HEAD}.scales"), 128)
    assert torch.equal(head.dequantized_weight(torch.float32), ref)
    src = load_model(tiny_dir, device="cpu")
    bf16 = load_model(head_export, device="cpu")
    with_images, _ = heldout_prompts(src, 3)
    assert 0 < prompt_kl(src.model, bf16.model, with_images) < 0.06
    code, text, err = run_cli(["chat", "--model", head_export, "--prompt", "How many bars?", "--greedy",
                               "--max-new-tokens", "6"], capsys)
    assert code == 0 and text.strip(), err


def test_inspect_accepts_it_and_rejects_broken_ones(head_export, tiny_export, tmp_path):
    from r1v_quant.deploy.inspect_export import inspect

    report = inspect(head_export)
    assert report.ok, [c for c in report.checks if c.status == "fail"]
    assert report.check("lm_head").status == "pass"
    # plan's byte counts for a 4-bit lm_head equal the export's tensor bytes, lm_head included.
    assert report.check("sizes match the plan").status == "pass", report.check("sizes match the plan").message
    (head,) = [c for c in report.components if c.name == "lm_head"]
    assert head.bytes == head.planned_bytes > 0

    undeclared = tmp_path / "undeclared"
    shutil.copytree(head_export, undeclared)
    cfg = json.loads((undeclared / "config.json").read_text())
    del cfg["quantization_config"]["lm_head"]
    (undeclared / "config.json").write_text(json.dumps(cfg))
    report = inspect(undeclared)
    assert "lm_head was quantised without" in report.check("vision encoder and projector unquantised").message
    assert report.check("lm_head").status == "fail" and "bf16 lm_head" in report.check("lm_head").message

    unquantised = tmp_path / "declared-only"
    shutil.copytree(tiny_export, unquantised)
    cfg = json.loads((unquantised / "config.json").read_text())
    cfg["quantization_config"]["lm_head"] = True
    (unquantised / "config.json").write_text(json.dumps(cfg))
    report = inspect(unquantised)
    assert not report.ok and "has no qweight/qzeros/scales (it has a bf16 weight)" in report.check("lm_head").message

    tied = tmp_path / "tied"
    shutil.copytree(head_export, tied)
    cfg = json.loads((tied / "config.json").read_text())
    cfg["llm_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    assert "tie_word_embeddings is true" in inspect(tied).check("lm_head").message


def test_tied_embeddings_are_refused_in_one_sentence(tiny_dir, head_export, tmp_path, capsys):
    from r1v_quant.errors import UserError
    from r1v_quant.model.r1v import load_model

    src = tmp_path / "tied-src"
    shutil.copytree(tiny_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["llm_config"]["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["awq", "--model", src, "--out", tmp_path / "x", "--quantize-lm-head", "--no-kl-check"], capsys)
    assert code == 2 and "ties it to embed_tokens" in err and err.count(". ") == 0
    assert not (tmp_path / "x").exists()

    export = tmp_path / "tied-export"
    shutil.copytree(head_export, export)
    cfg = json.loads((export / "config.json").read_text())
    cfg["llm_config"]["tie_word_embeddings"] = True
    (export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="a 4-bit lm_head cannot be"):
        load_model(export, device="cpu")


def test_a_vocabulary_vllm_cannot_place_is_refused():
    """R1V3's 151674 tokens are no multiple of 64 (vLLM pads lm_head to one) nor of 8 (4-bit packing)."""
    from r1v_quant.errors import UserError
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.head import check_head

    check_head(resolve_config("r1v-38b")[0], 128)
    with pytest.raises(UserError, match="multiple of 64.*vocab_size is 151674"):
        check_head(resolve_config("r1v3-38b")[0], 128)


def test_flag_off_leaves_the_recipe_record_as_before():
    plain = AWQSettings(grid=5)
    assert "lm_head" not in plain.to_json() and "lm_head" not in plain.display()
    assert SETTINGS.to_json()["lm_head"] is True


# ---------------------------------------------------------------------------------------------
# Memory


def test_memory_model_counts_the_lm_head_phase_at_38b():
    """At 38B lm_head (152064 x 5120) outweighs a decoder layer: it sets the smallest budget and can set the peak."""
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.chunks import headroom_budget
    from r1v_quant.quant.head import head_plan
    from r1v_quant.quant.memory_model import GiB, predict

    cfg, _ = resolve_config("r1v-38b")
    budget = headroom_budget(24 * GiB)
    plain = predict(cfg, 65536, budget, act_bytes=2)
    with_head = predict(cfg, 65536, budget, act_bytes=2, lm_head=True)
    head_weights = 152064 * 5120 * 2
    # Hand-computed floor: the weight twice and 16 tokens of bf16 + float32 logits and 8 hidden-width values.
    assert with_head.min_budget == 2 * head_weights + 16 * (152064 * 6 + 8 * 5120 * 2) == 3_130_179_584
    assert with_head.min_budget_phase == "lm_head" and with_head.min_budget > plain.min_budget
    assert with_head.device_parts["lm_head weights"] == 2 * head_weights
    plan = head_plan(cfg, 65536, budget, 2)
    assert with_head.device_parts["lm_head chunk"] == plan.chunk_tokens * (152064 * 6 + 8 * 5120 * 2)
    assert with_head.device_peak == max(plain.device_peak, sum(v for k, v in with_head.device_parts.items()
                                                               if k.startswith("lm_head")))
    # A 2.5 GiB budget holds a decoder layer's pass but not lm_head's.
    small = int(2.5 * GiB)
    assert predict(cfg, 4096, small, act_bytes=2).min_budget <= small < predict(cfg, 4096, small, act_bytes=2,
                                                                               lm_head=True).min_budget


@pytest.mark.slow
def test_resume_after_the_last_layer_gives_a_byte_identical_export(tiny_dir, head_export, tmp_path):
    """Interrupted after the last layer, the resumed run does lm_head from the saved activations."""
    from r1v_quant.quant.run import quantize_checkpoint

    resumed, work = tmp_path / "resumed", tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(str(tiny_dir), resumed, SETTINGS, CALIB, device="cpu", compute_dtype="float32",
                            work_dir=work, stop_after=3)
    assert json.loads((work / "state.json").read_text())["done"] == 3 and not (work / "lm_head.safetensors").exists()
    quantize_checkpoint(str(tiny_dir), resumed, SETTINGS, CALIB, device="cpu", compute_dtype="float32",
                        work_dir=work, resume=True)
    for f in sorted(p.name for p in head_export.iterdir()):
        assert (head_export / f).read_bytes() == (resumed / f).read_bytes(), f
