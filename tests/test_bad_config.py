"""Absurd config values, shard paths that leave the checkpoint, linked side files, non-UTF-8 text,
and the ps_version default: each refused (or read) before any work, in one sentence."""

import ast
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from conftest import run_cli

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.config import load_config, parse_config

AWQ = ["awq", "--samples", "2", "--max-tokens", "512", "--grid", "4", "--no-kl-check"]


@pytest.fixture
def model(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _set(section, key, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


BAD = [
    ("llm_config", "num_hidden_layers", 1_000_000_000, "num_hidden_layers"),
    ("vision_config", "num_attention_heads", 0, "num_attention_heads"),
    ("", "downsample_ratio", 0, "downsample_ratio"),
    ("llm_config", "hidden_size", "wide", "hidden_size"),
    ("llm_config", "vocab_size", 0, "vocab_size"),
    ("llm_config", "num_key_value_heads", 3, "num_key_value_heads"),
    ("vision_config", "patch_size", 15, "patch_size"),
    ("llm_config", "intermediate_size", 1000, "intermediate_size"),  # plausible, but not what the weights hold
    ("llm_config", "num_hidden_layers", 2, "num_hidden_layers"),       # the checkpoint holds 4
]


@pytest.mark.parametrize("section,key,value,named", BAD, ids=[f"{k}={v}" for _, k, v, _ in BAD])
def test_awq_refuses_a_bad_config_naming_key_and_value(model, tmp_path, capsys, section, key, value, named):
    edit_config(model, _set(section, key, value))
    # CPU time, not wall time: a shared, loaded machine stretches the latter without any work being done.
    start = time.process_time()
    code, _, err = run_cli(AWQ + ["--model", model, "--out", tmp_path / "out"], capsys)
    err = " ".join(err.split())
    assert code == 2, err
    assert named in err and (repr(value) in err or str(value) in err), err
    assert "Traceback" not in err and err.count(". ") <= 1
    assert time.process_time() - start < 10
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.awq-work").exists()


@pytest.mark.parametrize("section,key,value,named", BAD[:5], ids=[f"{k}={v}" for _, k, v, _ in BAD[:5]])
def test_plan_and_chat_refuse_a_bad_config(model, capsys, section, key, value, named):
    edit_config(model, _set(section, key, value))
    for args in (["plan", "--model", model], ["chat", "--model", model, "--prompt", "hi", "--device", "cpu"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and named in err, (args[0], err)


def test_plausible_configs_still_parse():
    raw = json.loads((Path(__file__).parents[1] / "r1v_quant" / "data" / "r1v-38b.json").read_text())
    cfg = parse_config(raw)
    assert cfg.num_layers == 64 and cfg.num_image_token == 256


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("kind", ["relative", "absolute", "link"])
def test_shard_paths_must_stay_inside_the_checkpoint(model, tmp_path, kind):
    index = _index(model)
    shard = sorted(set(index["weight_map"].values()))[0]
    other = tmp_path / "other"
    other.mkdir()
    shutil.move(model / shard, other / "x.safetensors")
    if kind == "link":
        os.symlink(other / "x.safetensors", model / shard)
    else:
        name = "../other/x.safetensors" if kind == "relative" else str(other / "x.safetensors")
        index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="outside"):
        Checkpoint(model)


def test_hub_cache_snapshot_links_into_blobs_are_read(model, tmp_path):
    """Hugging Face cache snapshots hold links into the repository's blobs: those stay allowed."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(model.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(Path("../../blobs") / f"blob{i}", snap / f.name)
    assert Checkpoint(snap).names() == Checkpoint(model).names()


def test_side_file_linking_outside_is_refused_before_work(model, tmp_path, capsys):
    private = tmp_path / "secret.json"
    private.write_text('{"token": "s3cr3t"}')
    private.chmod(0o600)
    (model / "preprocessor_config.json").unlink()
    os.symlink(private, model / "preprocessor_config.json")
    code, _, err = run_cli(AWQ + ["--model", model, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "outside the checkpoint" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.awq-work").exists()


def test_side_files_never_gain_permissions(model, tmp_path):
    from r1v_quant.quant.export import copy_side_files

    (model / "tokenizer_config.json").chmod(0o600)
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_side_files(model, dst)
    assert "tokenizer_config.json" in copied
    assert stat.S_IMODE((dst / "tokenizer_config.json").stat().st_mode) == 0o600
    umask = os.umask(0)
    os.umask(umask)
    src_mode = stat.S_IMODE((model / "tokenizer.json").stat().st_mode)
    assert stat.S_IMODE((dst / "tokenizer.json").stat().st_mode) == src_mode & ~umask


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_calibration_text_is_one_sentence(model, tmp_path, capsys, suffix):
    bad = tmp_path / f"latin1{suffix}"
    body = "Caf\u00e9 au lait, tr\u00e8s bien.\n\nSecond paragraph." if suffix == ".txt" else '{"text": "caf\u00e9"}\n'
    bad.write_bytes(body.encode("latin-1"))
    code, _, err = run_cli(AWQ + ["--model", model, "--out", tmp_path / "out", "--calib", f"text:{bad}"], capsys)
    assert code == 2 and "not UTF-8" in err and "line 1" in err, err
    assert not (tmp_path / "out").exists()


def test_absent_ps_version_follows_the_vendor_configuration(model):
    """InternVL-chat's and Skywork's configuration classes default ps_version to v1."""
    edit_config(model, lambda cfg: cfg.pop("ps_version"))
    assert load_config(model).ps_version == "v1"
    edit_config(model, lambda cfg: cfg.update(model_type="internvl_chat"))
    assert load_config(model).ps_version == "v1"


def test_shipped_configuration_defaults_agree_with_the_loader(model):
    """The configuration file an export carries reads absent keys as r1v-quant's loader does."""
    source = (Path(__file__).parents[1] / "r1v_quant" / "data" / "configuration_skywork_chat.py").read_text()
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_TOP_DEFAULTS")
    shipped = ast.literal_eval(node.value)
    edit_config(model, lambda cfg: [cfg.pop(k, None) for k in ("ps_version", "select_layer", "downsample_ratio",
                                                                 "dynamic_image_size", "use_thumbnail",
                                                                 "min_dynamic_patch", "max_dynamic_patch")])
    cfg = load_config(model)
    for key in ("ps_version", "select_layer", "downsample_ratio", "dynamic_image_size", "use_thumbnail",
                "min_dynamic_patch", "max_dynamic_patch"):
        assert getattr(cfg, key) == shipped[key], key


def _out_left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("model",))


@pytest.mark.parametrize("text", ["[]", '"abc"', "null", "5"])
@pytest.mark.parametrize("command", ["plan", "awq", "chat", "inspect"])
def test_a_config_that_is_not_an_object_is_one_sentence(model, tmp_path, capsys, text, command):
    (model / "config.json").write_text(text)
    args = {"plan": ["plan", "--model", model],
            "awq": AWQ + ["--model", model, "--out", tmp_path / "out"],
            "chat": ["chat", "--model", model, "--prompt", "hi", "--device", "cpu"],
            "inspect": ["inspect", model]}[command]
    code, _, err = run_cli(args, capsys)
    err = " ".join(err.split())
    assert code == 2 and "not a JSON object" in err, err
    assert "Traceback" not in err and _out_left(tmp_path) == []


# Fields that transformers or torch read before any size check: each refused by the one config reader.
FIELDS = [
    ("llm_config", "rope_theta", "abc", "rope_theta"),
    ("llm_config", "rope_theta", -1, "rope_theta"),
    ("llm_config", "rms_norm_eps", -1, "rms_norm_eps"),
    ("llm_config", "rms_norm_eps", "tiny", "rms_norm_eps"),
    ("llm_config", "hidden_act", "swoosh", "hidden_act"),
    ("llm_config", "architectures", 5, "architectures"),
    ("llm_config", "tie_word_embeddings", "no", "tie_word_embeddings"),
    ("llm_config", "sliding_window", "wide", "sliding_window"),
    ("vision_config", "hidden_act", "swoosh", "hidden_act"),
    ("vision_config", "norm_type", "batch_norm", "norm_type"),
    ("vision_config", "layer_norm_eps", "x", "layer_norm_eps"),
    ("vision_config", "layer_norm_eps", 0, "layer_norm_eps"),
    ("vision_config", "qk_normalization", "yes", "qk_normalization"),
    ("", "architectures", 5, "architectures"),
    ("", "quantization_config", "awq", "quantization_config"),
]


@pytest.mark.parametrize("section,key,value,named", FIELDS, ids=[f"{s or 'top'}.{k}={v}" for s, k, v, _ in FIELDS])
def test_fields_read_by_transformers_are_checked_first(model, tmp_path, capsys, section, key, value, named):
    edit_config(model, _set(section, key, value))
    for args in (AWQ + ["--model", model, "--out", tmp_path / "out"],
                 ["chat", "--model", model, "--prompt", "hi", "--device", "cpu"],
                 ["plan", "--model", model]):
        code, _, err = run_cli(args, capsys)
        err = " ".join(err.split())
        assert code == 2, (args[0], err)
        assert named in err and (repr(value) in err or str(value) in err), (args[0], err)
        assert "Traceback" not in err and err.count(". ") <= 1, err
        # Nothing is created before the refusal: no export, no work folder, no lock.
        assert _out_left(tmp_path) == [], (args[0], _out_left(tmp_path))


def test_inspect_reports_a_bad_field_as_a_failed_check(model, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    edit_config(model, _set("", "architectures", 5))
    code, out, err = run_cli(["inspect", model], capsys)
    assert code == 1 and "Traceback" not in err
    assert "architectures is 5" in " ".join(out.split())


def test_plausible_field_spellings_still_parse(model):
    """Whole numbers where transformers wants floats, and nulls for optional settings, are read as meant."""
    edit_config(model, lambda cfg: (cfg["llm_config"].update(rope_theta=1000000, attention_dropout=0, initializer_range=0),
                                    cfg["vision_config"].update(layer_norm_eps=None, norm_type="layer_norm")))
    cfg = load_config(model)
    q = cfg.qwen2_config()
    assert q.attention_dropout == 0.0 and isinstance(q.attention_dropout, float)
    assert cfg.vision.layer_norm_eps == 1e-6 and cfg.vision.norm_type == "layer_norm"


def test_the_activation_list_is_what_transformers_provides():
    from transformers.activations import ACT2FN

    from r1v_quant.model.config import ACTIVATIONS

    assert set(ACTIVATIONS) <= set(ACT2FN)


@pytest.mark.parametrize("weight_map,named", [(["a", "b"], "weight_map is a list"), ("shard", "weight_map is a str"),
                                              ("number", "not a file name")])
def test_an_index_whose_weight_map_is_not_names_to_files(model, tmp_path, capsys, monkeypatch, weight_map, named):
    monkeypatch.setenv("COLUMNS", "300")
    index = _index(model)
    if weight_map == "number":
        weight_map = {k: 1 for k in index["weight_map"]}
    index["weight_map"] = weight_map
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    for args in (AWQ + ["--model", model, "--out", tmp_path / "out"],
                 ["chat", "--model", model, "--prompt", "hi", "--device", "cpu"]):
        code, _, err = run_cli(args, capsys)
        err = " ".join(err.split())
        assert code == 2 and named in err and "Traceback" not in err, (args[0], err)
        assert _out_left(tmp_path) == []
    code, out, err = run_cli(["inspect", model], capsys)
    assert code == 1 and named in " ".join(out.split()) and "Traceback" not in err, out + err
