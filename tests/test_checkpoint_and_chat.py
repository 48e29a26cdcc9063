"""Loading checkpoints by their own names, chatting with them, and bad inputs as a user meets them."""

import json
import shutil

import pytest
import torch
from conftest import run_cli
from PIL import Image

from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.config import load_config
from r1v_quant.model.layout import checkpoint_shapes
from r1v_quant.synthetic.checkpoint import make_tiny


def test_tiny_checkpoint_has_the_real_layout(tiny_dir):
    cfg = load_config(tiny_dir)
    assert cfg.raw["architectures"] == ["SkyworkR1VChatModel"] and cfg.raw["model_type"] == "skywork_chat"
    llm = cfg.llm
    assert llm["num_key_value_heads"] < llm["num_attention_heads"]
    assert llm["hidden_size"] % 128 == 0 and llm["intermediate_size"] % 128 == 0 and cfg.vision.hidden_size % 128 == 0
    assert cfg.vision.qk_normalization and cfg.vision.norm_type == "rms_norm" and cfg.vision.num_hidden_layers >= 2
    assert cfg.num_layers >= 4
    ckpt = Checkpoint(tiny_dir)
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded like the real model
    assert {n: tuple(s) for n, s in checkpoint_shapes(cfg).items()} == {n: ckpt.shape_of(n) for n in ckpt.names()}
    assert ckpt.get("language_model.model.layers.0.self_attn.q_proj.bias").dtype == torch.bfloat16
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "configuration_skywork_chat.py"):
        assert (tiny_dir / name).is_file(), name


def test_make_tiny_is_deterministic(tmp_path):
    a = make_tiny(tmp_path / "a", seed=3)
    b = make_tiny(tmp_path / "b", seed=3)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_every_tensor_consumed_and_loaded(tiny_dir):
    from r1v_quant.model.r1v import load_model

    loaded = load_model(tiny_dir, device="cpu")
    state = loaded.model.state_dict()
    ckpt = Checkpoint(tiny_dir)
    assert set(state) == set(ckpt.names())
    assert not any(t.is_meta for t in state.values())
    name = "vision_model.encoder.layers.1.attn.qkv.weight"
    assert torch.equal(state[name], ckpt.get(name))
    assert loaded.dtype == torch.bfloat16


def test_chat_one_shot_streams_and_is_deterministic(tiny_dir, tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.new("RGB", (640, 360), (30, 120, 200)).save(img)
    args = ["chat", "--model", tiny_dir, "--image", img, "--prompt", "Describe it.", "--greedy", "--max-new-tokens", "16"]
    code, first, err = run_cli(args, capsys)
    assert code == 0, err
    assert first.strip()
    code, second, _ = run_cli(args, capsys)
    assert code == 0 and first == second


def test_greedy_ids_depend_on_the_image(tiny_dir, tmp_path):
    from r1v_quant.model.generate import greedy_ids

    paths = [tmp_path / "red.png", tmp_path / "noise.png"]
    Image.new("RGB", (448, 448), (250, 10, 10)).save(paths[0])
    Image.effect_noise((448, 448), 80).convert("RGB").save(paths[1])
    a = greedy_ids(tiny_dir, "What is shown?", 12, [paths[0]], device="cpu")
    b = greedy_ids(tiny_dir, "What is shown?", 12, [paths[0]], device="cpu")
    assert a == b and len(a) == 12
    from r1v_quant.model.generate import Conversation, encode_conversation
    from r1v_quant.model.r1v import load_model

    loaded = load_model(tiny_dir, device="cpu")
    logits = []
    for p in paths:
        conv = Conversation()
        conv.add_user("What is shown?", [Image.open(p)])
        ids, pixels, tiles = encode_conversation(loaded.config, loaded.tokenizer, conv)
        assert tiles == [1]
        ctx = loaded.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert int((ids == ctx).sum()) == loaded.config.num_image_token
        with torch.no_grad():
            logits.append(loaded.model(ids, pixels.to(torch.bfloat16)).logits[0, -1].float())
    assert not torch.allclose(logits[0], logits[1])


def test_interactive_chat_session(tiny_dir, tmp_path, monkeypatch, capsys):
    img = tmp_path / "x.png"
    Image.new("RGB", (448, 448), (0, 200, 0)).save(img)
    lines = iter(["hello", f"/image {img}", "what is it?", "/reset", "again", "/exit"])
    monkeypatch.setattr("rich.console.Console.input", lambda self, prompt="": next(lines))
    code, out, err = run_cli(["chat", "--model", tiny_dir, "--greedy", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert "attached" in out and "conversation cleared" in out
    assert out.count("r1v>") == 3


@pytest.mark.parametrize("case", ["missing", "architecture", "shard", "truncated", "image"])
def test_bad_inputs_get_one_sentence_and_nonzero_exit(case, tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    args = ["chat", "--model", bad, "--prompt", "hi", "--max-new-tokens", "2"]
    if case == "missing":
        expect = "does not exist"
    elif case == "architecture":
        shutil.copytree(tiny_dir, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["model_type"] = "llava"
        (bad / "config.json").write_text(json.dumps(cfg))
        expect = "model_type 'llava'"
    elif case == "shard":
        shutil.copytree(tiny_dir, bad)
        shard = sorted(bad.glob("model-*.safetensors"))[1]
        shard.unlink()
        expect = f"names shard {shard.name}"
    elif case == "truncated":
        shutil.copytree(tiny_dir, bad)
        shard = sorted(bad.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        expect = "not a readable safetensors file"
    else:
        not_image = tmp_path / "notes.png"
        not_image.write_text("this is text")
        args = ["chat", "--model", tiny_dir, "--image", not_image, "--prompt", "hi"]
        expect = "notes.png"
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert expect in " ".join(err.split())
    assert "Traceback" not in err and err.count("error:") == 1



def test_hub_id_resolves_from_the_local_cache_offline(tiny_dir, tmp_path, monkeypatch):
    from r1v_quant.model.checkpoint import resolve_model

    cache = tmp_path / "hub"
    repo = cache / "models--Skywork--Skywork-R1V-38B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    shutil.copytree(tiny_dir, repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    path = resolve_model("Skywork/Skywork-R1V-38B")
    assert (path / "config.json").is_file() and path.name.startswith("0123456789")


def test_hub_id_offline_and_not_cached_is_one_sentence(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(["chat", "--model", "Skywork/Skywork-R1V-38B", "--prompt", "hi"], capsys)
    assert code == 2
    assert "not in the local Hugging Face cache" in " ".join(err.split())
