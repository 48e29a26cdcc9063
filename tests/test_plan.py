"""`r1v-quant plan`: exact export bytes against a hand-built export, and the 38B numbers from its known shapes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import typer
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from r1v_quant.deploy.plan import make_plan, parse_gpu_mems, plan_model
from r1v_quant.errors import UserError
from r1v_quant.int4.format import awq_shapes, to_awq
from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.model.config import parse_config
from r1v_quant.model.footprint import component_of, estimate_reserve, kv_bytes_per_token
from r1v_quant.model.layout import checkpoint_shapes, is_quant_linear
from r1v_quant.units import GiB, parse_size

# ---------------------------------------------------------------------------------------------
# A hand-built export: written from layout.py and awq_shapes only, independent of plan.py.


def small_config(**top) -> dict:
    raw = {
        "architectures": ["SkyworkR1VChatModel"],
        "auto_map": {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig",
                     "AutoModel": "modeling_skywork_chat.SkyworkChatModel",
                     "AutoModelForCausalLM": "modeling_skywork_chat.SkyworkChatModel"},
        "model_type": "skywork_chat", "torch_dtype": "bfloat16", "downsample_ratio": 0.5, "dynamic_image_size": True,
        "force_image_size": 448, "max_dynamic_patch": 6, "min_dynamic_patch": 1, "use_thumbnail": True,
        "ps_version": "v2", "select_layer": -1,
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
                       "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 4096,
                       "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
        "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 448, "patch_size": 14, "qkv_bias": False, "qk_normalization": True,
                          "norm_type": "rms_norm"},
    }
    raw.update(top)
    return raw


def awq_lm_head(shape: tuple[int, int], group: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """lm_head as `awq --quantize-lm-head` stores it, packed by the format module (codes, zeros, scales)."""
    out_f, in_f = shape
    g = in_f if group == -1 else group
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_f, in_f // g), generator=gen, dtype=torch.uint8)
    scales = torch.rand((out_f, in_f // g), generator=gen).to(torch.float16)
    return to_awq(codes, zeros, scales)


def write_export(folder: Path, raw: dict, group: int | None = 128, shards: int = 2,
                 dtype: torch.dtype = torch.bfloat16, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Write config.json, remote-code stubs and sharded safetensors; group None writes the bf16 source instead;
    lm_head=True writes lm_head in the AWQ layout and `"lm_head": true`."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(raw)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(cfg).items():
        module, _, leaf = name.rpartition(".")
        if lm_head and name == "language_model.lm_head.weight":
            for suffix, t in awq_lm_head(shape, group, gen).items():
                tensors[f"{module}.{suffix}"] = t
        elif group is not None and leaf == "weight" and is_quant_linear(module):
            out_f, in_f = shape
            g = in_f if group == -1 else group
            for suffix, (qshape, qdtype) in awq_shapes(out_f, in_f, g).items():
                t = torch.randint(0, 2**31 - 1, qshape, generator=gen, dtype=torch.int32) if qdtype == "int32" \
                    else torch.rand(qshape, generator=gen).to(getattr(torch, qdtype))
                tensors[f"{module}.{suffix}"] = t
        else:
            tensors[name] = torch.randn(shape, generator=gen).to(dtype)
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if group is not None:
        raw = {**raw, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                              "version": "gemm", "modules_to_not_convert": ["vision_model", "mlp1"]}}
        if lm_head:
            raw["quantization_config"]["lm_head"] = True
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "configuration_skywork_chat.py").write_text("from .configuration_skywork_vit import SkyworkVisionConfig\n")
    (folder / "configuration_skywork_vit.py").write_text("class SkyworkVisionConfig: pass\n")
    (folder / "modeling_skywork_chat.py").write_text("from .configuration_skywork_chat import SkyworkChatConfig\n")
    return tensors


def file_tensor_bytes(folder: Path) -> dict[str, int]:
    """name -> bytes, read back through safetensors itself."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for n in h.keys():
                t = h.get_tensor(n)
                out[n] = t.numel() * t.element_size()
    return out


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("group", [128, 64, 32, -1])
def test_export_bytes_equal_real_tensor_bytes(tmp_path, group):
    raw = small_config()
    write_export(tmp_path, raw, group=group)
    real = file_tensor_bytes(tmp_path)
    plan = make_plan(parse_config(raw), group_size=group)
    assert plan.export_total == sum(real.values())
    for comp in plan.components:
        assert comp.export_bytes == sum(b for n, b in real.items() if component_of(n) == comp.name), comp.name


def test_source_bytes_equal_real_bf16_checkpoint(tmp_path):
    raw = small_config()
    write_export(tmp_path, raw, group=None)
    real = file_tensor_bytes(tmp_path)
    plan = make_plan(parse_config(raw))
    assert plan.source_total == sum(real.values())
    assert plan.component("llm_linears").source_bytes == sum(b for n, b in real.items() if component_of(n) == "llm_linears")


def test_plan_of_an_export_folder_uses_its_quantization_config(tmp_path):
    raw = small_config()
    write_export(tmp_path, raw, group=64)
    plan = plan_model(str(tmp_path))
    assert plan.already_quantized and plan.group_size == 64
    assert plan.export_total == sum(file_tensor_bytes(tmp_path).values())
    with pytest.raises(UserError, match="already quantised with group size 64"):
        plan_model(str(tmp_path), group_size=128)


def test_float32_model_dtype_counts_four_bytes(tmp_path):
    raw = small_config(torch_dtype="float32")
    write_export(tmp_path, raw, group=128, dtype=torch.float32)
    assert make_plan(parse_config(raw)).export_total == sum(file_tensor_bytes(tmp_path).values())


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(UserError, match="group size 96 does not divide the 256 input channels"):
        make_plan(parse_config(small_config()), group_size=96)


# ---------------------------------------------------------------------------------------------
# The 38B model, from its published shapes (hidden 5120, 64 layers, 40 heads of 128, 8 KV heads,
# intermediate 27648, vocab 152064; InternViT-6B: 3200 wide, 45 layers, MLP 12800)


D, L, H, KV, HD, F, V = 5120, 64, 40, 8, 128, 27648, 152064
DV, LV, FV = 3200, 45, 12800


def test_38b_component_sizes():
    plan = plan_model("r1v-38b")
    assert plan.model_dtype == "bfloat16" and plan.group_size == 128
    linear_params = L * (D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * F)
    assert linear_params == 31_205_621_760
    lin = plan.component("llm_linears")
    assert lin.params == linear_params
    assert lin.source_bytes == 2 * linear_params
    # qweight in*out/2 + scales (in/128)*out*2 + qzeros (in/128)*(out/8)*4 = in*out*133/256
    assert lin.export_bytes == linear_params * 133 // 256
    vit_layer = 3 * DV * DV + (DV * DV + DV) + (FV * DV + FV) + (DV * FV + DV) + 6 * DV
    vit_embed = DV + (DV * 3 * 14 * 14 + DV) + (1 + 32 * 32) * DV
    assert plan.component("vision").params == LV * vit_layer + vit_embed == 5_536_496_000
    assert plan.component("vision").export_bytes == 2 * plan.component("vision").params
    assert plan.component("projector").params == (4 * DV) * 2 + (4 * DV * D + D) + (D * D + D)
    assert plan.component("embeddings").export_bytes == plan.component("lm_head").export_bytes == 2 * V * D
    assert plan.component("llm_other").params == L * (2 * D + H * HD + 2 * KV * HD) + D
    assert plan.export_total == sum(c.export_bytes for c in plan.components) == 30_585_369_344
    assert 28.4 < plan.export_total / GiB < 28.6 and 71.4 < plan.source_total / GiB < 71.6


def test_38b_kv_cache_and_cards():
    plan = plan_model("r1v-38b")
    assert plan.kv_bytes_per_token == 2 * L * KV * HD * 2 == 262_144
    assert kv_bytes_per_token(resolve_config("r1v-38b")[0], "fp8") == 2 * L * KV * HD == 131_072
    cards = {c.label: c for c in plan.cards}
    assert [c.label for c in plan.cards] == ["24 GB", "32 GB", "40 GB", "48 GB", "80 GB"]
    for card in plan.cards:
        room = int(card.gpu_bytes * 0.9) - plan.export_total - plan.reserve.total
        assert card.kv_room_bytes == room
        assert card.max_context == (max(room, 0) // plan.kv_bytes_per_token) // 16 * 16
    assert cards["24 GB"].status == "no" and "weights alone" in cards["24 GB"].reason
    assert cards["32 GB"].status == "no"
    assert cards["48 GB"].status == "ok"
    assert cards["80 GB"].max_context > 131072 and cards["80 GB"].max_model_len == 131072
    # 24 GB gets the suggestions the brief asks for, each with what it still lacks
    titles = {s.title: s for s in cards["24 GB"].suggestions}
    assert {"fp8 KV cache", "8-bit vision encoder", "vision encoder in host memory", "4-bit lm_head", "text only"} <= set(titles)
    assert titles["8-bit vision encoder"].short_by_bytes < titles["fp8 KV cache"].short_by_bytes
    assert titles["vision encoder in host memory"].short_by_bytes < titles["8-bit vision encoder"].short_by_bytes
    assert not cards["80 GB"].suggestions


def test_reserve_is_documented_and_grows_with_tiles():
    cfg = resolve_config("r1v-38b")[0]
    r = estimate_reserve(cfg)
    assert r.runtime == 2 * GiB and r.tiles_per_image == 13 and r.images_profiled == 1
    assert 0.5 * GiB < r.vision_activations < 2 * GiB
    assert estimate_reserve(cfg, max_dynamic_patch=6).vision_activations < r.vision_activations
    assert estimate_reserve(cfg, max_batched_tokens=8192).images_profiled == 2   # 8192 // (13 * 256)
    assert estimate_reserve(cfg, images=False).vision_activations == 0


def test_fp8_kv_doubles_context():
    a, b = plan_model("r1v-38b", gpu_mems=[("x", 80 * GiB)]), plan_model("r1v-38b", kv_dtype="fp8", gpu_mems=[("x", 80 * GiB)])
    assert b.cards[0].max_context in (2 * a.cards[0].max_context, 2 * a.cards[0].max_context + 16)


# ---------------------------------------------------------------------------------------------
# Resolving --model and parsing sizes


def test_aliases_resolve_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for spec in ("r1v-38b", "R1V-38B", "Skywork/Skywork-R1V-38B"):
        cfg, source = resolve_config(spec)
        assert cfg.num_layers == 64 and "built-in" in source


def test_hub_id_prefers_local_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    raw = small_config()
    snap = tmp_path / "models--Skywork--Skywork-R1V-38B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(raw))
    (tmp_path / "models--Skywork--Skywork-R1V-38B" / "refs").mkdir()
    (tmp_path / "models--Skywork--Skywork-R1V-38B" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    cfg, source = resolve_config("Skywork/Skywork-R1V-38B")
    assert cfg.num_layers == 2 and "cache" in source


def test_unknown_model_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="not a folder, a config file"):
        resolve_config("no-such-model")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        resolve_config("someone/unknown-model")


def test_config_json_file_is_accepted(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(small_config()))
    assert resolve_config(str(tmp_path / "c.json"))[0].num_layers == 2


def test_parse_sizes():
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("30GB") == 30 * 10**9
    assert parse_size("81559MiB") == 81559 * 1024**2
    assert parse_size("48") == 48 * GiB
    assert [label for label, _ in parse_gpu_mems("24GiB, 30GB")] == ["24GiB", "30GB"]
    for bad in ("lots", "24XB", "512MB", ""):
        with pytest.raises(UserError):
            parse_gpu_mems(bad) if bad == "" else parse_size(bad)
    assert parse_size("1024TiB") == 2**50


@pytest.mark.parametrize("text,named", [("99999999999999999999999GiB", "more than any device"),
                                        ("2000TB", "more than any device"), ("9" * 400, "more than any device"),
                                        ("24GiB,,48GiB", "empty entry (number 2)"), ("24GiB,", "empty entry (number 2)"),
                                        (",24GiB", "empty entry (number 1)")])
def test_absurd_and_empty_gpu_mem_entries_are_refused(text, named, capsys):
    with pytest.raises(UserError, match=re.escape(named)):
        parse_gpu_mems(text)
    code, out, err = run_cli(["plan", "--model", "r1v-38b", "--gpu-mem", text], capsys)
    assert code == 2 and named in " ".join(err.split()) and "Traceback" not in err and not out, err


def test_bad_util_and_kv_dtype():
    cfg = resolve_config("r1v-38b")[0]
    with pytest.raises(UserError, match="--util"):
        make_plan(cfg, util=1.5)
    with pytest.raises(UserError, match="KV cache dtype"):
        make_plan(cfg, kv_dtype="int4")


# ---------------------------------------------------------------------------------------------
# The command


def _app():
    from r1v_quant.cli import plan as plan_cli

    app = typer.Typer()
    app.command("plan")(plan_cli.command)
    app.command("other")(lambda: None)
    return app


def test_cli_prints_tables_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--gpu-mem", "24GiB,30GB,80GiB", "--json", str(out)],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "28.48" in result.output and "262,144 bytes per token" in result.output and "24GiB" in result.output
    data = json.loads(out.read_text())
    assert data["export_total"] == 30_585_369_344
    assert [c["label"] for c in data["cards"]] == ["24GiB", "30GB", "80GiB"]
    assert data["reserve"]["total"] == sum(data["reserve"][k] for k in ("runtime", "llm_activations", "vision_activations"))


def test_cli_bad_input_raises_user_error():
    result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--gpu-mem", "huge"])
    assert isinstance(result.exception, UserError)
    result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--kv-cache-dtype", "int4"])
    assert isinstance(result.exception, UserError)


def test_cli_takes_vllms_spelling_of_the_kv_cache_dtype():
    for flag in ("fp8", "fp8_e4m3"):
        result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--kv-cache-dtype", flag], env={"COLUMNS": "160"})
        assert result.exit_code == 0, result.output
        assert "131,072 bytes per token (fp8)" in result.output
    result = CliRunner().invoke(_app(), ["plan", "--model", "r1v-38b", "--kv-cache-dtype", "auto",
                                         "--gpu-memory-utilization", "0.95"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "262,144 bytes per token (bf16)" in result.output and "utilization 0.95" in result.output


def test_the_whole_family_plans_offline_by_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    plans = {m: plan_model(f"Skywork/Skywork-{m}-38B", gpu_mems=[("x", 80 * GiB)]) for m in ("R1V", "R1V2", "R1V3")}
    assert all("built-in config" in p.source for p in plans.values())
    # one layout: the same weights for R1V and R1V2; R1V3's smaller vocabulary shrinks only the embeddings
    assert plans["R1V"].export_total == plans["R1V2"].export_total
    assert plans["R1V3"].export_total == plans["R1V"].export_total - 2 * (152064 - 151674) * 5120 * 2
    assert plans["R1V"].kv_bytes_per_token == plans["R1V2"].kv_bytes_per_token == plans["R1V3"].kv_bytes_per_token
    assert [p.cards[0].max_model_len for p in plans.values()] == [131072, 40960, 32768]


def test_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from r1v_quant.model.checkpoint import resolve_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"offline here \(127\.0\.0\.1:9 cannot be reached"):
        resolve_config("someone/not-cached-38b")
    assert time.monotonic() - start < 5
