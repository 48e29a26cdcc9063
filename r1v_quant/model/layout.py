"""The checkpoint's tensor names and shapes, derived from its config.

One source of truth for what a Skywork-R1V checkpoint holds: the small-checkpoint maker
writes exactly these tensors, the loader checks against them, and `plan`/`inspect` size them.
"""

from __future__ import annotations

import re

from r1v_quant.model.config import R1VConfig
from r1v_quant.quant.topology import BIASED_LINEARS, QUANT_LINEARS

LLM_PREFIX = "language_model."
# The Qwen2 linears that AWQ quantises; everything else stays in the source dtype.
QUANT_LINEAR_SUFFIXES = QUANT_LINEARS
_QUANT_LINEAR_RE = re.compile(
    r"^language_model\.model\.layers\.(\d+)\.(" + "|".join(re.escape(s) for s in QUANT_LINEAR_SUFFIXES) + r")$"
)
# Entries vLLM matches by substring to keep modules unquantised; both are needed (see AWQ-AND-VLLM.md).
MODULES_TO_NOT_CONVERT = ["vision_model", "mlp1"]


def is_quant_linear(module_name: str) -> bool:
    """True for a language-model linear that AWQ quantises (name without `.weight`)."""
    return _QUANT_LINEAR_RE.match(module_name) is not None


def vision_shapes(cfg: R1VConfig) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    d, f = v.hidden_size, v.intermediate_size
    grid = v.image_size // v.patch_size
    out: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, d),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, v.patch_size, v.patch_size),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding": (1, 1 + grid * grid, d),
    }
    layer_norm = v.norm_type == "layer_norm"
    for i in range(v.num_hidden_layers):
        p = f"vision_model.encoder.layers.{i}."
        for norm in ("norm1", "norm2"):
            out[p + norm + ".weight"] = (d,)
            if layer_norm:
                out[p + norm + ".bias"] = (d,)
        out[p + "attn.qkv.weight"] = (3 * d, d)
        if v.qkv_bias:
            out[p + "attn.qkv.bias"] = (3 * d,)
        if v.qk_normalization:
            out[p + "attn.q_norm.weight"] = (d,)
            out[p + "attn.k_norm.weight"] = (d,)
            if layer_norm:
                out[p + "attn.q_norm.bias"] = (d,)
                out[p + "attn.k_norm.bias"] = (d,)
        out[p + "attn.proj.weight"] = (d, d)
        out[p + "attn.proj.bias"] = (d,)
        out[p + "mlp.fc1.weight"] = (f, d)
        out[p + "mlp.fc1.bias"] = (f,)
        out[p + "mlp.fc2.weight"] = (d, f)
        out[p + "mlp.fc2.bias"] = (d,)
        out[p + "ls1"] = (d,)
        out[p + "ls2"] = (d,)
    return out


def projector_shapes(cfg: R1VConfig) -> dict[str, tuple[int, ...]]:
    width = int(cfg.vision.hidden_size / cfg.downsample_ratio**2)
    d = cfg.hidden_size
    return {
        "mlp1.0.weight": (width,), "mlp1.0.bias": (width,),
        "mlp1.1.weight": (d, width), "mlp1.1.bias": (d,),
        "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,),
    }


def llm_linear_shapes(cfg: R1VConfig, layer: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the quantised linears of one decoder layer, by module name."""
    llm = cfg.llm
    d = int(llm["hidden_size"])
    heads = int(llm["num_attention_heads"])
    kv = int(llm.get("num_key_value_heads", heads))
    hd = int(llm.get("head_dim") or d // heads)
    f = int(llm["intermediate_size"])
    p = f"language_model.model.layers.{layer}."
    by_leaf = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd),
               "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    return {p + name: by_leaf[name.rpartition(".")[2]] for name in QUANT_LINEARS}


def llm_shapes(cfg: R1VConfig) -> dict[str, tuple[int, ...]]:
    llm = cfg.llm
    d = int(llm["hidden_size"])
    vocab = int(llm["vocab_size"])
    out: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (vocab, d)}
    for i in range(cfg.num_layers):
        p = f"language_model.model.layers.{i}."
        for name, shape in llm_linear_shapes(cfg, i).items():
            out[name + ".weight"] = shape
            if name.endswith(BIASED_LINEARS):
                out[name + ".bias"] = (shape[0],)
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
    out["language_model.model.norm.weight"] = (d,)
    if not llm.get("tie_word_embeddings", False):
        out["language_model.lm_head.weight"] = (vocab, d)
    return out


def checkpoint_shapes(cfg: R1VConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a full-precision checkpoint, in the checkpoint's own names."""
    return {**vision_shapes(cfg), **projector_shapes(cfg), **llm_shapes(cfg)}


def awq_shapes(out_features: int, in_features: int, group_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """AutoAWQ GEMM tensors of one linear: suffix -> (shape, dtype name)."""
    return {
        "qweight": ((in_features, out_features // 8), "int32"),
        "qzeros": ((in_features // group_size, out_features // 8), "int32"),
        "scales": ((in_features // group_size, out_features), "float16"),
    }
