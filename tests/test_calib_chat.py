"""Chat-style calibration data: messages lists and prompt/response columns from jsonl, parquet and hf:,
encoded as the chat template renders the conversation, the reply after the generation prompt."""

import json
from pathlib import Path

import pytest

from r1v_quant.calib import text as text_mod
from r1v_quant.calib.encode import encode_sample
from r1v_quant.calib.sets import load_calibration
from r1v_quant.calib.traces import add_self_traces
from r1v_quant.errors import UserError
from r1v_quant.model import r1v
from r1v_quant.model.config import load_config
from r1v_quant.model.prompt import reply_after_prompt

MINI = Path(__file__).resolve().parents[1] / "models" / "r1v-mini"
TRACE = "<think>\nFirst add 2 and 3.\nThat is 5.\n</think>\n\nThe answer is \\boxed{5}."


@pytest.fixture(scope="module")
def tok():
    return r1v.load_tokenizer(MINI)


@pytest.fixture(scope="module")
def cfg():
    return load_config(MINI)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def convo(k: int):
    return {"messages": [{"role": "system", "content": "You reason step by step."},
                         {"role": "user", "content": f"What is 2 + {k}?"},
                         {"role": "assistant", "content": TRACE.replace("3", str(k))}]}


# ---------------------------------------------------------------- the reply after the prompt


@pytest.mark.parametrize("prompt, reply, expected", [
    ("<｜Assistant｜><think>\n", "<think>\nstep\n</think>\n\nA", "step\n</think>\n\nA"),      # opened twice otherwise
    ("<｜Assistant｜><think>\n", "  <think>step</think>A", "step</think>A"),
    ("<｜Assistant｜><think>\n", "step\n</think>\n\nA", "step\n</think>\n\nA"),               # already inside the block
    ("<｜Assistant｜><think>", "<think>\nstep</think>A", "\nstep</think>A"),                 # the prompt has no newline
    ("<｜Assistant｜>", "<think>\nstep</think>A", "<think>\nstep</think>A"),                # a template that opens nothing
])
def test_a_reply_follows_the_generation_prompt_as_the_model_writes_it(prompt, reply, expected):
    assert reply_after_prompt(prompt, reply) == expected


# ---------------------------------------------------------------- encoding


def test_a_messages_row_is_the_templates_rendering_then_the_trace_inside_the_opened_block(tmp_path, tok, cfg):
    path = write_jsonl(tmp_path / "traces.jsonl", [convo(3)])
    (sample,) = load_calibration(f"chat:{path}", n=4)
    assert sample.kind == "chat" and sample.prompt == "What is 2 + 3?" and sample.response == TRACE
    assert [m["role"] for m in sample.messages] == ["system", "user"]
    enc = encode_sample(sample, cfg, tok, seq_len=4096)
    prompt = tok.apply_chat_template(convo(3)["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    expected = tok(prompt + TRACE[len("<think>\n"):], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert enc.ids == expected and enc.pixel_values is None
    text = tok.decode(enc.ids)
    assert text.count("<think>") == 1 and text.count(tok.bos_token) == 1
    assert text.startswith(tok.bos_token + "You reason step by step.<｜User｜>What is 2 + 3?<｜Assistant｜><think>\nFirst add")
    assert text.endswith("\\boxed{5}." + tok.eos_token)


def test_prompt_and_response_columns_with_a_system_column_encode_like_the_same_messages(tmp_path, tok, cfg):
    row = {"system": "You reason step by step.", "prompt": "What is 2 + 3?", "response": TRACE, "extra": 1}
    flat = load_calibration(str(write_jsonl(tmp_path / "flat.jsonl", [row])), n=1)[0]
    msgs = load_calibration(str(write_jsonl(tmp_path / "msgs.jsonl", [convo(3)])), n=1)[0]
    assert encode_sample(flat, cfg, tok, 4096).ids == encode_sample(msgs, cfg, tok, 4096).ids


def test_earlier_turns_are_history_as_the_template_renders_them(tmp_path, tok, cfg):
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello."},
             {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": TRACE}]
    (sample,) = load_calibration(f"chat:{write_jsonl(tmp_path / 'multi.jsonl', [{'messages': turns}])}", n=1)
    text = tok.decode(encode_sample(sample, cfg, tok, 4096).ids)
    # the template keeps only the answer of an earlier reply; the last reply keeps its reasoning
    assert "greet" not in text and "<｜Assistant｜>\n\nHello.<｜end▁of▁sentence｜><｜User｜>What is 2 + 3?" in text
    assert "First add 2 and 3." in text


def test_parquet_messages_and_a_seeded_choice(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "traces.parquet"
    pq.write_table(pa.Table.from_pylist([convo(k) for k in range(10)]), path)
    picked = load_calibration(str(path), n=4, seed=1)
    assert len(picked) == 4 and all(s.kind == "chat" for s in picked)
    assert picked == load_calibration(f"chat:{path}", n=4, seed=1)
    assert [s.id for s in picked] != [s.id for s in load_calibration(str(path), n=4, seed=2)]
    rows = sorted(int(s.id.rsplit(":", 1)[1]) for s in picked)
    for s in picked:   # each sample is its own row's conversation
        k = int(s.id.rsplit(":", 1)[1]) - 1
        assert s.prompt == f"What is 2 + {k}?"
    assert rows == sorted(rows) and len(set(rows)) == 4


def test_a_hub_set_with_a_messages_column_is_chat_data(monkeypatch):
    import datasets

    data = datasets.Dataset.from_list([convo(k) for k in range(3)])
    monkeypatch.setattr(text_mod.hub, "load_hub_dataset", lambda *a, **k: data)
    samples = load_calibration("hf:someone/r1-traces", n=8)
    assert [s.kind for s in samples] == ["chat"] * 3
    assert samples[2].prompt == "What is 2 + 2?" and samples[2].id == "chat:hf:someone/r1-traces:3"
    plain = datasets.Dataset.from_list([{"text": "A paragraph."}])
    monkeypatch.setattr(text_mod.hub, "load_hub_dataset", lambda *a, **k: plain)
    assert [s.kind for s in load_calibration("hf:someone/plain", n=8)] == ["text"]


def test_a_hub_set_with_a_malformed_row_names_it(monkeypatch):
    import datasets

    data = datasets.Dataset.from_list([{"prompt": "q", "response": "a"}, {"prompt": "q", "response": None}])
    monkeypatch.setattr(text_mod.hub, "load_hub_dataset", lambda *a, **k: data)
    with pytest.raises(UserError, match=r"^hf:someone/bad row 2 has neither"):
        load_calibration("hf:someone/bad", n=8)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad, why", [
    ({"messages": "hello"}, "has a 'messages' entry that is not a non-empty list"),
    ({"messages": []}, "has a 'messages' entry that is not a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "has message 1 that is not"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}, "has message 1 that is not"),
    ({"messages": [{"role": "user", "content": "q"}]}, "does not end with a non-empty assistant message"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "has no user message"),
    ({"prompt": "q"}, "has neither a 'messages' list nor"),
    ([1, 2], "is not an object"),
])
def test_a_malformed_row_is_one_sentence_naming_the_file_and_line(tmp_path, bad, why):
    path = write_jsonl(tmp_path / "bad.jsonl", [convo(1), "", bad])
    with pytest.raises(UserError) as caught:
        load_calibration(f"chat:{path}", n=1)
    message = str(caught.value)
    assert message.startswith(f"{path} line 3 {why}")
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message


def test_not_json_and_not_chat_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_calibration(f"chat:{write_jsonl(tmp_path / 'bad.jsonl', [convo(1), '{oops'])}", n=1)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "a paragraph"}])
    with pytest.raises(UserError, match="is not chat data .* pass text:PATH"):
        load_calibration(str(plain), n=1)
    assert load_calibration(f"text:{plain}", n=1)[0].kind == "text"
    with pytest.raises(UserError, match="neither a .jsonl nor a .parquet"):
        load_calibration(f"chat:{write_jsonl(tmp_path / 'x.txt', ['hi'])}", n=1)


def test_chat_samples_keep_their_replies_when_self_traces_are_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    samples = load_calibration(f"chat:{write_jsonl(tmp_path / 't.jsonl', [convo(1), convo(2)])}", n=2)
    assert add_self_traces(samples, MINI, 8, cache_dir=tmp_path / "cache") == samples
    assert not (tmp_path / "cache").exists()
