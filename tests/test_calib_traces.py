import json

import pytest
from PIL import Image

from helpers.rewrite import flip_tail
from r1v_quant.calib import traces
from r1v_quant.calib.sample import Sample, sample_key
from r1v_quant.calib.traces import add_self_traces, default_cache_dir
from r1v_quant.errors import UserError
from r1v_quant.model import r1v

MAX = 10


def visual_samples():
    return [
        Sample(id="red", prompt="<image>\nWhat colour fills the picture?", images=[Image.new("RGB", (32, 32), (200, 30, 30))],
               answer="red", kind="open"),
        Sample(id="sum", prompt="Question: What is 2 + 3?\nOptions:\nA. 4\nB. 5\n", answer="B",
               kind="multiple-choice", options=["4", "5"]),
    ]


def all_samples():
    return [*visual_samples(), Sample(id="t:0", prompt="A paragraph of plain text about quantisation.", kind="text")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from r1v_quant.synthetic.checkpoint import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="module")
def traced(model, tmp_path_factory):
    """One real generation run, shared: (samples given, samples returned, cache folder)."""
    cache = tmp_path_factory.mktemp("traces")
    given = all_samples()
    return given, add_self_traces(given, model, MAX, cache_dir=cache), cache


@pytest.fixture
def loads(monkeypatch):
    """Counts load_model calls while still loading the model."""
    calls = []
    real = r1v.load_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(r1v, "load_model", counting)
    return calls


@pytest.fixture
def quick(monkeypatch):
    """A stand-in for generation, for tests of the cache alone: returns the ids of the samples traced."""
    made = []

    def fake(loaded, sample, n):
        made.append(sample.id)
        return {"id": sample.id, "response": f"reply to {sample.id} in {n}", "tokens": n, "finished": False}

    monkeypatch.setattr(traces, "generate_trace", fake)
    return made


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_visual_samples_get_responses_and_text_samples_are_untouched(traced):
    given, out, _ = traced
    assert [s.id for s in out] == [s.id for s in given]
    for before, after in zip(given[:2], out[:2]):
        assert isinstance(after.response, str) and after.response
        assert after is not before and before.response is None  # copies; the input is not changed
        assert (after.prompt, after.answer, after.images) == (before.prompt, before.answer, before.images)
    assert out[2] is given[2] and out[2].response is None


def test_replies_are_deterministic(traced, model, tmp_path):
    _, out, _ = traced
    again = add_self_traces(visual_samples(), model, MAX, cache_dir=tmp_path)  # empty cache: generated anew
    assert [s.response for s in again] == [s.response for s in out[:2]]


def cache_path(folder, model, max_tokens, samples):
    keys = [sample_key(s) for s in samples if s.kind != "text"]
    return traces.cache_file(folder, traces.model_identity(model), traces.trace_settings(max_tokens), keys)


def test_a_rerun_reads_the_cache_without_loading_the_model(traced, model, no_model):
    _, out, cache = traced
    record = json.loads(cache_path(cache, model, MAX, all_samples()).read_text())
    assert record["settings"]["max_trace_tokens"] == MAX and len(record["traces"]) == 2
    assert all(0 < t["tokens"] <= MAX for t in record["traces"].values())
    assert [s.response for s in add_self_traces(all_samples(), model, MAX, cache_dir=cache)] == [s.response for s in out]


def test_only_text_samples_need_no_model(model, tmp_path, no_model):
    text = all_samples()[2:]
    assert add_self_traces(text, model, MAX, cache_dir=tmp_path) == text
    assert not list(tmp_path.iterdir())


def test_the_cache_key_follows_settings_and_samples(model, tmp_path, loads, quick):
    first = cache_path(tmp_path, model, MAX, visual_samples())
    add_self_traces(visual_samples(), model, MAX, cache_dir=tmp_path)
    assert len(loads) == 1 and first.is_file()

    shorter = add_self_traces(visual_samples(), model, 8, cache_dir=tmp_path)
    second = cache_path(tmp_path, model, 8, visual_samples())
    assert len(loads) == 2 and second != first and second.is_file()
    assert [s.response for s in shorter] == ["reply to red in 8", "reply to sum in 8"]

    changed = visual_samples()
    changed[1].prompt += "Answer with a letter.\n"
    add_self_traces(changed, model, MAX, cache_dir=tmp_path)
    assert len(loads) == 3 and cache_path(tmp_path, model, MAX, changed) not in (first, second)
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_the_env_variable_moves_the_default_cache(traced, model, tmp_path, monkeypatch, no_model):
    _, out, cache = traced
    monkeypatch.setenv("R1V_QUANT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "traces"
    (tmp_path / "traces").mkdir()
    for f in cache.glob("*.json"):
        (tmp_path / "traces" / f.name).write_bytes(f.read_bytes())
    assert [s.response for s in add_self_traces(all_samples(), model, MAX)] == [s.response for s in out]


def test_a_damaged_cache_file_is_regenerated(model, tmp_path, loads, quick):
    path = cache_path(tmp_path, model, MAX, all_samples())
    path.write_text('{"format": 1, "traces": {')
    add_self_traces(all_samples(), model, MAX, cache_dir=tmp_path)
    assert len(loads) == 1 and quick == ["red", "sum"]
    assert len(json.loads(path.read_text())["traces"]) == 2


def test_an_unwritable_cache_fails_before_the_model_is_loaded(model, tmp_path, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="R1V_QUANT_CACHE") as error:
        add_self_traces(visual_samples(), model, MAX, cache_dir=blocker / "traces")
    assert str(error.value).count(". ") == 0


def test_an_interrupted_run_keeps_its_replies_and_resumes(model, tmp_path, loads, quick, monkeypatch):
    fake = traces.generate_trace

    def fail_second(loaded, sample, n):
        if quick:
            raise KeyboardInterrupt
        return fake(loaded, sample, n)

    monkeypatch.setattr(traces, "generate_trace", fail_second)
    with pytest.raises(KeyboardInterrupt):
        add_self_traces(visual_samples(), model, MAX, cache_dir=tmp_path)
    (file,) = tmp_path.glob("*.json")
    assert len(json.loads(file.read_text())["traces"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [file.name]  # no temporary file left behind

    monkeypatch.setattr(traces, "generate_trace", fake)
    progress = []
    out = add_self_traces(visual_samples(), model, MAX, cache_dir=tmp_path, progress=lambda d, t: progress.append((d, t)))
    assert quick == ["red", "sum"] and progress == [(1, 1)] and len(loads) == 2
    assert [s.response for s in out] == [f"reply to red in {MAX}", f"reply to sum in {MAX}"]


def test_the_response_is_the_text_after_the_generation_prompt(model, tmp_path, monkeypatch):
    """Whatever the template puts at the end of the prompt, the response continues it exactly."""
    from r1v_quant.model import generate

    seen = {}

    def fake_reply_to(loaded, conv, sampling):
        tok = loaded.tokenizer
        ids, _, _ = generate.encode_conversation(loaded.config, tok, conv)
        seen["prompt"] = tok.decode(ids[0].tolist(), skip_special_tokens=False)
        opens = seen["prompt"].endswith("<think>\n")
        seen["reply"] = ("" if opens else "<think>\n") + "Two plus three is five.\n</think>\n\nB"
        body = tok(seen["reply"], add_special_tokens=False).input_ids
        assert sampling.greedy and sampling.max_new_tokens == 16
        return generate.Reply(body + [tok.eos_token_id], "", "", "", True)

    monkeypatch.setattr(generate, "reply_to", fake_reply_to)
    (out,) = add_self_traces(visual_samples()[1:], model, 16, cache_dir=tmp_path)
    assert out.response == seen["reply"]  # no eos, nothing of the prompt repeated
    assert (seen["prompt"] + out.response).count("<think>") == 1


def test_encoding_a_traced_sample_appends_the_reply_and_eos(traced, model):
    from r1v_quant.calib.encode import encode_sample
    from r1v_quant.model.config import load_config

    _, out, _ = traced
    cfg, tok = load_config(model), r1v.load_tokenizer(model)
    for plain, with_reply in zip(visual_samples(), out[:2]):
        a = encode_sample(plain, cfg, tok, 8192)
        b = encode_sample(with_reply, cfg, tok, 8192)
        assert len(b.ids) > len(a.ids) and b.ids[: len(a.ids)] == a.ids
        assert b.ids[-1] == tok.eos_token_id
        reply = tok.decode(b.ids[len(a.ids): -1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert reply == with_reply.response


def test_a_source_rewritten_in_place_is_traced_again(model, tmp_path, loads, quick):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    cache = tmp_path / "cache"
    add_self_traces(visual_samples(), copy, MAX, cache_dir=cache)
    add_self_traces(visual_samples(), copy, MAX, cache_dir=cache)
    assert len(loads) == 1 and quick == ["red", "sum"]
    flip_tail(sorted(copy.glob("*.safetensors"))[-1])
    add_self_traces(visual_samples(), copy, MAX, cache_dir=cache)
    assert len(loads) == 2 and quick == ["red", "sum", "red", "sum"]  # another model: every reply again


def test_a_cached_reply_that_fails_its_digest_is_generated_again_and_said(model, tmp_path, loads, quick):
    add_self_traces(visual_samples(), model, MAX, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    key = sorted(record["traces"])[0]
    record["traces"][key]["response"] = "a reply nobody generated"  # the digest still the old one
    path.write_text(json.dumps(record))
    heard = []
    out = add_self_traces(visual_samples(), model, MAX, cache_dir=tmp_path, on_warning=heard.append)
    assert len(loads) == 2 and len(quick) == 3  # that one reply only
    assert len(heard) == 1 and "1 cached trace(s)" in heard[0] and "checksum" in heard[0]
    assert "a reply nobody generated" not in [s.response for s in out]
    again = json.loads(path.read_text())["traces"][key]
    assert again["response"] != "a reply nobody generated" and again["digest"]
