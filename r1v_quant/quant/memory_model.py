"""Predicted peak device memory, host memory and disk of an `awq` run, from the config and settings alone.

The layer phase is what `chunks.plan_chunks` decides and `chunks.device_bytes` counts (the same
functions `quantize_layer` plans with), plus what they leave out: one sample's attention forward
and the clip search's fixed token sample. The front phase (vision encoder, projector and token
embeddings building the first layer's inputs) runs before it. With `--quantize-lm-head` the lm_head
phase runs after it (`head.head_plan`, what `quantize_head` plans with): at 38B lm_head's weight,
152064 x 5120, outweighs a decoder layer's (1.6 times the parameters), so it can set the device
peak and the smallest budget. The host holds the activations between layers (spilled to disk
past a threshold), the work folder's write buffer, and, when the plan puts them there, the stored
calibration tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1v_quant.int4.format import DEFAULT_GROUP_SIZE
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import llm_linear_shapes
from r1v_quant.quant.chunks import (
    ACT_BETWEEN_LAYERS,
    CLIP_TOKENS,
    MIN_CHUNK,
    ChunkPlan,
    chunk_token_bytes,
    device_bytes,
    gptq_bytes,
    plan_chunks,
)

GiB = 1024**3
# Python, torch and transformers once imported (CPU); with CUDA the runtime's host libraries add more.
HOST_BASE = {"cpu": int(0.6 * GiB), "cuda": int(1.5 * GiB)}
# Hidden-width values alive per token of one sample's attention forward (normed input, q, attention
# output, o_proj output, residual, concatenated MLP output) plus k and v at the KV width.
ATTENTION_HIDDEN = 6
# The clip search: a sample of CLIP_TOKENS tokens against CLIP_ROWS output rows at a time, float32,
# with the original and the clipped products and their error alive together.
CLIP_ROWS = 256
CLIP_COPIES = 3


@dataclass(frozen=True)
class Prediction:
    tokens: int
    budget: int
    plan: ChunkPlan
    device_peak: int
    host_peak: int
    disk: int
    spilled: int                      # activation bytes written to the offload folder
    min_budget: int                   # the smallest budget one layer (and lm_head, when quantised) fits in
    device_parts: dict[str, int] = field(default_factory=dict)
    host_parts: dict[str, int] = field(default_factory=dict)
    min_budget_phase: str = "layer"   # which phase sets min_budget: "layer" or "lm_head"

    @property
    def stored_activations(self) -> int:
        """What grows with the calibration size on the host: the peak less the size-independent parts."""
        return sum(v for k, v in self.host_parts.items() if k in GROWING)


# On CPU the layer's stored tensors and down_proj inputs are host memory too ("stored", "down inputs").
GROWING = ("activations in RAM", "next layer's inputs", "work-folder write", "stored tensors (host)",
           "down inputs (host)", "stored", "down inputs")


def auto_spill_above(available_host: int) -> int:
    """RAM the activations between layers may take before spilling: a quarter of what is free, at least 1 GiB.

    The rest stays for the process, the next layer's inputs, the work folder's write buffer and,
    on CPU or past the device budget, the stored calibration tensors.
    """
    return max(GiB, available_host // 4)


def calibration_tokens(samples: int, seq_len: int, max_tokens: int) -> int:
    """The most tokens a calibration set of these settings can hold."""
    return max(1, min(samples * seq_len, max_tokens))


def layer_weight_bytes(cfg: R1VConfig, act_bytes: int) -> int:
    shapes = llm_linear_shapes(cfg, 0)
    return (sum(o * i for o, i in shapes.values()) + 2 * cfg.hidden_size) * act_bytes


def config_plan(cfg: R1VConfig, tokens: int, budget: int, act_bytes: int) -> ChunkPlan:
    """The plan `quantize_layer` makes for a layer of this config, from its shapes alone."""
    return plan_chunks(tokens, cfg.hidden_size, int(cfg.llm["intermediate_size"]), layer_weight_bytes(cfg, act_bytes),
                       budget, act_bytes)


def _fixed_layer_bytes(cfg: R1VConfig, seq_len: int, group_size: int, act_bytes: int) -> dict[str, int]:
    llm = cfg.llm
    heads = int(llm["num_attention_heads"])
    kv_width = int(llm.get("num_key_value_heads", heads)) * int(llm.get("head_dim") or cfg.hidden_size // heads)
    rows, widest = max(((o, i) for o, i in llm_linear_shapes(cfg, 0).values()), key=lambda s: s[1])
    return {"attention sample": seq_len * (ATTENTION_HIDDEN * cfg.hidden_size + 2 * kv_width) * act_bytes,
            "clip search": CLIP_COPIES * min(CLIP_ROWS, rows) * (widest // group_size) * CLIP_TOKENS * 4
            + CLIP_TOKENS * (3 * cfg.hidden_size + widest) * act_bytes}


def front_bytes(cfg: R1VConfig, act_bytes: int) -> dict[str, int]:
    """The front phase on the device: its weights in the run's dtype and one largest image's activations."""
    from r1v_quant.model.footprint import estimate_reserve, params_by_component

    params = params_by_component(cfg)
    weights = sum(params.get(c, 0) for c in ("vision", "projector", "embeddings")) * act_bytes
    vision = estimate_reserve(cfg, max_batched_tokens=1, dtype="float32" if act_bytes == 4 else "bfloat16")
    return {"front weights": weights, "image activations": vision.vision_activations}


def head_bytes(cfg: R1VConfig, tokens: int, budget: int, group_size: int, act_bytes: int) -> tuple[dict[str, int], int]:
    """lm_head's phase on the device, by part, and the smallest budget it fits in."""
    from r1v_quant.quant.chunks import head_chunk_token_bytes
    from r1v_quant.quant.head import head_plan, head_weight_bytes

    hidden, vocab = cfg.hidden_size, int(cfg.llm["vocab_size"])
    weights = head_weight_bytes(cfg, act_bytes)
    plan = head_plan(cfg, tokens, budget, act_bytes)
    per_token = head_chunk_token_bytes(hidden, vocab, act_bytes)
    parts = {"lm_head weights": 2 * weights, "lm_head chunk": plan.chunk_tokens * per_token,
             "lm_head inputs": tokens * hidden * act_bytes if plan.stored_on_device else 0,
             "lm_head clip search": CLIP_COPIES * min(CLIP_ROWS, vocab) * (hidden // group_size) * CLIP_TOKENS * 4
             + CLIP_TOKENS * hidden * act_bytes}
    return parts, 2 * weights + MIN_CHUNK * per_token


def predict(cfg: R1VConfig, tokens: int, budget: int, *, device: str = "cuda", act_bytes: int = 2,
            seq_len: int = 2048, group_size: int = DEFAULT_GROUP_SIZE, spill_above: int | None = None,
            offload: bool = True, lm_head: bool = False, gptq: bool = False) -> Prediction:
    """Peaks of an `awq` run over `tokens` calibration tokens within a device budget of `budget` bytes.

    `device` is "cuda" or "cpu" (on CPU the device is the host, so the host peak includes the
    device's). `spill_above`: RAM kept for the activations between layers before they go to the
    offload folder (None: never spilled). `lm_head`: the run quantises lm_head too. `gptq`: the
    codes come from `--rounding gptq`, whose phase after the searches (`chunks.gptq_bytes`) is a
    phase of its own: the device peak is the larger of the two, and the smallest budget holds both.
    """
    from pathlib import Path

    from r1v_quant.quant.space import run_needs

    hidden, inter = cfg.hidden_size, int(cfg.llm["intermediate_size"])
    weights = layer_weight_bytes(cfg, act_bytes)
    plan = config_plan(cfg, tokens, budget, act_bytes)
    fixed = _fixed_layer_bytes(cfg, min(seq_len, tokens), group_size, act_bytes)
    layer = {**device_bytes(plan, tokens, hidden, inter, weights, act_bytes), **fixed}
    front = front_bytes(cfg, act_bytes)
    # The floor `awq` refuses below: the plan's smallest chunk beside the weights, and one sample's attention.
    min_budget = 2 * weights + MIN_CHUNK * chunk_token_bytes(hidden, inter, act_bytes) + fixed["attention sample"]
    rounding: dict[str, int] = {}
    if gptq:
        rows, widest = max(((o, i) for o, i in llm_linear_shapes(cfg, 0).values()), key=lambda s: (s[1], s[0]))
        rounding = {f"gptq: {k}": v for k, v in
                    gptq_bytes(plan, tokens, hidden, inter, weights, act_bytes, widest, rows).items()}
        smallest = gptq_bytes(ChunkPlan(MIN_CHUNK, False, False), tokens, hidden, inter, weights, act_bytes, widest, rows)
        min_budget = max(min_budget, sum(smallest.values()))
    head, head_min = head_bytes(cfg, tokens, budget, group_size, act_bytes) if lm_head else ({}, 0)
    phase = "lm_head" if head_min > min_budget else "layer"
    min_budget = max(min_budget, head_min)

    acts = tokens * hidden * ACT_BETWEEN_LAYERS
    in_ram = acts if not offload or spill_above is None else min(acts, spill_above)
    spilled = acts - in_ram
    host_layer = {"activations in RAM": in_ram, "next layer's inputs": tokens * hidden * act_bytes,
                  # safetensors serialises the next layer's inputs into one buffer before writing
                  "work-folder write": acts}
    if not plan.stored_on_device:
        stored = device_bytes(ChunkPlan(plan.chunk_tokens, True, False), tokens, hidden, inter, weights, act_bytes)
        host_layer["stored tensors (host)"] = stored["stored"]
    base = HOST_BASE["cuda" if device.startswith("cuda") else "cpu"]
    if device.startswith("cuda"):
        device_peak = max(sum(layer.values()), sum(rounding.values()), sum(front.values()), sum(head.values()))
        host_parts = {"process": base, **host_layer}
    else:
        device_peak = 0
        # On CPU each phase's device parts are host memory, beside the activations in RAM.
        phases = [({**layer, **host_layer}, sum(layer.values()) + sum(host_layer.values())),
                  ({**front, "activations in RAM": in_ram}, sum(front.values()) + in_ram)]
        if head:
            phases.append(({**head, "activations in RAM": in_ram}, sum(head.values()) + in_ram))
        if rounding:
            phases.append(({**rounding, **host_layer}, sum(rounding.values()) + sum(host_layer.values())))
        host_parts = {"process": base, **max(phases, key=lambda p: p[1])[0]}
    needs = run_needs(cfg, group_size, Path("out"), Path("work"), Path("offload") if offload else None,
                      spill_above if spill_above is not None else acts, tokens, False)
    return Prediction(tokens, budget, plan, device_peak, sum(host_parts.values()), sum(n.bytes for n in needs),
                      spilled, min_budget, {**layer, **rounding, **{f"front: {k}": v for k, v in front.items()}, **head},
                      host_parts, phase)


def largest_on_device(cfg: R1VConfig, budget: int, act_bytes: int = 2, ceiling: int = 1 << 22) -> int:
    """The most calibration tokens whose stored tensors the plan keeps on the device within `budget`."""
    lo, hi = 0, ceiling
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if config_plan(cfg, mid, budget, act_bytes).stored_on_device:
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_within_host(cfg: R1VConfig, budget: int, host_bytes: int, *, ceiling: int = 1 << 22,
                        **kwargs) -> int:
    """The most calibration tokens whose predicted host peak stays within `host_bytes`."""
    lo, hi = 0, ceiling
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict(cfg, mid, budget, **kwargs).host_peak <= host_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class CardCalibration:
    label: str
    card_bytes: int
    prediction: Prediction
    fits: bool                        # device peak within the default budget and host peak within host_bytes
    max_tokens_on_device: int         # largest calibration whose stored tensors stay on the card
    max_tokens_host: int              # largest calibration whose host peak stays within host_bytes


def plan_calibration(cfg: R1VConfig, cards: list[tuple[str, int]], tokens: int, *, seq_len: int = 2048,
                     group_size: int = DEFAULT_GROUP_SIZE, host_bytes: int = 32 * 10**9,
                     spill_above: int | None = None, lm_head: bool = False, gptq: bool = False) -> list[CardCalibration]:
    """`awq` on CUDA (bf16) for each card of (label, bytes): the default budget of a free card, the peaks, the limits."""
    from r1v_quant.quant.chunks import headroom_budget

    spill = auto_spill_above(host_bytes) if spill_above is None else spill_above
    kw = dict(device="cuda", act_bytes=2, seq_len=seq_len, group_size=group_size, spill_above=spill, lm_head=lm_head,
              gptq=gptq)
    out = []
    for label, size in cards:
        budget = headroom_budget(size)
        pred = predict(cfg, tokens, budget, **kw)
        fits = budget >= pred.min_budget and pred.device_peak <= budget and pred.host_peak <= host_bytes
        out.append(CardCalibration(label, size, pred, fits, largest_on_device(cfg, budget, 2),
                                   largest_within_host(cfg, budget, host_bytes, **kw)))
    return out
