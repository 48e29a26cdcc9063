"""Typed view of a Skywork-R1V (InternVL-chat layout) `config.json`.

Our loader reads the JSON itself, so it never needs the vendor's remote code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.errors import UserError

SUPPORTED_MODEL_TYPES = ("skywork_chat", "internvl_chat")
SUPPORTED_LLM_ARCHS = ("Qwen2ForCausalLM",)
# Activations transformers' ACT2FN provides that a Qwen2 MLP or an InternViT MLP may name; a test
# keeps this list inside ACT2FN, so `plan` checks a config without importing transformers.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate", "quick_gelu",
               "relu", "relu2", "relu6", "silu", "swish", "tanh", "sigmoid", "mish", "leaky_relu", "linear")
VISION_NORMS = ("rms_norm", "layer_norm")
# Qwen2Config checks these types strictly (a whole number for a float field fails there), so they
# are checked here first and handed over as floats.
_QWEN2_FLOATS = ("rms_norm_eps", "initializer_range", "attention_dropout")
_QWEN2_BOOLS = ("tie_word_embeddings", "use_sliding_window", "use_cache")
_QWEN2_OPTIONAL_INTS = ("sliding_window", "max_window_layers", "bos_token_id", "pad_token_id")


@dataclass(frozen=True)
class VisionSettings:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    initializer_factor: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class R1VConfig:
    raw: dict[str, Any]
    vision: VisionSettings
    llm: dict[str, Any]
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v1"  # InternVL's and Skywork's configuration classes default to v1
    template: str | None = None
    force_image_size: int = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    quantization: dict[str, Any] | None = field(default=None)

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """LLM tokens per 448x448 tile after pixel shuffle (256 for the real model)."""
        grid = self.image_size // self.vision.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.llm["num_hidden_layers"])

    def qwen2_config(self):
        """A transformers `Qwen2Config` for the language model."""
        from transformers import Qwen2Config

        keys = dict(self.llm)
        for drop in ("architectures", "auto_map", "_name_or_path", "transformers_version", "model_type"):
            keys.pop(drop, None)
        for key in _QWEN2_FLOATS:
            if keys.get(key) is not None:
                keys[key] = float(keys[key])
        try:
            cfg = Qwen2Config(**keys)
        except (TypeError, ValueError, AttributeError) as e:
            # validate_raw checks every field the model reads; this names any other one transformers refuses.
            first = " ".join(str(e).split())[:160]
            raise UserError(f"config.json llm_config is refused by transformers' Qwen2Config ({first}).") from None
        cfg.tie_word_embeddings = bool(self.llm.get("tie_word_embeddings", False))
        return cfg


def _vision_from(raw: dict[str, Any]) -> VisionSettings:
    names = VisionSettings.__dataclass_fields__
    # A null setting reads as absent, as the vendor's configuration class reads it.
    kept = {k: v for k, v in raw.items() if k in names and v is not None}
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in kept]
    if missing:
        raise UserError(f"vision_config lacks {', '.join(missing)}.")
    return VisionSettings(**kept)


# Plausible bounds: far above any published model, far below what exhausts memory building tables.
_LLM_INTS = {"hidden_size": 1 << 17, "num_hidden_layers": 1024, "num_attention_heads": 1024,
             "num_key_value_heads": 1024, "intermediate_size": 1 << 20, "vocab_size": 1 << 23,
             "max_position_embeddings": 1 << 24}
_LLM_OPTIONAL = ("num_key_value_heads", "max_position_embeddings", "head_dim")
_VISION_INTS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
                "num_attention_heads": 1024, "image_size": 8192, "patch_size": 1024}
_TOP_INTS = {"force_image_size": 8192, "min_dynamic_patch": 256, "max_dynamic_patch": 256}
# Defaults of the vendors' own configuration classes (InternVL-chat's and Skywork's), for absent keys.
VENDOR_DEFAULTS = {"ps_version": "v1"}


def _int_setting(section: dict, key: str, limit: int, where: str, minimum: int = 1) -> None:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where} {key} is {value!r}; it must be a whole number.")
    if not minimum <= value <= limit:
        raise UserError(f"{where} {key} is {value}; it must lie between {minimum} and {limit}.")


def _number(section: dict, key: str, where: str, low: float, high: float, *, low_open: bool = True) -> None:
    """A finite JSON number in (low, high] (or [low, high] when not `low_open`), if the key is present."""
    if key not in section or section[key] is None:
        return
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} {key} is {value!r}; it must be a number.")
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise UserError(f"{where} {key} is {value!r}; it must lie in {span}.")


def _choice(section: dict, key: str, where: str, allowed: tuple[str, ...]) -> None:
    if key in section and section[key] not in allowed:
        raise UserError(f"{where} {key} is {section[key]!r}; r1v-quant knows {', '.join(allowed)}.")


def _typed(section: dict, key: str, where: str, kinds: tuple[type, ...], what: str) -> None:
    """An optional key of a JSON type (`null` allowed); bool never counts as a number."""
    value = section.get(key)
    if value is None:
        return
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise UserError(f"{where} {key} is {value!r}; it must be {what}.")


def _names_list(section: dict, key: str, where: str) -> None:
    value = section.get(key)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise UserError(f"{where} {key} is {value!r}; it must be a list of class names.")


def _check_llm_fields(llm: dict, where: str) -> None:
    """The fields transformers and torch read from llm_config, which no size check covers."""
    _names_list(llm, "architectures", where)
    _number(llm, "rope_theta", where, 0, 1e12)
    rope = llm.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            raise UserError(f"{where} rope_parameters is {rope!r}; it must be an object.")
        _number(rope, "rope_theta", f"{where} rope_parameters", 0, 1e12)
    _typed(llm, "rope_scaling", where, (dict,), "an object or null")
    _number(llm, "rms_norm_eps", where, 0, 0.1)
    _choice(llm, "hidden_act", where, ACTIVATIONS)
    for key in _QWEN2_FLOATS[1:]:
        _number(llm, key, where, 0, 1, low_open=False)
    for key in _QWEN2_BOOLS:
        _typed(llm, key, where, (bool,), "true or false")
    for key in _QWEN2_OPTIONAL_INTS:
        _typed(llm, key, where, (int,), "a whole number or null")
    eos = llm.get("eos_token_id")
    if eos is not None and not (isinstance(eos, int) and not isinstance(eos, bool)) and not (
            isinstance(eos, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in eos)):
        raise UserError(f"{where} eos_token_id is {eos!r}; it must be a token id or a list of them.")
    for key in ("torch_dtype", "dtype"):
        _typed(llm, key, where, (str,), "a dtype name such as bfloat16")


def _check_vision_fields(vision: dict, where: str) -> None:
    """The fields the vision encoder is built from, beyond its sizes."""
    _names_list(vision, "architectures", where)
    _choice(vision, "norm_type", where, VISION_NORMS)
    _number(vision, "layer_norm_eps", where, 0, 0.1)
    _choice(vision, "hidden_act", where, ACTIVATIONS)
    _number(vision, "initializer_factor", where, -1e6, 1e6)
    for key in ("qkv_bias", "qk_normalization"):
        _typed(vision, key, where, (bool,), "true or false")


def _check_top_fields(raw: dict, source: str) -> None:
    _names_list(raw, "architectures", source)
    _typed(raw, "template", source, (str,), "a template name or null")
    for key in ("dynamic_image_size", "use_thumbnail"):
        _typed(raw, key, source, (bool,), "true or false")
    _typed(raw, "quantization_config", source, (dict,), "an object")


def _divides(a_key: str, a: int, b_key: str, b: int, where: str) -> None:
    if a % b:
        raise UserError(f"{where} {a_key} {a} is not divisible by {b_key} {b}, as the model needs.")


def validate_raw(raw: dict[str, Any], source: str) -> None:
    """Types, plausible sizes and the divisibility the model needs, before any table is built."""
    llm, vision = raw["llm_config"], raw["vision_config"]
    if not isinstance(llm, dict) or not isinstance(vision, dict):
        raise UserError(f"{source} has a vision_config or llm_config that is not an object.")
    lw, vw = f"{source}: llm_config", f"{source}: vision_config"
    _check_top_fields(raw, source)
    _check_llm_fields(llm, lw)
    _check_vision_fields(vision, vw)
    for key, limit in _LLM_INTS.items():
        if key in llm or key not in _LLM_OPTIONAL:
            _int_setting(llm, key, limit, lw)
    if llm.get("head_dim") is not None:
        _int_setting(llm, "head_dim", 1 << 14, lw)
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads", heads)
    if llm.get("head_dim") is None:
        _divides("hidden_size", llm["hidden_size"], "num_attention_heads", heads, lw)
    _divides("num_attention_heads", heads, "num_key_value_heads", kv, lw)
    for key, limit in _VISION_INTS.items():
        if key in vision or key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _int_setting(vision, key, limit, vw)
    _divides("hidden_size", vision["hidden_size"], "num_attention_heads", vision["num_attention_heads"], vw)
    for key, limit in _TOP_INTS.items():
        if raw.get(key) is not None:
            _int_setting(raw, key, limit, source)
    if raw.get("select_layer") is not None:
        _int_setting(raw, "select_layer", vision["num_hidden_layers"], source, minimum=-vision["num_hidden_layers"])
    patch = vision.get("patch_size", 14)
    image = raw.get("force_image_size") or vision.get("image_size", 448)
    _divides("image size", image, "patch_size", patch, vw)
    ratio = raw.get("downsample_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UserError(f"{source} downsample_ratio is {ratio!r}; it must be a number in (0, 1].")
    side = (image // patch) * ratio
    if abs(side - round(side)) > 1e-9 or abs(vision["hidden_size"] / ratio**2 - round(vision["hidden_size"] / ratio**2)) > 1e-9:
        raise UserError(f"{source} downsample_ratio {ratio} does not divide the {image // patch}-patch grid "
                        "into whole tokens.")


def parse_config(raw: Any, source: str = "config.json") -> R1VConfig:
    """The one reader of a model's config: every field the model, transformers or torch reads is
    checked here, so a malformed config is refused in one sentence before anything is created."""
    if not isinstance(raw, dict):
        raise UserError(f"{source} holds {_json_kind(raw)}, not a JSON object, so it is not a model config.")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source} has model_type {model_type!r}; r1v-quant supports "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Skywork-R1V and InternVL-chat with a Qwen2 LLM)."
        )
    if "vision_config" not in raw or "llm_config" not in raw:
        raise UserError(f"{source} has no vision_config or llm_config, so it is not an InternVL-chat layout.")
    if not isinstance(raw["llm_config"], dict) or not isinstance(raw["vision_config"], dict):
        raise UserError(f"{source} has a vision_config or llm_config that is not an object.")
    _names_list(raw["llm_config"], "architectures", f"{source}: llm_config")
    archs = raw["llm_config"].get("architectures") or ["Qwen2ForCausalLM"]
    if archs[0] not in SUPPORTED_LLM_ARCHS:
        raise UserError(f"{source} has a {archs[0]} language model; r1v-quant supports Qwen2ForCausalLM only.")
    validate_raw(raw, source)
    llm = dict(raw["llm_config"])
    top = {k: raw[k] for k in (
        "select_layer", "downsample_ratio", "ps_version", "template", "force_image_size",
        "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch",
    ) if k in raw and raw[k] is not None}
    for key, default in VENDOR_DEFAULTS.items():
        top.setdefault(key, default)
    ps = top["ps_version"]
    if ps not in ("v1", "v2"):
        raise UserError(f"{source} has ps_version {ps!r}; expected 'v1' or 'v2'.")
    return R1VConfig(
        raw=raw,
        vision=_vision_from(raw["vision_config"]),
        llm=llm,
        quantization=raw.get("quantization_config"),
        **top,
    )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def load_config(model_dir: Path) -> R1VConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json, so it is not a model folder.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    except OSError as e:
        raise UserError(f"{path} could not be read ({e.strerror or e}).") from None
    return parse_config(raw, str(path))
