"""The small R1-convention tokenizer: ids, round trips, chat template, reproducibility."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from r1v_quant.model.prompt import expand_image_placeholders, render_chat
from r1v_quant.synthetic.tokenizer import ADDED_TOKENS, build_r1_tokenizer, chat_template

FILES = ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_r1_tokenizer(tmp_path_factory.mktemp("tok") / "r1")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_special_token_ids_are_fixed(tok):
    # the real layout's relative order, placed after the 2039 BPE ids
    expected = {
        EOS: 2039, "<｜User｜>": 2040, "<｜Assistant｜>": 2041, BOS: 2042,
        "<think>": 2043, "</think>": 2044, "<img>": 2045, "</img>": 2046, "<IMG_CONTEXT>": 2047,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(tok) == 2048
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2042, 2039, 2039)
    assert tok.model_max_length == 16384


def test_encode_adds_bos_and_round_trips(tok):
    text = "Question: the bar chart shows 3.14 for the circle; π ≈ 3.1416, résumé, 数学.\n\\boxed{B}"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    plain = tok(text, add_special_tokens=False).input_ids
    assert plain == ids[1:]
    assert tok.decode(plain) == text
    # digits are split one by one, as in Qwen2
    assert [tok.decode([i]) for i in tok("2024", add_special_tokens=False).input_ids] == ["2", "0", "2", "4"]


def test_think_tags_survive_skipping_special_tokens(tok):
    ids = tok("<｜User｜>hi<think>\nx</think>y<img><IMG_CONTEXT></img>", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>\nx</think>y"


def test_image_context_tokens_are_one_id_each(tok):
    text = expand_image_placeholders("<image>\nWhat is shown?", [3], 256)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == 768
    assert ids[0] == tok.convert_tokens_to_ids("<img>") and ids[769] == tok.convert_tokens_to_ids("</img>")


def test_two_turn_chat_drops_earlier_thinking(tok):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert render_chat(tok, messages) == (
        f"{BOS}<｜User｜>What is 2+2?<｜Assistant｜>\n\nThe answer is 4.{EOS}"
        "<｜User｜>And 3+3?<｜Assistant｜><think>\n"
    )
    assert render_chat(tok, messages[:2], add_generation_prompt=False) == (
        f"{BOS}<｜User｜>What is 2+2?<｜Assistant｜>\n\nThe answer is 4.{EOS}"
    )


def test_system_prompt_follows_bos(tok):
    out = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜><think>\n"
    ids = tok(out, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1


def test_template_is_the_packaged_one(tok_dir, tok):
    assert tok.chat_template == chat_template()
    assert chat_template().endswith("{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert "content.split('</think>')[-1]" in chat_template()


def test_same_inputs_give_identical_files(tok_dir, tmp_path):
    # a separate process: BPE training must not depend on per-process hash seeds
    script = "import sys; from r1v_quant.synthetic.tokenizer import build_r1_tokenizer; build_r1_tokenizer(sys.argv[1])"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "again")], check=True)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_seed_and_size_change_the_vocabulary(tok_dir, tmp_path):
    other = build_r1_tokenizer(tmp_path / "seed1", seed=1)
    assert (other / "tokenizer.json").read_bytes() != (tok_dir / "tokenizer.json").read_bytes()
    small = AutoTokenizer.from_pretrained(str(build_r1_tokenizer(tmp_path / "small", vocab_size=512)))
    assert len(small) == 512 and small.convert_tokens_to_ids("<IMG_CONTEXT>") == 511


def test_too_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        build_r1_tokenizer(tmp_path / "tiny", vocab_size=256 + len(ADDED_TOKENS) - 1)
