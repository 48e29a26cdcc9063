"""`plan`: what the bf16 model and its AWQ export weigh, and what fits each GPU, from a config alone.

The bytes, the KV cache per token and vLLM's reserve are `model/footprint.py`'s arithmetic; the
compromises that lengthen the context, and the best recipe per card, are `compromises.py`'s.
For a card that falls short, the plan also lists each compromise alone and what it would give.

Card sizes are taken as GiB (what `nvidia-smi` reports for a "24 GB" card is about 24 GiB; an
"80 GB" H100 reports about 79.6 GiB). Pass `gpu_mems` (e.g. "81559MiB") to plan for an exact card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from r1v_quant.deploy import compromises
from r1v_quant.deploy.compromises import Basis, Recipe
from r1v_quant.deploy.vllm_args import how
from r1v_quant.errors import UserError
from r1v_quant.int4.format import DEFAULT_GROUP_SIZE, read_quantization_config
from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.footprint import (
    COMPONENT_LABELS,
    COMPONENTS,
    DEFAULT_MAX_BATCHED_TOKENS,
    LM_HEAD,
    LONG_CONTEXT,
    MIN_USEFUL_CONTEXT,
    Reserve,
    bytes_by_component,
    context_tokens,
    estimate_reserve,
    export_tensor_specs,
    fit_status,
    kv_bytes_per_token,
    model_dtype,
    params_by_component,
    source_tensor_specs,
    vision_int8_saving,
)
from r1v_quant.model.layout import checkpoint_shapes
from r1v_quant.units import GiB, parse_size

DEFAULT_CARDS_GIB = (24, 32, 40, 48, 80)
DEFAULT_SERVE_CARD_GIB = 48            # what serve plans for when it finds no GPU and is given no --gpu-mem
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)



def parse_gpu_mems(text: str | None) -> list[tuple[str, int]]:
    """'24GiB,30GB' -> [(label, bytes)]; None -> the default cards 24/32/40/48/80 (as GiB)."""
    if text is None:
        return [(f"{g} GB", g * GiB) for g in DEFAULT_CARDS_GIB]
    entries = [t.strip() for t in text.split(",")]
    if not any(entries):
        raise UserError("--gpu-mem is empty; pass sizes such as 24GiB,30GB.")
    if not all(entries):
        place = entries.index("") + 1
        raise UserError(f"--gpu-mem {text!r} has an empty entry (number {place}); pass sizes such as 24GiB,48GiB "
                        "with one comma between each two.")
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
    best: Recipe | None = None    # the cheapest recipe reaching the longest goal, images kept (compromises.py)
    best_text_only: Recipe | None = None


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
    basis: Basis | None = None    # what `compromises` starts from, for other cards or vLLM versions

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
                    out[key].update(title=recipe.title, vllm=compromises.vllm_needed(recipe), how=how(recipe))
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
    and the best recipe per card (`compromises.py`).

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
        group_size = DEFAULT_GROUP_SIZE
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
    # Text only: the tower is not built (the newest vLLM's behaviour; `compromises` checks the version).
    basis = Basis(cfg, util, kv_dtype, weights if images else weights - tower, tower if images else 0,
                          lm_head_saving, max_batched_tokens, max_dynamic_patch, images, max_pos)
    if not images:
        notes.append(f"text only: the vision encoder and mlp1 ({tower / GiB:.2f} GiB) are not built (vLLM "
                     f">= {compromises.FEATURES['text-only'].min_version}).")
    cards = []
    for label, gpu in (gpu_mems or parse_gpu_mems(None)):
        card = _fit(label, gpu, util, basis.weights, reserve.total, per_token, max_pos)
        # The best recipe keeps images; the text-only one is shown beside it.
        card.best = compromises.best_recipe(basis, gpu, frozenset(compromises.COMPROMISES) - {"text-only"})
        if images:
            card.best_text_only = compromises.best_recipe(basis, gpu, required=frozenset({"text-only"}))
        if card.max_context < LONG_CONTEXT:
            card.suggestions = suggestions(basis, card)
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


# ---------------------------------------------------------------------------------------------
# What plan lists for a card that falls short


def suggestions(basis: Basis, card: CardFit) -> list[Suggestion]:
    """Each compromise alone on a card that falls short, with the context it would give (or how much
    memory would still be missing), then the image-keeping ones together, then the 8-bit vision
    encoder that r1v-quant does not write (for scale)."""
    out: list[Suggestion] = []

    def add(title: str, levers: frozenset[str], note: str) -> None:
        r = compromises.evaluate(basis, card.gpu_bytes, levers)
        per_token = kv_bytes_per_token(basis.cfg, r.kv_dtype)
        if r.host_pinned:
            note = f"{note}; {r.host_pinned / GiB:.1f} GiB pinned host RAM, >= {r.encode_seconds:.2f} s per image step"
        out.append(Suggestion(title, how(r), r.max_context, r.status,
                              max(0, MIN_USEFUL_CONTEXT * per_token - r.kv_room), note, compromises.vllm_needed(r)))

    pool = compromises.candidates(basis, frozenset(compromises.COMPROMISES), frozenset(), None)
    singles = [next(iter(s)) for s in pool if len(s) == 1]
    for name in singles:
        add(compromises.TITLES[name], frozenset({name}), compromises.NOTES[name])
    keeping = frozenset(n for n in singles if n != "text-only")
    if len(keeping) > 1:
        add("all but text only together", keeping, "images kept")
    if "text-only" in singles and len(singles) > 1:
        add("text only with the cheaper ones", frozenset(n for n in singles if n in ("util-95", "fp8-kv", "lm-head-4bit",
                                                                                   "text-only")), "no image inputs")
    if not basis.images:
        return out
    saving = vision_int8_saving(basis.cfg)
    room = int(card.gpu_bytes * basis.util) - (card.weights_bytes - saving) - card.reserve_bytes
    per_token = kv_bytes_per_token(basis.cfg, basis.kv_dtype)
    tokens = context_tokens(room, per_token)
    out.append(Suggestion("8-bit vision encoder", "int8 weight-only vision linears", tokens, fit_status(tokens),
                          max(0, MIN_USEFUL_CONTEXT * per_token - room),
                          f"saves {saving / GiB:.1f} GiB; a format r1v-quant does not write and vLLM's AWQ config "
                          "cannot express", "-"))
    return out
