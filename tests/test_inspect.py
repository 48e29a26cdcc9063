"""`r1v-quant inspect`: passes a good hand-built export, fails naming each contract breach."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from r1v_quant.deploy.inspect_export import inspect, vllm_prefix
from r1v_quant.deploy.plan import make_plan
from r1v_quant.deploy.tensor_files import read_safetensors_header
from r1v_quant.errors import UserError
from r1v_quant.int4.format import awq_shapes
from r1v_quant.model.config import parse_config
from r1v_quant.model.layout import checkpoint_shapes, is_quant_linear

INDEX = "model.safetensors.index.json"


def small_config() -> dict:
    return {
        "architectures": ["SkyworkR1VChatModel"],
        "auto_map": {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
                     "AutoModel": "modeling_skywork_chat.SkyworkChatModel",
                     "AutoModelForCausalLM": "modeling_skywork_chat.SkyworkChatModel"},
        "model_type": "skywork_chat", "torch_dtype": "bfloat16", "downsample_ratio": 0.5, "dynamic_image_size": True,
        "force_image_size": 448, "max_dynamic_patch": 6, "use_thumbnail": True, "ps_version": "v2",
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
                       "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 4096,
                       "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
        "vision_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 448, "patch_size": 14, "qk_normalization": True, "norm_type": "rms_norm"},
    }


def quant_config(group: int = 128, **over) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ["vision_model", "mlp1"], **over}


def build(folder: Path, *, group: int = 128, quantise_vision: bool = False, qc: dict | None | str = "default",
          scales_dtype: torch.dtype = torch.float16, shards: int = 3) -> Path:
    """A hand-built AWQ GEMM export from layout.py: config, remote code, sharded safetensors and index."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = small_config()
    cfg = parse_config(raw)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(cfg).items():
        module, _, leaf = name.rpartition(".")
        vision_linear = module.startswith("vision_model.encoder.") and leaf == "weight" and len(shape) == 2
        if leaf == "weight" and (is_quant_linear(module) or (quantise_vision and vision_linear)):
            out_f, in_f = shape
            for suffix, (qshape, qdtype) in awq_shapes(out_f, in_f, in_f if group == -1 else group).items():
                dt = scales_dtype if suffix == "scales" else getattr(torch, qdtype)
                tensors[f"{module}.{suffix}"] = torch.zeros(qshape, dtype=dt)
        else:
            tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if qc == "default":
        raw["quantization_config"] = quant_config(group)
    elif qc is not None:
        raw["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "configuration_skywork_chat.py").write_text(
        "import copy\nfrom .configuration_skywork_vit import SkyworkVisionConfig\n\nclass SkyworkChatConfig: pass\n")
    (folder / "configuration_skywork_vit.py").write_text("class SkyworkVisionConfig: pass\n")
    (folder / "modeling_skywork_chat.py").write_text("from .configuration_skywork_chat import SkyworkChatConfig\n")
    return folder


def edit_config(folder: Path, fn) -> None:
    raw = json.loads((folder / "config.json").read_text())
    fn(raw)
    (folder / "config.json").write_text(json.dumps(raw))


def failed(report) -> dict[str, str]:
    return {c.name: c.message for c in report.checks if c.status == "fail"}


# ---------------------------------------------------------------------------------------------


def test_good_export_passes_every_check(tmp_path):
    report = inspect(build(tmp_path / "good"))
    assert report.ok, failed(report)
    assert all(c.status == "pass" for c in report.checks), [(c.name, c.status, c.message) for c in report.checks]
    names = {c.name for c in report.checks}
    assert {"quantization_config", "modules_to_not_convert", "vision encoder and projector unquantised", "AWQ tensors",
            "Marlin kernels", "remote code (auto_map)", "safetensors index", "tensors match the config",
            "sizes match the plan"} <= names
    q = report.quantised
    assert q["modules"] == 2 * 7 and q["decoder_layers"] == 2 and q["group_size"] == 128
    assert q["by_kind"] == {k: 2 for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert q["unquantised_linears"] == {"mlp1": 2, "vision_model": 2 * 4}
    comps = {c.name: c for c in report.components}
    assert set(comps["llm_linears"].dtypes) == {"int32", "float16"}
    assert set(comps["vision"].dtypes) == {"bfloat16"}
    plan = make_plan(parse_config(small_config()), group_size=128)
    assert report.total_bytes == report.planned_total == plan.export_total
    assert "remote code" in report.check("remote code (auto_map)").name
    assert "configuration_skywork_vit.py" in report.check("remote code (auto_map)").message


def test_quantised_vision_encoder_fails_naming_it(tmp_path):
    report = inspect(build(tmp_path / "e", quantise_vision=True))
    fails = failed(report)
    assert "vision encoder's linears were quantised" in fails["vision encoder and projector unquantised"]
    assert "vision_model.encoder.layers.0.attn.qkv" in fails["vision encoder and projector unquantised"]
    # the list still names vision_model, which would now also skip modules that carry 4-bit tensors
    assert "'vision_model' also matches" in fails["modules_to_not_convert"]
    assert not report.ok


def test_missing_modules_to_not_convert_fails(tmp_path):
    folder = build(tmp_path / "e", qc={k: v for k, v in quant_config().items() if k != "modules_to_not_convert"})
    report = inspect(folder)
    msg = failed(report)["modules_to_not_convert"]
    assert "missing or empty" in msg and "(mlp1: 2)" in msg and "mlp1.1" in msg and "vision_model" in msg


def test_modules_to_not_convert_without_mlp1_fails_naming_mlp1(tmp_path):
    report = inspect(build(tmp_path / "e", qc=quant_config(modules_to_not_convert=["vision_model"])))
    msg = failed(report)["modules_to_not_convert"]
    assert "leaves uncovered" in msg and "2 unquantised linears (mlp1: 2)" in msg and "mlp1.1" in msg


def test_entry_matching_quantised_modules_fails(tmp_path):
    # "mlp" occurs in language_model...mlp.gate_up_proj, so vLLM would skip the quantised MLPs too.
    report = inspect(build(tmp_path / "e", qc=quant_config(modules_to_not_convert=["vision_model", "mlp1", "mlp"])))
    assert "'mlp' also matches" in failed(report)["modules_to_not_convert"]


def test_missing_shard_fails_naming_it(tmp_path):
    folder = build(tmp_path / "e")
    (folder / "model-00002-of-00003.safetensors").unlink()
    report = inspect(folder)
    msg = failed(report)["safetensors index"]
    assert "model-00002-of-00003.safetensors" in msg and "missing" in msg
    assert "missing" in failed(report)["tensors match the config"]


def test_index_listing_a_tensor_not_in_its_shard_and_unlisted_tensors_fail(tmp_path):
    folder = build(tmp_path / "e")
    index = json.loads((folder / INDEX).read_text())
    moved = next(iter(index["weight_map"]))
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    del index["weight_map"][moved]
    (folder / INDEX).write_text(json.dumps(index))
    msg = failed(inspect(folder))["safetensors index"]
    assert "ghost.weight" in msg and moved in msg


def test_quantization_config_only_inside_llm_config_fails(tmp_path):
    folder = build(tmp_path / "e")
    edit_config(folder, lambda raw: raw["llm_config"].update(quantization_config=raw.pop("quantization_config")))
    assert "only inside llm_config" in failed(inspect(folder))["quantization_config"]


def test_wrong_quantization_fields_fail(tmp_path):
    folder = build(tmp_path / "e", qc=quant_config(version="gemv", zero_point=False, bits=8))
    msg = failed(inspect(folder))["quantization_config"]
    assert "bits is 8" in msg and "zero_point" in msg and "'gemv'" in msg


def test_missing_remote_code_fails(tmp_path):
    folder = build(tmp_path / "e")
    (folder / "configuration_skywork_vit.py").unlink()
    msg = failed(inspect(folder))["remote code (auto_map)"]
    assert "configuration_skywork_vit.py (imported by configuration_skywork_chat.py)" in msg
    (folder / "modeling_skywork_chat.py").unlink()
    assert "modeling_skywork_chat.py" in failed(inspect(folder))["remote code (auto_map)"]


def test_float32_scales_fail(tmp_path):
    msg = failed(inspect(build(tmp_path / "e", scales_dtype=torch.float32)))["AWQ tensors"]
    assert "scales is float32" in msg


def test_missing_qzeros_and_leftover_weight_fail(tmp_path):
    folder = build(tmp_path / "e", shards=1)
    from safetensors.torch import load_file

    f = folder / "model-00001-of-00001.safetensors"
    tensors = load_file(f)
    del tensors["language_model.model.layers.0.mlp.down_proj.qzeros"]
    tensors["language_model.model.layers.1.self_attn.o_proj.weight"] = torch.zeros(256, 256, dtype=torch.bfloat16)
    save_file(tensors, str(f))
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {n: f.name for n in tensors}
    (folder / INDEX).write_text(json.dumps(index))
    msg = failed(inspect(folder))["AWQ tensors"]
    assert "layers.0.mlp.down_proj lacks qzeros" in msg and "layers.1.self_attn.o_proj has both qweight" in msg


def test_group_size_marlin_cannot_take_warns(tmp_path):
    report = inspect(build(tmp_path / "e", group=256))
    assert report.ok
    assert report.check("Marlin kernels").status == "warn" and "256" in report.check("Marlin kernels").message


def test_per_row_group_passes(tmp_path):
    report = inspect(build(tmp_path / "e", group=-1))
    assert report.ok, failed(report)
    assert report.quantised["group_size"] == -1


def test_not_a_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        inspect(tmp_path / "absent")
    with pytest.raises(UserError, match="no config.json"):
        inspect(tmp_path)


def test_damaged_shard_fails(tmp_path):
    folder = build(tmp_path / "e")
    f = folder / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert "not a readable safetensors file" in failed(inspect(folder))["safetensors index"]


def test_header_reader_and_vllm_prefixes(tmp_path):
    save_file({"a": torch.zeros(3, 4, dtype=torch.int32), "b": torch.zeros(5, dtype=torch.bfloat16)},
              str(tmp_path / "x.safetensors"))
    h = read_safetensors_header(tmp_path / "x.safetensors")
    assert (h["a"].dtype, h["a"].shape, h["a"].nbytes) == ("I32", (3, 4), 48)
    assert (h["b"].dtype, h["b"].nbytes) == ("BF16", 10)
    assert vllm_prefix("language_model.model.layers.3.self_attn.k_proj") == "language_model.model.layers.3.self_attn.qkv_proj"
    assert vllm_prefix("language_model.model.layers.3.mlp.up_proj") == "language_model.model.layers.3.mlp.gate_up_proj"
    assert vllm_prefix("mlp1.1") == "mlp1.1"


# ---------------------------------------------------------------------------------------------


def _app():
    from r1v_quant.cli import inspect as inspect_cli

    app = typer.Typer()
    app.command("inspect")(inspect_cli.command)
    app.command("other")(lambda: None)
    return app


def test_cli_exit_codes_and_json(tmp_path):
    good = build(tmp_path / "good")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(_app(), ["inspect", str(good), "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "servable" in result.output and "vLLM contract" in result.output
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["quantization_config"]["group_size"] == 128

    bad = build(tmp_path / "bad", quantise_vision=True)
    result = CliRunner().invoke(_app(), ["inspect", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "FAIL" in result.output and "vision encoder's linears were quantised" in result.output
