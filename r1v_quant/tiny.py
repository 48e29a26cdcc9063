"""Small random Skywork-R1V checkpoints with the real config schema, weight names and tokenizer conventions.

They exercise every code path the 38B model takes (sharded safetensors, bf16, GQA with q/k/v bias,
a qk-normalised RMSNorm vision encoder, pixel shuffle v2) in seconds on a CPU.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from r1v_quant.checkpoint import ShardWriter
from r1v_quant.config import parse_config
from r1v_quant.layout import checkpoint_shapes
from r1v_quant.output import staged_dir

DATA_DIR = Path(__file__).parent / "data"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_NORM_WEIGHT = re.compile(r"norm\d?\.weight$")
_NORM_BIAS = re.compile(r"norm\d?\.bias$")


@dataclass(frozen=True)
class TinySizes:
    vision_width: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 512
    llm_width: int = 256
    llm_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    max_dynamic_patch: int = 6
    # Channels given large norm weights, as real LLMs have: they make activation-aware scaling matter.
    salient_channels: int = 4
    salient_gain: float = 12.0


def tiny_config(vocab_size: int, sizes: TinySizes, special: dict[str, int]) -> dict:
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": sizes.llm_width,
        "intermediate_size": sizes.intermediate,
        "num_hidden_layers": sizes.llm_layers,
        "num_attention_heads": sizes.heads,
        "num_key_value_heads": sizes.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "max_window_layers": sizes.llm_layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": sizes.vision_width,
        "intermediate_size": sizes.vision_intermediate,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "num_channels": 3,
        "image_size": 448,
        "patch_size": 14,
        "qkv_bias": False,
        "qk_normalization": True,
        "norm_type": "rms_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
        "use_flash_attn": False,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["SkyworkR1VChatModel"],
        "auto_map": {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig"},
        "model_type": "skywork_chat",
        "torch_dtype": "bfloat16",
        "template": "skywork-r1v",
        "select_layer": -1,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "force_image_size": 448,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": sizes.max_dynamic_patch,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "vision_config": vision,
        "llm_config": llm,
    }


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, sizes: TinySizes) -> torch.Tensor:
    """A plausible random value for one checkpoint tensor, chosen by its role."""
    if name.endswith(("ls1", "ls2")):
        return torch.full(shape, 0.1)
    if _NORM_WEIGHT.search(name) or name == "mlp1.0.weight":
        out = torch.ones(shape)
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            idx = torch.randperm(shape[0], generator=gen)[: sizes.salient_channels]
            out[idx] = sizes.salient_gain
        return out
    if _NORM_BIAS.search(name) or name == "mlp1.0.bias":
        return torch.zeros(shape)
    std = 0.02
    if name.endswith(".bias"):
        std = 0.01
    elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
        std = 0.1
    elif "position_embedding" in name or "class_embedding" in name:
        std = 0.02
    return torch.randn(shape, generator=gen) * std


def make_tiny(out_dir, seed: int = 0, sizes: TinySizes = TinySizes(), force: bool = False,
              max_shard_bytes: int = 4 * 1024**2) -> Path:
    """Write a random small checkpoint to `out_dir` and return the folder."""
    from transformers import AutoTokenizer

    from r1v_quant.tokenizer_build import build_r1_tokenizer

    out = Path(out_dir)
    with staged_dir(out, force=force) as tmp:
        tok = AutoTokenizer.from_pretrained(str(build_r1_tokenizer(tmp, seed=seed)))
        special = {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        vocab = -(-len(tok) // 128) * 128  # padded like the real model's 152064
        config = tiny_config(vocab, sizes, special)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = torch.Generator().manual_seed(seed)
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, shape in checkpoint_shapes(parse_config(config)).items():
            writer.add(name, init_tensor(name, shape, gen, sizes).to(torch.bfloat16))
        writer.close()
        write_side_files(tmp, special)
    return out


def write_side_files(folder: Path, special: dict[str, int]) -> None:
    generation = {
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "repetition_penalty": 1.05,
        "max_new_tokens": 64000,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    preprocessor = {
        "crop_size": 448,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "resample": 3,
        "size": 448,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    for src in sorted(DATA_DIR.glob("configuration_*.py")):
        shutil.copyfile(src, folder / src.name)
