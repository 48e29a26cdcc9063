"""`eval --engine vllm` without vLLM: the coarse KL from top-k log-probabilities, reading vLLM's
outputs, the engine arguments, the dry run on the 38B config, the RTN export and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli

from helpers import mini
from r1v_quant.evals.forcing import coarse_kl, coarse_kl_topk, summarize, summary_from_topk
from r1v_quant.evals.settings import EvalSettings
from r1v_quant.evals.vllm_pass import measured_steps, position_arrays, reply_of, sampling_kwargs
from r1v_quant.units import GiB

VOCAB, K = 300, 16


def _pair(noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(40, VOCAB, generator=gen) * 3
    cand = ref + noise * torch.randn(40, VOCAB, generator=gen)
    return torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)


def _topk_summary(logp: torch.Tensor, k: int):
    """The reference as vLLM reports it: only its top k and the next token's log-prob."""
    targets = torch.arange(logp.shape[0]) % VOCAB
    values, ids = logp.topk(k, dim=-1)
    return summary_from_topk(values, ids, -logp.gather(1, targets[:, None]).squeeze(1)), targets


def test_topk_kl_equals_the_full_distribution_kl_when_the_candidates_top_2k_covers_the_references_top_k():
    ref_logp, cand_logp = _pair(noise=0.3)
    targets = torch.arange(40) % VOCAB
    full = coarse_kl(summarize(ref_logp, targets, K), cand_logp)         # the torch engine: candidate's full distribution
    ref, _ = _topk_summary(ref_logp, K)
    cand_lp, cand_ids = cand_logp.topk(2 * K, dim=-1)
    covered = (ref.ids[:, :, None] == cand_ids[:, None, :]).any(-1).all()
    assert covered
    got = coarse_kl_topk(ref, cand_ids, cand_lp)
    assert full.min() > 1e-4                                            # a real difference, not zeros
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6)
    # the tail the top k leave equals the one computed from the whole distribution
    torch.testing.assert_close(ref.tail, summarize(ref_logp, targets, K).tail, rtol=1e-4, atol=1e-5)


def test_topk_kl_of_a_model_with_itself_is_exactly_zero():
    ref_logp, _ = _pair(noise=0.0)
    ref, _ = _topk_summary(ref_logp, K)
    values, ids = ref_logp.topk(2 * K, dim=-1)
    assert torch.equal(coarse_kl_topk(ref, ids, values), torch.zeros(40))


def test_reference_tokens_the_candidate_did_not_rank_merge_into_the_rest_and_never_raise_the_kl():
    ref_logp, cand_logp = _pair(noise=3.0, seed=1)
    targets = torch.arange(40) % VOCAB
    full = coarse_kl(summarize(ref_logp, targets, K), cand_logp)
    ref, _ = _topk_summary(ref_logp, K)
    cand_lp, cand_ids = cand_logp.topk(K // 2, dim=-1)                  # far too few to cover the reference's k
    missing = ~(ref.ids[:, :, None] == cand_ids[:, None, :]).any(-1)
    assert missing.any(-1).all()
    got = coarse_kl_topk(ref, cand_ids, cand_lp)
    assert (got >= 0).all() and (got <= full + 1e-5).all()
    # by hand for one position: bins = reference tokens the candidate ranked, plus the rest
    p, q = ref_logp[0].double().exp(), cand_logp[0].double().exp()
    ranked = set(cand_ids[0].tolist())
    kept = [t for t in ref.ids[0].tolist() if t in ranked]
    assert 0 < len(kept) < K
    p_rest, q_rest = 1 - p[kept].sum(), 1 - q[kept].sum()
    by_hand = float((p[kept] * (p[kept] / q[kept]).log()).sum() + p_rest * math.log(p_rest / q_rest))
    assert got[0].item() == pytest.approx(by_hand, rel=1e-4)


def _lp(rank, logprob):
    return SimpleNamespace(rank=rank, logprob=logprob)


def test_position_arrays_keep_the_top_k_by_rank_and_the_next_tokens_log_prob():
    steps = [{7: _lp(1, -0.1), 3: _lp(2, -2.5), 9: _lp(14, -9.0)},   # the next token (9) ranked 14th
             {3: _lp(2, -1.2), 5: _lp(1, -0.4)}]
    ids, logp, nll = position_arrays(steps, [9, 5], k=2)
    assert ids.tolist() == [[7, 3], [5, 3]]
    torch.testing.assert_close(logp, torch.tensor([[-0.1, -2.5], [-0.4, -1.2]]))
    assert nll.tolist() == pytest.approx([9.0, 0.4])


def test_measured_positions_are_the_reply_or_every_token_after_the_first():
    logprobs = [None, "p1", "p2", "p3", "p4"]
    ids = [10, 11, 12, 13, 14]
    assert measured_steps(logprobs, ids, forced_len=2) == (["p3", "p4"], [13, 14])
    assert measured_steps(logprobs, ids, forced_len=None) == (["p1", "p2", "p3", "p4"], [11, 12, 13, 14])


class _Tok:
    eos_token_id = 2

    def decode(self, ids, **_):
        return " ".join(map(str, ids))


def test_a_vllm_reply_is_the_torch_engines_reply():
    stopped = reply_of(_Tok(), [5, 6, 2], stopped=True)
    assert (stopped.ids, stopped.text, stopped.finished) == ([5, 6, 2], "5 6", True)
    cut = reply_of(_Tok(), [5, 6, 7], stopped=False)
    assert (cut.ids, cut.finished) == ([5, 6, 7], False)


def test_sampling_stops_at_the_tokenizers_eos_only_and_seeds_each_question():
    greedy = sampling_kwargs(EvalSettings(max_new_tokens=64), eos=2, index=3)
    assert greedy["temperature"] == 0.0 and greedy["stop_token_ids"] == [2] and greedy["ignore_eos"]
    assert greedy["max_tokens"] == 64 and "seed" not in greedy
    sampled = [sampling_kwargs(EvalSettings(greedy=False, seed=1), eos=2, index=i) for i in (0, 1)]
    assert sampled[0]["temperature"] == 0.6 and sampled[0]["top_p"] == 0.95
    assert sampled[0]["seed"] != sampled[1]["seed"]


def test_chat_and_eval_share_the_engine_builder():
    from r1v_quant.deploy.vllm_engine import Parallel, engine_kwargs

    chat = engine_kwargs("m", 1, max_model_len=4096).kwargs
    assert "tensor_parallel_size" not in chat and chat["trust_remote_code"] and chat["dtype"] == "bfloat16"
    ev = engine_kwargs("m", 1, max_model_len=4096, parallel=Parallel(2, 3, "ray"), max_logprobs=128).kwargs
    assert {k: v for k, v in ev.items() if k not in chat} == {
        "tensor_parallel_size": 2, "pipeline_parallel_size": 3, "distributed_executor_backend": "ray",
        "max_logprobs": 128}
    # a multi-GPU engine is not given the single-GPU plan's context length
    note = engine_kwargs("m", 1, gpu_bytes=80 * GiB, parallel=Parallel(2)).note
    assert "several" in note


def test_the_vllm_engine_has_its_own_reference_cache_and_the_torch_key_is_unchanged():
    torch_gen = EvalSettings().generation()
    assert "engine" not in torch_gen
    assert EvalSettings(engine="vllm").generation() == {**torch_gen, "engine": "vllm"}


@pytest.fixture
def export_config_folder(tmp_path):
    """The 38B model's AWQ export as its config alone (no weights)."""
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.export import export_config

    cfg, _ = resolve_config("r1v-38b")
    folder = tmp_path / "r1v-38b-awq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(export_config(cfg, 128)))
    return folder


def test_dry_run_on_the_38b_config_prints_engine_arguments_and_memory_per_gpu(export_config_folder, capsys,
                                                                             monkeypatch):
    from r1v_quant.deploy.plan import plan_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(["eval", "--engine", "vllm", "--tensor-parallel-size", "2", "--reference",
                              "Skywork/Skywork-R1V-38B", "--candidate", export_config_folder, "--baseline", "rtn",
                              "--distributed-executor-backend", "ray", "--dry-run"], capsys)
    assert code == 0, out + err
    out = " ".join(out.split())
    assert "3 engines, one at a time, each on 2 GPUs" in out
    assert out.count("tensor_parallel_size=2") == 3 and out.count("distributed_executor_backend='ray'") == 3
    assert "model='Skywork/Skywork-R1V-38B'" in out and "max_logprobs=64" in out and "max_logprobs=128" in out
    plan = plan_model("r1v-38b")
    half_bf16 = f"weights {math.ceil(plan.source_total / 2) / GiB:.1f} GiB (of {plan.source_total / GiB:.1f} GiB)"
    half_awq = f"weights {math.ceil(plan.export_total / 2) / GiB:.1f} GiB (of {plan.export_total / GiB:.1f} GiB, AWQ"
    assert half_bf16 in out and out.count(half_awq) == 2, out
    assert "35.8 GiB (of 71.5 GiB)" in out   # the bf16 reference's 71.5 GiB, half on each GPU
    assert "Nothing was loaded" in out


@pytest.mark.parametrize("args, message", [
    (["--engine", "vllm"], "pip install"),
    (["--engine", "jax"], "--engine jax is not one of torch, vllm"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size needs --engine vllm"),
    (["--engine", "vllm", "--baseline", "nf4"], "--baseline nf4 runs with --engine torch only"),
    (["--dry-run"], "--dry-run plans vLLM engines"),
])
def test_engine_selection_errors_are_one_sentence_and_exit_2(args, message, capsys, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM not installed, whatever this machine has
    code, out, err = run_cli(["eval", "--reference", mini.mini_path(), "--candidate", mini.mini_path(),
                              "--suite", "r1v-mini", "--limit", "2", "--cache-dir", tmp_path / "cache", *args], capsys)
    assert code == 2, out + err
    text = " ".join(err.split())
    assert message in text and text.count("error:") == 1
    assert not (tmp_path / "cache").exists()   # refused before any work


def test_rtn_export_holds_the_codes_of_the_in_memory_rtn_baseline(tmp_path):
    from safetensors import safe_open

    from r1v_quant.model.config import load_config
    from r1v_quant.quant.baselines import build_rtn, write_rtn_export

    folder = write_rtn_export(Path(mini.mini_path()), 32, tmp_path / "rtn")
    cfg = load_config(folder)
    assert cfg.quantization["group_size"] == 32 and cfg.quantization["quant_method"] == "awq"
    assert (folder / "tokenizer.json").is_file()
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    loaded = build_rtn(Path(mini.mini_path()), 32, "cpu", "bf16")
    modules = dict(loaded.model.named_modules())
    name = "language_model.model.layers.0.mlp.down_proj"
    module = next(m for n, m in modules.items() if n.endswith("layers.0.mlp.down_proj"))
    for leaf in ("qweight", "qzeros", "scales"):
        assert torch.equal(tensors[f"{name}.{leaf}"], getattr(module, leaf)), leaf
    assert f"{name}.weight" not in tensors and "language_model.model.embed_tokens.weight" in tensors
