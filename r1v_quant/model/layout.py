"""The checkpoint's tensor names and shapes, derived from its config.

One source of truth for what a Skywork-R1V checkpoint holds: the small-checkpoint maker
writes exactly these tensors, the loader checks against them, and `plan`/`inspect` size them.
"""

from __future__ import annotations

import re

from r1v_quant.model.config import R1VConfig
from r1v_quant.model.topology import BIASED_LINEARS, DECODER_LAYERS, FINAL_GROUP, LANGUAGE_MODEL, QUANT_LINEARS

# The Qwen2 linears that AWQ quantises; everything else stays in the source dtype.
QUANT_LINEAR_SUFFIXES = QUANT_LINEARS
_QUANT_LINEAR_RE = re.compile(
    r"^language_model\.model\.layers\.(\d+)\.(" + "|".join(re.escape(s) for s in QUANT_LINEAR_SUFFIXES) + r")$"
)
# The output head and the norm before it, as the checkpoint names them (the optional lm_head search).
HEAD_MODULE = LANGUAGE_MODEL + FINAL_GROUP.linears[0]
FINAL_NORM = LANGUAGE_MODEL + FINAL_GROUP.prev
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
    p = f"{DECODER_LAYERS}{layer}."
    by_leaf = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd),
               "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    return {p + name: by_leaf[name.rpartition(".")[2]] for name in QUANT_LINEARS}


def llm_shapes(cfg: R1VConfig) -> dict[str, tuple[int, ...]]:
    llm = cfg.llm
    d = int(llm["hidden_size"])
    vocab = int(llm["vocab_size"])
    out: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (vocab, d)}
    for i in range(cfg.num_layers):
        p = f"{DECODER_LAYERS}{i}."
        for name, shape in llm_linear_shapes(cfg, i).items():
            out[name + ".weight"] = shape
            if name.endswith(BIASED_LINEARS):
                out[name + ".bias"] = (shape[0],)
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
    out[FINAL_NORM + ".weight"] = (d,)
    if not llm.get("tie_word_embeddings", False):
        out[HEAD_MODULE + ".weight"] = (vocab, d)
    return out


def checkpoint_shapes(cfg: R1VConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a full-precision checkpoint, in the checkpoint's own names."""
    return {**vision_shapes(cfg), **projector_shapes(cfg), **llm_shapes(cfg)}


# Which config keys set a tensor's shape (first match wins), to name them when the weights disagree.
_SHAPE_KEYS = (
    ("embed_tokens.", ("llm_config", "vocab_size", "hidden_size")),
    ("lm_head.", ("llm_config", "vocab_size", "hidden_size")),
    ("language_model.", ("llm_config", "hidden_size")),
    ("mlp.fc", ("vision_config", "intermediate_size")),
    ("position_embedding", ("vision_config", "image_size", "patch_size")),
    ("patch_embedding", ("vision_config", "patch_size", "hidden_size")),
    ("mlp1.", ("", "downsample_ratio")),
    ("", ("vision_config", "hidden_size")),
)
_PROJ_KEYS = {"gate_proj": ("intermediate_size",), "up_proj": ("intermediate_size",), "down_proj": ("intermediate_size",),
              "k_proj": ("num_key_value_heads", "hidden_size"), "v_proj": ("num_key_value_heads", "hidden_size"),
              "q_proj": ("num_attention_heads", "hidden_size"), "o_proj": ("num_attention_heads", "hidden_size")}


def shape_keys(cfg: R1VConfig, name: str) -> str:
    """'llm_config intermediate_size 999' for the keys that shape tensor `name`."""
    proj = re.search(r"\.(\w+_proj)\.", name)
    if proj and name.startswith("language_model."):
        section, keys = "llm_config", _PROJ_KEYS[proj.group(1)]
    else:
        section, *keys = next(v for part, v in _SHAPE_KEYS if part in name)
    values = cfg.raw.get(section, {}) if section else cfg.raw
    return " and ".join(f"{(section + ' ') if section else ''}{k} {values.get(k)!r}" for k in keys)


def _layer_count(names, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(found) + 1 if found else 0


def check_checkpoint_shapes(cfg: R1VConfig, ckpt) -> None:
    """The config's sizes against the safetensors headers, before any work: one sentence per mismatch."""
    from r1v_quant.errors import UserError

    names = set(ckpt.names())
    for prefix, section, count in ((DECODER_LAYERS, "llm_config", cfg.num_layers),
                                   ("vision_model.encoder.layers.", "vision_config", cfg.vision.num_hidden_layers)):
        found = _layer_count(names, prefix)
        if found != count:
            raise UserError(f"config.json's {section} num_hidden_layers is {count}, but {ckpt.dir} holds {found} such layers.")
    embed = "language_model.model.embed_tokens.weight"
    expected = checkpoint_shapes(cfg)
    for name in sorted(expected, key=lambda n: n != embed):  # the embedding names hidden_size and vocab_size best
        if name in names and tuple(ckpt.shape_of(name)) != tuple(expected[name]):
            raise UserError(f"config.json's {shape_keys(cfg, name)} does not match the weights: {name} is "
                            f"{list(ckpt.shape_of(name))} in {ckpt.dir}, where the config implies {list(expected[name])}.")
    if cfg.quantization is not None:
        _check_awq_shapes(cfg, ckpt, names)


def _check_awq_shapes(cfg: R1VConfig, ckpt, names: set[str]) -> None:
    """An export's 4-bit tensors against its quantization_config's group size, from the headers alone."""
    from r1v_quant.errors import UserError
    from r1v_quant.int4.format import awq_shapes, read_quantization_config

    qc = read_quantization_config(cfg.quantization)
    linears = {n: s for i in range(cfg.num_layers) for n, s in llm_linear_shapes(cfg, i).items()}
    if qc.lm_head:
        linears[HEAD_MODULE] = (int(cfg.llm["vocab_size"]), int(cfg.llm["hidden_size"]))
    for module, (out_features, in_features) in linears.items():
        if module + ".qweight" not in names:
            continue
        for leaf, (shape, _) in awq_shapes(out_features, in_features, qc.group_size).items():
            name = f"{module}.{leaf}"
            found = tuple(ckpt.shape_of(name)) if name in names else shape
            if found != shape:
                groups = found[0] if leaf != "qweight" and found else 0
                fits = f", which fits group size {in_features // groups}" if groups and in_features % groups == 0 else ""
                raise UserError(f"config.json's quantization_config group size {qc.group_size} does not match the "
                                f"weights: {name} is {list(found)} in {ckpt.dir}{fits}, where {list(shape)} is expected.")
