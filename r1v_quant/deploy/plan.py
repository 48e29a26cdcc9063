"""Memory planning from a config alone: what the bf16 model and the AWQ export weigh, and what fits a GPU.

Everything here is arithmetic on the tensor shapes that `layout.py` derives from `config.json`;
no weights are read.

Bytes
-----
The export is the source checkpoint with every Qwen2 decoder linear (q, k, v, o, gate, up, down)
replaced by its AutoAWQ GEMM tensors (`layout.awq_shapes`: qweight/qzeros int32, scales float16)
and every other tensor copied unchanged in the model dtype. `export_tensor_specs` lists those
tensors name by name, so the predicted export size equals the sum of the tensor bytes in the
export's safetensors files exactly (headers, tokenizer and config files are not counted). An
export written with `awq --quantize-lm-head` (`"lm_head": true`) stores lm_head the same way; one
written with `awq --keep-bf16` keeps the decoder linears its `modules_to_not_convert` names in the
model dtype (`quant/keep.py` plans how many a card has room for).

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
and the other compromises that lengthen the context are `recipes.py`'s; each card gets the best
recipe there.

Card sizes are taken as GiB (what `nvidia-smi` reports for a "24 GB" card is about 24 GiB; an
"80 GB" H100 reports about 79.6 GiB). Pass `gpu_mems` (e.g. "81559MiB") to plan for an exact card.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from r1v_quant.deploy import recipes
from r1v_quant.deploy.units import KV_DTYPE_BYTES, GiB, dtype_bytes, parse_size, spec_bytes
from r1v_quant.errors import UserError
from r1v_quant.int4.format import AWQ_LEAVES, awq_shapes, check_awq_shape, read_quantization_config
from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import checkpoint_shapes, is_quant_linear, llm_linear_shapes

DEFAULT_CARDS_GIB = (24, 32, 40, 48, 80)
DEFAULT_SERVE_CARD_GIB = 48            # what serve plans for when it finds no GPU and is given no --gpu-mem
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
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



# ---------------------------------------------------------------------------------------------
# Tensors and bytes


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


def export_tensor_specs(cfg: R1VConfig, group_size: int = 128, dtype: str | None = None,
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


# ---------------------------------------------------------------------------------------------
# Reserve and context


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


def parse_gpu_mems(text: str | None) -> list[tuple[str, int]]:
    """'24GiB,30GB' -> [(label, bytes)]; None -> the default cards 24/32/40/48/80 (as GiB)."""
    if text is None:
        return [(f"{g} GB", g * GiB) for g in DEFAULT_CARDS_GIB]
    entries = [t.strip() for t in text.split(",") if t.strip()]
    if not entries:
        raise UserError("--gpu-mem is empty; pass sizes such as 24GiB,30GB.")
    return [(t, parse_size(t)) for t in entries]


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class ComponentSize:
    name: str
    label: str
    params: int
    source_bytes: int
    export_bytes: int


@dataclass
class Suggestion:
    title: str
    how: str
    max_context: int
    status: str
    short_by_bytes: int       # memory still missing for a MIN_USEFUL_CONTEXT context (0 when it is reached)
    note: str = ""
    vllm: str = ""            # the vLLM version it needs


@dataclass
class CardFit:
    label: str
    gpu_bytes: int
    budget_bytes: int
    weights_bytes: int
    reserve_bytes: int
    kv_room_bytes: int
    max_context: int          # tokens of KV cache that fit (whole 16-token blocks)
    max_model_len: int        # what to pass to vLLM: min(max_context, max_position_embeddings)
    status: str               # "ok", "short" (< 32k tokens) or "no" (< 4k tokens)
    reason: str = ""
    suggestions: list[Suggestion] = field(default_factory=list)
    best: recipes.Recipe | None = None    # the cheapest recipe reaching the longest goal, images kept (recipes.py)
    best_text_only: recipes.Recipe | None = None


@dataclass
class Plan:
    source: str
    model_type: str
    model_dtype: str
    bits: int
    group_size: int
    already_quantized: bool
    components: list[ComponentSize]
    source_total: int
    export_total: int
    kv_dtype: str
    kv_bytes_per_token: int
    util: float
    reserve: Reserve
    max_position_embeddings: int
    cards: list[CardFit]
    notes: list[str]
    lm_head_4bit: bool = False
    basis: recipes.Basis | None = None    # what `recipes` starts from, for other cards or vLLM versions

    def component(self, name: str) -> ComponentSize:
        return next(c for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        basis, self.basis = self.basis, None
        try:
            d = asdict(self)
        finally:
            self.basis = basis
        d.pop("basis", None)
        d["reserve"] = self.reserve.to_dict()
        for card, out in zip(self.cards, d["cards"]):
            for key in ("best", "best_text_only"):
                recipe = getattr(card, key)
                if recipe is not None:
                    out[key].update(title=recipe.title, vllm=recipes.vllm_needed(recipe), how=recipes.how(recipe))
        return d


def _fit(label: str, gpu: int, util: float, weights: int, reserve: int, per_token: int, max_pos: int) -> CardFit:
    budget = int(gpu * util)
    room = budget - weights - reserve
    tokens = context_tokens(room, per_token)
    card = CardFit(label, gpu, budget, weights, reserve, room, tokens, min(tokens, max_pos), fit_status(tokens))
    if weights > budget:
        card.reason = (f"the weights alone ({weights / GiB:.1f} GiB) exceed {util:.0%} of the card "
                       f"({budget / GiB:.1f} GiB) by {(weights - budget) / GiB:.1f} GiB")
    elif room <= 0:
        card.reason = (f"weights {weights / GiB:.1f} GiB + reserve {reserve / GiB:.1f} GiB exceed the "
                       f"{budget / GiB:.1f} GiB budget by {-room / GiB:.1f} GiB")
    else:
        card.reason = f"{room / GiB:.1f} GiB left for the KV cache"
    return card


def make_plan(cfg: R1VConfig, *, source: str = "", group_size: int | None = None, kv_dtype: str = "bf16",
              util: float = 0.9, gpu_mems: list[tuple[str, int]] | None = None,
              max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS, max_dynamic_patch: int | None = None,
              images: bool = True, lm_head: bool | None = None) -> Plan:
    """Plan bytes and context lengths for the AWQ export of `cfg` (or for `cfg` itself when already quantised),
    and the best recipe per card (`recipes.py`).

    `images=False` plans a text-only server (vLLM `--limit-mm-per-prompt '{"image": 0}'`), which
    builds no vision encoder and profiles no vision activations. `lm_head=True` plans an export
    written with `awq --quantize-lm-head`; an existing export's own `"lm_head"` decides otherwise.
    """
    if not 0 < util <= 1:
        raise UserError(f"--util {util} must lie in (0, 1], e.g. 0.9.")
    notes: list[str] = []
    kept: frozenset[str] = frozenset()
    qcfg = cfg.quantization if cfg.quantization is not None else cfg.llm.get("quantization_config")
    already = qcfg is not None
    bits = 4
    if already:
        qc = read_quantization_config(qcfg, source or "the config")
        if not qc.is_awq:
            raise UserError(f"{source or 'the config'} is quantised with {qc.quant_method or 'an unnamed method'}; "
                            "plan knows AWQ only.")
        bits = 4 if qc.bits is None else qc.bits
        if bits != 4:
            raise UserError(f"{source or 'the config'} uses {bits}-bit AWQ; only 4-bit is supported.")
        found = qc.group_size
        if group_size is not None and group_size != found:
            raise UserError(f"{source or 'the folder'} is already quantised with group size {found}; "
                            f"drop --group-size or pass {found}.")
        if lm_head is not None and lm_head != qc.lm_head:
            raise UserError(f"{source or 'the folder'} was exported with lm_head {'4-bit' if qc.lm_head else 'in bf16'}; "
                            "re-export to change it.")
        group_size, lm_head = found, qc.lm_head
        from r1v_quant.model.kept import kept_linears

        kept = frozenset(kept_linears(cfg.num_layers, qc.modules_to_not_convert))
        if kept:
            notes.append(f"{len(kept)} decoder linears are kept in bf16 (modules_to_not_convert).")
        notes.append(f"{source or 'the config'} already holds an AWQ quantization_config (group size {found}"
                     f"{', 4-bit lm_head' if qc.lm_head else ''}): planned as that export, assuming the standard "
                     "layout (LLM decoder linears quantised but those modules_to_not_convert keeps, the rest unchanged).")
    if group_size is None:
        group_size = 128
    lm_head = bool(lm_head) and LM_HEAD + ".weight" in checkpoint_shapes(cfg)
    if group_size not in MARLIN_GROUP_SIZES:
        notes.append(f"group size {group_size} is not one vLLM's Marlin kernels take (-1/32/64/128): it would fall back "
                     "to the slower fp16-only AWQ kernel, which overflows on Qwen2.")
    dtype = model_dtype(cfg)
    src_specs = source_tensor_specs(cfg, dtype)
    exp_specs = export_tensor_specs(cfg, group_size, dtype, lm_head=lm_head, kept=kept)
    src_b, exp_b, params = bytes_by_component(src_specs), bytes_by_component(exp_specs), params_by_component(cfg)
    names = [c for c in COMPONENTS] + [c for c in src_b if c not in COMPONENTS and (src_b[c] or exp_b.get(c))]
    components = [ComponentSize(c, COMPONENT_LABELS[c], params.get(c, 0), src_b.get(c, 0), exp_b.get(c, 0))
                  for c in names if src_b.get(c, 0) or exp_b.get(c, 0)]
    source_total, export_total = sum(src_b.values()), sum(exp_b.values())
    weights = export_total
    per_token = kv_bytes_per_token(cfg, kv_dtype)
    reserve = estimate_reserve(cfg, max_batched_tokens=max_batched_tokens, max_dynamic_patch=max_dynamic_patch,
                               dtype=dtype, images=images)
    max_pos = int(cfg.llm.get("max_position_embeddings") or 32768)
    lm_head_saving = 0
    if not lm_head and LM_HEAD + ".weight" in checkpoint_shapes(cfg):
        try:
            quantised = bytes_by_component(export_tensor_specs(cfg, group_size, dtype, lm_head=True))["lm_head"]
            lm_head_saving = exp_b["lm_head"] - quantised
        except UserError as e:        # e.g. R1V3's vocabulary of 151,674 does not pack 8 to an int32
            notes.append(f"no 4-bit lm_head for this model: {e}")
    tower = exp_b.get("vision", 0) + exp_b.get("projector", 0)
    # Text only: the tower is not built (the newest vLLM's behaviour; `recipes` checks the version).
    basis = recipes.Basis(cfg, util, kv_dtype, weights if images else weights - tower, tower if images else 0,
                          lm_head_saving, max_batched_tokens, max_dynamic_patch, images, max_pos)
    if not images:
        notes.append(f"text only: the vision encoder and mlp1 ({tower / GiB:.2f} GiB) are not built (vLLM "
                     f">= {recipes.FEATURES['text-only'].min_version}).")
    cards = []
    for label, gpu in (gpu_mems or parse_gpu_mems(None)):
        card = _fit(label, gpu, util, basis.weights, reserve.total, per_token, max_pos)
        # The best recipe keeps images; the text-only one is shown beside it.
        card.best = recipes.best_recipe(basis, gpu, frozenset(recipes.COMPROMISES) - {"text-only"})
        if images:
            card.best_text_only = recipes.best_recipe(basis, gpu, required=frozenset({"text-only"}))
        if card.max_context < LONG_CONTEXT:
            card.suggestions = recipes.suggestions(basis, card)
        cards.append(card)
    if already:
        notes.append("sizes are predicted from the config; `r1v-quant inspect` reads the real tensor bytes.")
    notes.append("serve with --dtype bfloat16: Marlin kernels take bf16 activations; fp16 AWQ kernels overflow on Qwen2.")
    return Plan(
        source=source, model_type=str(cfg.raw.get("model_type")), model_dtype=dtype, bits=bits, group_size=group_size,
        already_quantized=already, components=components, source_total=source_total, export_total=export_total,
        kv_dtype=kv_dtype, kv_bytes_per_token=per_token, util=util, reserve=reserve,
        max_position_embeddings=max_pos, cards=cards, notes=notes, lm_head_4bit=lm_head, basis=basis,
    )


def plan_model(spec: str, **kwargs: Any) -> Plan:
    """`make_plan` for a --model spec (folder, config file, Hugging Face id or alias)."""
    cfg, source = resolve_config(spec)
    return make_plan(cfg, source=source, **kwargs)
