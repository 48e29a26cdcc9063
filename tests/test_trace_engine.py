"""`awq --trace-engine vllm` without vLLM: one engine built as chat and eval build it, parallel flags passed
through, every missing prompt in one batch, the engine shut down, the replies cached apart from the
transformers engine's; and the memory pre-check running before anything is written or loaded."""

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from PIL import Image

from r1v_quant.calib import traces
from r1v_quant.calib.sample import Sample
from r1v_quant.calib.traces import add_self_traces, trace_record
from r1v_quant.deploy.vllm_engine import Parallel
from r1v_quant.errors import UserError
from r1v_quant.model import r1v

MINI = Path(__file__).resolve().parents[1] / "models" / "r1v-mini"


def samples():
    return [Sample(id="red", prompt="<image>\nWhat colour fills the picture?",
                   images=[Image.new("RGB", (32, 32), (200, 30, 30))], kind="open"),
            Sample(id="sum", prompt="What is 2 + 3?", kind="open"),
            Sample(id="t", prompt="plain text", kind="text")]


class FakeVllm:
    """vllm's LLM and SamplingParams, recording what they are given; replies are fixed token ids."""

    def __init__(self, tok):
        self.tok, self.built, self.calls, self.alive, self.shutdowns = tok, [], [], 0, 0
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                assert fake.alive == 0, "a second engine started while one was alive"
                fake.alive += 1
                fake.built.append(kwargs)
                self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=fake.shutdown))

            def generate(self, requests, params, use_tqdm=True):
                fake.calls.append((requests, params))
                out = []
                for k, _ in enumerate(requests):
                    ids = fake.tok("answer " * (k + 1), add_special_tokens=False).input_ids
                    stopped = k % 2 == 0
                    out.append(SimpleNamespace(outputs=[SimpleNamespace(
                        token_ids=ids + ([fake.tok.eos_token_id] if stopped else []),
                        finish_reason="stop" if stopped else "length")]))
                return out

        self.module = ModuleType("vllm")
        self.module.LLM = LLM
        self.module.SamplingParams = lambda **kw: SimpleNamespace(**kw)

    def shutdown(self):
        self.alive -= 1
        self.shutdowns += 1


@pytest.fixture
def fake(monkeypatch):
    tok = r1v.load_tokenizer(MINI)
    f = FakeVllm(tok)
    monkeypatch.setitem(sys.modules, "vllm", f.module)
    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("the transformers engine was loaded"))
    return f


def test_all_missing_prompts_go_to_one_engine_in_one_batch_and_are_cached(fake, tmp_path):
    given = samples()
    out = add_self_traces(given, MINI, 16, cache_dir=tmp_path, engine="vllm", parallel=Parallel(2, 3, "mp"))
    (kwargs,) = fake.built
    assert kwargs["model"] == str(MINI.resolve()) and kwargs["trust_remote_code"] is True
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"], kwargs["distributed_executor_backend"]) \
        == (2, 3, "mp")
    assert kwargs["limit_mm_per_prompt"] == {"image": 1}
    (requests, params), = fake.calls
    assert len(requests) == 2 and "multi_modal_data" in requests[0] and "multi_modal_data" not in requests[1]
    assert (params.temperature, params.max_tokens, params.stop_token_ids) == (0.0, 16, [fake.tok.eos_token_id])
    assert fake.alive == 0 and fake.shutdowns == 1
    # the reply is the text after the generation prompt, the end-of-sequence token left out
    assert out[0].response == "answer " and out[1].response == "answer answer "
    assert out[2] is given[2]
    expected = trace_record(fake.tok, "red", fake.tok("answer ", add_special_tokens=False).input_ids
                            + [fake.tok.eos_token_id], True)
    assert expected["finished"] and expected["response"] == out[0].response
    # a rerun reads the cache: no engine
    again = add_self_traces(given, MINI, 16, cache_dir=tmp_path, engine="vllm")
    assert [s.response for s in again] == [s.response for s in out] and len(fake.built) == 1


def test_the_two_engines_cache_apart(fake, tmp_path, monkeypatch):
    add_self_traces(samples(), MINI, 16, cache_dir=tmp_path, engine="vllm")
    made = []
    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: made.append(1) or SimpleNamespace())
    monkeypatch.setattr(traces, "generate_trace",
                        lambda loaded, s, n: {"id": s.id, "response": "from transformers", "tokens": 2, "finished": True})
    out = add_self_traces(samples(), MINI, 16, cache_dir=tmp_path)
    assert made == [1] and out[0].response == "from transformers"
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_the_pre_check_runs_before_anything_is_written_or_loaded(fake, tmp_path):
    def refuse():
        raise UserError("does not fit")

    for engine in ("vllm", "transformers"):
        with pytest.raises(UserError, match="does not fit"):
            add_self_traces(samples(), MINI, 16, cache_dir=tmp_path / "cache", engine=engine, before_load=refuse)
    assert not (tmp_path / "cache").exists() and not fake.built


def test_an_unknown_engine_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"^--trace-engine sglang is not one of transformers, vllm\.$"):
        add_self_traces(samples(), MINI, 16, cache_dir=tmp_path, engine="sglang")


def test_awq_passes_the_engine_and_parallel_flags_through(fake, tmp_path, monkeypatch):
    from r1v_quant.quant.recipe import CalibrationRecipe
    from r1v_quant.quant.run import load_samples

    recipe = CalibrationRecipe("builtin", samples=2, traces="self", trace_tokens=8, trace_engine="vllm")
    out = load_samples(recipe, MINI, "cpu", tmp_path, parallel=Parallel(4, 1))
    assert fake.built[0]["tensor_parallel_size"] == 4 and all(s.response for s in out if s.kind != "text")


def test_the_recipe_records_the_trace_writer_and_keeps_old_reports_unchanged():
    from r1v_quant.quant.recipe import CalibrationRecipe

    plain = CalibrationRecipe("builtin", traces="self")
    assert "trace_engine" not in plain.to_json() and "trace_model" not in plain.to_json()
    assert plain.display()["traces written by"] == "the full-precision source model, greedy, through transformers"
    boot = CalibrationRecipe("builtin", traces="bootstrap", trace_engine="vllm")
    assert boot.to_json()["trace_engine"] == "vllm" and CalibrationRecipe.from_json(boot.to_json()) == boot
    assert boot.trace_writer().startswith("a 4-bit bootstrap export (a first awq pass without traces)")
    assert "traces written by" not in CalibrationRecipe("builtin").display()
    with pytest.raises(UserError, match="--trace-model needs --traces self or bootstrap"):
        CalibrationRecipe("builtin", trace_model="x")
    with pytest.raises(UserError, match="--trace-engine tgi is not one of"):
        CalibrationRecipe("builtin", traces="self", trace_engine="tgi")


@pytest.mark.parametrize("gib, engine, lm_head", [(24, "vllm", True), (80, "vllm", False), (24, "transformers", False)])
def test_a_bootstrap_served_on_a_card_whose_recipe_needs_a_4bit_lm_head_gets_one(monkeypatch, gib, engine, lm_head):
    import torch

    from r1v_quant.deploy import serve
    from r1v_quant.model.checkpoint import resolve_config
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import bootstrap_settings

    monkeypatch.setattr(serve, "gpu_memory", lambda: (gib * 2**30, "GPU"))
    cfg = resolve_config("r1v-38b")[0]
    calib = CalibrationRecipe("builtin", traces="bootstrap", trace_engine=engine)
    got = bootstrap_settings(cfg, AWQSettings(), calib, torch.device("cuda"))
    assert got.lm_head is lm_head and got.group_size == 128
    assert bootstrap_settings(cfg, AWQSettings(), calib, torch.device("cpu")) == AWQSettings()
