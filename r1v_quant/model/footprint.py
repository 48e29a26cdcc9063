"""What a checkpoint and its AWQ export weigh, and what vLLM reserves beside them, from `config.json` alone.

Everything here is arithmetic on the tensor shapes that `layout.py` derives from the config; no
weights are read. The deployment planner (`deploy/`) and the quantiser's memory model (`quant/`)
both build on it.

Bytes
-----
The export is the source checkpoint with every Qwen2 decoder linear (q, k, v, o, gate, up, down)
replaced by its AutoAWQ GEMM tensors (`format.awq_shapes`: qweight/qzeros int32, scales float16)
and every other tensor copied unchanged in the model dtype. `export_tensor_specs` lists those
tensors name by name, so the predicted export size equals the sum of the tensor bytes in the
export's safetensors files exactly (headers, tokenizer and config files are not counted). An
export written with `awq --quantize-lm-head` (`"lm_head": true`) stores lm_head the same way.

Components: `vision` (vision_model.*), `projector` (mlp1.*), `llm_linears` (the seven decoder
linears: `.weight` in the source, qweight+qzeros+scales in the export), `llm_other` (RMSNorm
weights and the q/k/v biases, kept in the model dtype), `embeddings` (embed_tokens), `lm_head`.

GPU memory (vLLM's accounting, approximated)
--------------------------------------------
vLLM gives itself `util x total GPU memory`, loads the weights, profiles one forward pass at
the largest batch it will run, and turns what is left into KV cache. We predict that as

    KV room = util x card - export weights - reserve
    longest context = KV room // KV bytes per token, rounded down to vLLM's 16-token blocks

KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x bytes of the KV dtype.

The reserve is deliberately conservative (measured vLLM peaks are usually below it):
  * runtime      2 GiB: CUDA context and allocator slack, cuBLAS/Marlin workspaces, the CUDA-graph
                 pool for the default capture sizes, the sampler's buffers.
  * llm          one prefill chunk of `max_batched_tokens` (vLLM's --max-num-batched-tokens)
                 through the widest decoder layer: tokens x dtype x (3 x hidden + 3 x intermediate)
                 (residual, normed input, fused gate/up output, activation, output), plus fp32
                 logits and probabilities for 256 sequences.
  * vision       the vision encoder's activation for the images vLLM profiles at the most tiles
                 (max_dynamic_patch, plus the thumbnail): per tile, (1 + grid^2) tokens x dtype x
                 (5 x width + 2 x MLP width) (qkv, residual, norm, fc1 output and its GELU), plus the
                 pixel-shuffled tokens through mlp1 and the encoder cache of their embeddings. vLLM
                 V1 profiles as many max-size images as fit its encoder budget,
                 max(max_batched_tokens, tokens of one image), so a large chunk can mean two images.

Weights that are not resident (the vision encoder in host memory, or not built for text only)
and the other compromises that lengthen the context are `deploy/compromises.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from r1v_quant.errors import UserError
from r1v_quant.int4.format import AWQ_LEAVES, DEFAULT_GROUP_SIZE, awq_shapes, check_awq_shape
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import checkpoint_shapes, is_quant_linear, llm_linear_shapes
from r1v_quant.units import KV_DTYPE_BYTES, GiB, dtype_bytes, spec_bytes

BLOCK_TOKENS = 16                      # vLLM's KV block size
RUNTIME_RESERVE = 2 * GiB              # see the module docstring
SAMPLER_SEQS = 256                     # vLLM's default max_num_seqs
DEFAULT_MAX_BATCHED_TOKENS = 2048
MIN_USEFUL_CONTEXT = 4096              # one max-tile image (13 x 256 tokens) and a short answer
LONG_CONTEXT = 32768                   # room for an R1 chain of thought (the vendor allows 64k new tokens)
LM_HEAD = "language_model.lm_head"
COMPONENTS = ("vision", "projector", "llm_linears", "llm_other", "embeddings", "lm_head")
COMPONENT_LABELS = {
    "vision": "vision encoder (vision_model)",
    "projector": "projector (mlp1)",
    "llm_linears": "LLM decoder linears",
    "llm_other": "LLM norms and q/k/v biases",
    "embeddings": "embed_tokens",
    "lm_head": "lm_head",
    "other": "other tensors",
}


def model_dtype(cfg: R1VConfig) -> str:
    """The dtype untouched tensors are stored in: the config's torch_dtype, bfloat16 if unstated."""
    for src in (cfg.raw, cfg.llm):
        value = src.get("torch_dtype") or src.get("dtype")
        if value:
            name = str(value).removeprefix("torch.")
            if name in ("bfloat16", "float16", "float32"):
                return name
    return "bfloat16"


def component_of(name: str) -> str:
    """Which plan component a tensor (by checkpoint name) belongs to."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("mlp1."):
        return "projector"
    if name.startswith("language_model.model.embed_tokens."):
        return "embeddings"
    if name.startswith("language_model.lm_head."):
        return "lm_head"
    if name.startswith("language_model."):
        module, _, leaf = name.rpartition(".")
        if (leaf == "weight" or leaf in AWQ_LEAVES) and is_quant_linear(module):
            return "llm_linears"
        return "llm_other"
    return "other"


def check_linears_fit(cfg: R1VConfig, group_size: int) -> None:
    """Raise UserError unless every quantised linear can be packed with this group size."""
    for name, (out_f, in_f) in llm_linear_shapes(cfg, 0).items():
        check_awq_shape(out_f, in_f, group_size, name.split(".", 4)[-1])


def source_tensor_specs(cfg: R1VConfig, dtype: str | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the full-precision checkpoint: name -> (shape, dtype name)."""
    dtype = dtype or model_dtype(cfg)
    return {name: (tuple(shape), dtype) for name, shape in checkpoint_shapes(cfg).items()}


def export_tensor_specs(cfg: R1VConfig, group_size: int = DEFAULT_GROUP_SIZE, dtype: str | None = None,
                        lm_head: bool = False, kept: frozenset[str] | set[str] = frozenset()
                        ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of our AWQ GEMM export: name -> (shape, dtype name). `lm_head=True` is an export
    written with `awq --quantize-lm-head` (`"lm_head": true`): lm_head in the same AWQ layout. The
    decoder linears in `kept` (`awq --keep-bf16`) keep their weight in the model dtype."""
    dtype = dtype or model_dtype(cfg)
    check_linears_fit(cfg, group_size)
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, shape in checkpoint_shapes(cfg).items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module not in kept and (is_quant_linear(module) or (lm_head and module == LM_HEAD)):
            out_f, in_f = shape
            for suffix, (qshape, qdtype) in awq_shapes(out_f, in_f, group_size).items():
                specs[f"{module}.{suffix}"] = (tuple(qshape), qdtype)
        else:
            specs[name] = (tuple(shape), dtype)
    return specs


def bytes_by_component(specs: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, int]:
    out = {c: 0 for c in COMPONENTS}
    for name, (shape, dtype) in specs.items():
        comp = component_of(name)
        out[comp] = out.get(comp, 0) + spec_bytes(shape, dtype)
    return out


def params_by_component(cfg: R1VConfig) -> dict[str, int]:
    out = {c: 0 for c in COMPONENTS}
    for name, shape in checkpoint_shapes(cfg).items():
        comp = component_of(name)
        out[comp] = out.get(comp, 0) + math.prod(shape)
    return out


def kv_bytes_per_token(cfg: R1VConfig, kv_dtype: str = "bf16") -> int:
    """2 (K and V) x layers x KV heads x head_dim x bytes of the KV dtype."""
    key = kv_dtype.lower()
    if key not in KV_DTYPE_BYTES:
        raise UserError(f"KV cache dtype {kv_dtype!r} is not one of bf16, fp16, fp8.")
    kv_width = next(out for name, (out, _) in llm_linear_shapes(cfg, 0).items() if name.endswith("k_proj"))
    return 2 * cfg.num_layers * kv_width * KV_DTYPE_BYTES[key]


def max_tiles(cfg: R1VConfig, max_dynamic_patch: int | None = None) -> int:
    """Tiles of the largest image: max_dynamic_patch, plus the thumbnail when tiling adds one."""
    if not cfg.dynamic_image_size:
        return 1
    most = cfg.max_dynamic_patch if max_dynamic_patch is None else max_dynamic_patch
    if most < 1:
        raise UserError(f"max_dynamic_patch {most} is below 1.")
    return most + (1 if cfg.use_thumbnail and most > 1 else 0)


@dataclass
class Reserve:
    runtime: int
    llm_activations: int
    vision_activations: int
    images_profiled: int
    tiles_per_image: int
    max_batched_tokens: int

    @property
    def total(self) -> int:
        return self.runtime + self.llm_activations + self.vision_activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def estimate_reserve(cfg: R1VConfig, max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
                     max_dynamic_patch: int | None = None, dtype: str | None = None,
                     images: bool = True) -> Reserve:
    """The activation/runtime reserve described in the module docstring."""
    if max_batched_tokens < 1:
        raise UserError(f"--max-num-batched-tokens {max_batched_tokens} is below 1.")
    b = dtype_bytes(dtype or model_dtype(cfg))
    d = cfg.hidden_size
    f = int(cfg.llm["intermediate_size"])
    vocab = int(cfg.llm["vocab_size"])
    llm = max_batched_tokens * b * (3 * d + 3 * f) + SAMPLER_SEQS * vocab * 4 * 2
    tiles = max_tiles(cfg, max_dynamic_patch)
    vision = 0
    n_images = 0
    if images:
        v = cfg.vision
        tokens_per_tile = 1 + v.grid * v.grid
        image_tokens = tiles * cfg.num_image_token
        n_images = max(1, max(max_batched_tokens, image_tokens) // image_tokens)
        shuffled_width = int(v.hidden_size / cfg.downsample_ratio**2)
        per_tile = (tokens_per_tile * b * (5 * v.hidden_size + 2 * v.intermediate_size)
                    + cfg.num_image_token * b * (2 * shuffled_width + 2 * d))
        encoder_cache = image_tokens * d * b
        vision = n_images * (tiles * per_tile + encoder_cache)
    return Reserve(RUNTIME_RESERVE, llm, vision, n_images, tiles, max_batched_tokens)


def context_tokens(room: int, per_token: int) -> int:
    """Whole KV blocks that fit in `room` bytes, in tokens (0 when nothing fits)."""
    if room <= 0:
        return 0
    return (room // per_token) // BLOCK_TOKENS * BLOCK_TOKENS


def fit_status(tokens: int) -> str:
    if tokens < MIN_USEFUL_CONTEXT:
        return "no"
    if tokens < LONG_CONTEXT:
        return "short"
    return "ok"


def vision_int8_saving(cfg: R1VConfig) -> int:
    """Bytes saved by storing the vision encoder's linear weights as int8 with one fp16 scale per output row."""
    b = dtype_bytes(model_dtype(cfg))
    saved = 0
    for name, shape in checkpoint_shapes(cfg).items():
        if name.startswith("vision_model.encoder.") and name.endswith(".weight") and len(shape) == 2:
            out_f, in_f = shape
            saved += out_f * in_f * (b - 1) - out_f * 2
    return saved
