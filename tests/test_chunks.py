"""Chunked layer passes: the plan's arithmetic, bounded per-chunk tensors, and chunked == unchunked in KL."""

import pytest
import torch

from r1v_quant.quant.chunks import ChunkPlan, TokenStore, plan_chunks, sample_bounds, token_bounds
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe

MiB = 2**20


def test_plan_grows_chunks_with_the_budget_and_spills_what_does_not_fit():
    # 38B widths, 65,536 tokens, bf16: the weights of one layer are about 1.9 GB.
    args = dict(tokens=65536, hidden=5120, intermediate=27648, layer_weight_bytes=1_900_000_000, act_bytes=2)
    small, large = plan_chunks(budget_bytes=8 * 1024**3, **args), plan_chunks(budget_bytes=80 * 1024**3, **args)
    assert 16 <= small.chunk_tokens < large.chunk_tokens <= 65536
    per_token = (4 * 27648 + 8 * 5120) * 2
    assert small.chunk_tokens * per_token <= (8 * 1024**3 - 2 * 1_900_000_000) // 4
    # 6 x 65,536 x 5120 x 2 bytes = 3.75 GiB of stored tensors: off an 8 GiB budget, on an 80 GiB one.
    assert not small.stored_on_device and large.stored_on_device
    # down_proj's inputs alone would be 3.4 GiB more: kept on 80 GiB, rebuilt per chunk on 12 GiB.
    assert large.keep_down_inputs and not plan_chunks(budget_bytes=12 * 1024**3, **args).keep_down_inputs
    # A budget below the weights still gives the smallest chunk, never zero.
    assert plan_chunks(budget_bytes=0, **args) == ChunkPlan(16, False, False)
    # Few tokens: one chunk of all of them.
    assert plan_chunks(768, 256, 768, 3 * MiB, 10**12).chunk_tokens == 768


def test_bounds_cover_every_token_once():
    assert token_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert sample_bounds([3, 3, 5, 2], 6) == [(0, 6), (6, 11), (11, 13)]
    assert sample_bounds([9, 2], 4) == [(0, 9), (9, 11)]  # a sample longer than a chunk stands alone


def test_token_store_divides_in_chunks_like_a_whole_division():
    x = torch.randn(37, 8)
    store = TokenStore(37, 8, torch.float32, torch.device("cpu"), on_device=False)
    store.append(x[:20])
    store.append(x[20:])
    s = torch.rand(8) + 0.5
    store.divide_(s, chunk=5)
    assert torch.equal(store.chunk(0, 37), x / s)
    assert torch.equal(store.rows(torch.tensor([0, 36])), (x / s)[[0, 36]])


def test_a_chunked_layer_never_holds_all_tokens_at_intermediate_width(tiny_dir, monkeypatch):
    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.config import load_config
    from r1v_quant.quant import chunks, pipeline
    from r1v_quant.quant.activations import ActivationStore

    cfg = load_config(tiny_dir)
    dev = torch.device("cpu")
    layer = pipeline.load_decoder_layer(cfg, Checkpoint(tiny_dir), 0, dev, torch.float32)
    hidden, inter = cfg.hidden_size, layer.mlp.down_proj.in_features
    store = ActivationStore()
    torch.manual_seed(0)
    for n in (100, 180, 40):
        store.append(torch.randn(1, n, hidden))
    widths = []
    real_init = chunks.TokenStore.__init__
    monkeypatch.setattr(chunks.TokenStore, "__init__",
                        lambda self, t, w, *a, **k: (widths.append(w), real_init(self, t, w, *a, **k))[1])
    rows = []
    layer.mlp.down_proj.register_forward_hook(lambda _m, args, _o: rows.append(args[0].reshape(-1, inter).shape[0]))
    plan = ChunkPlan(chunk_tokens=64, stored_on_device=False, keep_down_inputs=False)
    tensors, nxt, report = pipeline.quantize_layer(pipeline.LayerRunner(cfg, dev), layer, store, AWQSettings(grid=3),
                                                   torch.float32, plan=plan)
    assert inter not in widths and widths  # down's inputs are rebuilt per chunk, never stored
    assert max(rows) <= 64
    assert [t.shape[1] for t in nxt] == [100, 180, 40]
    assert 0 < report.rel_err_awq < report.rel_err_rtn
    assert "mlp.down_proj.qweight" in tensors


@pytest.mark.slow
def test_chunked_and_unchunked_exports_agree_within_one_percent_kl(tiny_dir, tmp_path):
    """Chunk sums reduce in another order, so the bytes differ; held-out KL may move by under 1%."""
    from r1v_quant.evals.quick import heldout_prompts, prompt_kl
    from r1v_quant.model.r1v import load_model
    from r1v_quant.quant.run import quantize_checkpoint

    settings, recipe = AWQSettings(grid=5), CalibrationRecipe("builtin", samples=2, seq_len=384, max_tokens=768)
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    quantize_checkpoint(str(tiny_dir), whole, settings, recipe, device="cpu")
    # 12 MiB leaves the tiny layer 64-token chunks, every stored tensor off the device and down's inputs rebuilt.
    assert plan_chunks(768, 256, 768, 3_500_000, 12 * MiB).chunk_tokens < 768
    quantize_checkpoint(str(tiny_dir), chunked, settings, recipe, device="cpu", max_device_memory=12 * MiB)
    src = load_model(tiny_dir, device="cpu")
    with_images, text_only = heldout_prompts(src, 4)
    for prompts in (with_images, text_only):
        a = prompt_kl(src.model, load_model(whole, device="cpu").model, prompts)
        b = prompt_kl(src.model, load_model(chunked, device="cpu").model, prompts)
        assert abs(a - b) < 0.01 * a, (a, b)


def test_compute_dtype_defaults_to_float32_and_rejects_unknown_names():
    from r1v_quant.errors import UserError
    from r1v_quant.quant.compute import choose_compute_dtype

    for device in ("cpu", "cuda"):
        dtype, why = choose_compute_dtype("auto", torch.device(device))
        assert dtype == torch.float32 and "r1v-mini" in why
    assert choose_compute_dtype("bf16", torch.device("cpu"))[0] == torch.bfloat16
    with pytest.raises(UserError, match="--compute-dtype fp16 is not one of"):
        choose_compute_dtype("fp16", torch.device("cpu"))
