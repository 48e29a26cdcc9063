"""The trace phase of `awq --traces self|bootstrap`, and the wall time of every phase, predicted from the config.

Which path writes the traces
----------------------------
Traces are the greedy replies of a model to the calibration prompts, each up to
``prompt + max_trace_tokens`` tokens of context. Three paths can write them:

* **vLLM, full precision**: the bf16 weights split over ``gpus`` cards (tensor parallel), vLLM's
  reserve (`deploy.plan.estimate_reserve`) on each, and the rest of ``util x card`` as KV cache;
  as many sequences decode together as that KV room holds.
* **transformers, full precision**: our runtime's ``generate`` on one device, one prompt at a time:
  the bf16 weights, one sequence's KV cache, one prompt's prefill activations and one largest
  image's vision activations, within the device budget `awq` uses (the card less max(2 GiB, 10%)).
* **vLLM, 4-bit** (a bootstrap export, or one given with ``--trace-model``): the card's best serving
  recipe from `deploy.plan` (tower offload, fp8 KV and so on); it fits when that recipe's
  ``max_model_len`` holds one trace's context.

`choose_path` takes them in that order (the first that fits), unless an engine or model is asked for.

Time
----
Stated assumptions, per card (`deploy.cards`: published dense bf16 peak and bandwidth), scaled by
``gpus`` for tensor parallel and by the efficiencies below:

* a forward pass costs ``2 x parameters`` FLOPs per token (the language model's parameters;
  the vision encoder is not counted);
* a decode step reads the language model's weights once for the whole batch, plus the batch's KV
  cache at the average context, and takes the longer of that read and the step's FLOPs;
* the layer loop runs ``grid + 4`` forward passes of each layer's linears over every calibration
  token (one float pass, ``grid`` scale-search passes, the round-to-nearest and AWQ error passes,
  the quantised pass feeding the next layer), and reads the source weights from disk once;
* the export reads the rest of the source and writes the export at the disk's rate.

The figures are for a user to tell an hour from a day; `scripts/gpu-check.sh` prints them beside
what it measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from r1v_quant.deploy.cards import CardSpec, card_for
from r1v_quant.errors import UserError
from r1v_quant.int4.format import DEFAULT_GROUP_SIZE
from r1v_quant.model.config import R1VConfig
from r1v_quant.units import human_bytes

TRACE_ENGINES = ("transformers", "vllm")
# Shares of the published peaks that real kernels reach: large bf16 GEMMs reach about half of the
# tensor peak over a whole run; decode kernels stream weights at about 80% of the bandwidth.
COMPUTE_EFFICIENCY = 0.5
BANDWIDTH_EFFICIENCY = 0.8
DISK_BYTES_PER_S = 1e9        # reading the source shards and writing the export (a local NVMe, conservatively)
EXTRA_PASSES = 4              # forward passes per layer besides the grid's (see the module docstring)
VLLM_UTIL = 0.9
FULL, FOUR_BIT = "full precision (bf16)", "4-bit"


@dataclass(frozen=True)
class TraceJob:
    """What the trace phase is asked for: how many prompts, how long each one and its trace may be."""

    samples: int
    prompt_tokens: int            # the longest prompt, counted as --seq-len
    trace_tokens: int             # --max-trace-tokens

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.trace_tokens


@dataclass(frozen=True)
class TracePath:
    engine: str                   # "vllm" or "transformers"
    model: str                    # FULL or FOUR_BIT
    gpus: int                     # devices the engine spans
    device_bytes: int             # predicted use per device
    budget: int                   # what one device offers
    batch: int                    # sequences decoded together (0: not even one fits)
    weight_bytes: int             # weights read per decode step (the language model's, all devices together)
    kv_per_token: int = 0         # KV cache bytes per token of context (all devices together)
    levers: tuple[str, ...] = ()  # the serving recipe's compromises (4-bit through vLLM)
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.batch >= 1 and self.device_bytes <= self.budget

    def devices(self, card_label: str) -> str:
        if self.gpus == 1:
            return f"1 x {card_label}"
        return f"{self.gpus} x {card_label} (tensor parallel {self.gpus})"

    def describe(self, card_label: str) -> str:
        recipe = f", recipe {' + '.join(self.levers)}" if self.levers else ""
        return f"{self.engine}, {self.model}, on {self.devices(card_label)}{recipe}"


def weight_totals(cfg: R1VConfig, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, int]:
    """Bytes of the whole bf16 model, of its language model, and of the export's whole and language model."""
    from r1v_quant.model.footprint import bytes_by_component, export_tensor_specs, source_tensor_specs

    tower = ("vision", "projector")
    src = bytes_by_component(source_tensor_specs(cfg, "bfloat16"))
    exp = bytes_by_component(export_tensor_specs(cfg, group_size, "bfloat16"))
    return {"source": sum(src.values()), "source llm": sum(v for k, v in src.items() if k not in tower),
            "export": sum(exp.values()), "export llm": sum(v for k, v in exp.items() if k not in tower)}


def llm_params(cfg: R1VConfig) -> int:
    from r1v_quant.model.footprint import params_by_component

    return sum(v for k, v in params_by_component(cfg).items() if k not in ("vision", "projector"))


def transformers_path(cfg: R1VConfig, job: TraceJob, budget: int, weights: int, llm_weights: int,
                      model: str = FULL) -> TracePath:
    """Our runtime's generate on one device, one prompt at a time."""
    from r1v_quant.model.footprint import estimate_reserve, kv_bytes_per_token

    inter = int(cfg.llm["intermediate_size"])
    parts = {"weights": weights, "KV cache (one sequence)": kv_bytes_per_token(cfg, "bf16") * job.context,
             "prefill activations": job.prompt_tokens * (3 * cfg.hidden_size + 3 * inter) * 2,
             "vision activations": estimate_reserve(cfg, max_batched_tokens=1, dtype="bfloat16").vision_activations}
    return TracePath("transformers", model, 1, sum(parts.values()), budget, 1, llm_weights,
                     kv_bytes_per_token(cfg, "bf16"), parts=parts)


def vllm_full_path(cfg: R1VConfig, job: TraceJob, card_bytes: int, gpus: int, weights: int, llm_weights: int,
                   util: float = VLLM_UTIL, model: str = FULL) -> TracePath:
    """vLLM serving the bf16 weights over `gpus` cards (tensor parallel)."""
    from r1v_quant.model.footprint import estimate_reserve, kv_bytes_per_token

    budget = int(card_bytes * util)
    reserve = estimate_reserve(cfg, dtype="bfloat16").total
    per_sequence = math.ceil(kv_bytes_per_token(cfg, "bf16") * job.context / gpus)
    room = budget - math.ceil(weights / gpus) - reserve
    batch = min(job.samples, max(room, 0) // per_sequence)
    parts = {"weights": math.ceil(weights / gpus), "reserve": reserve, "KV cache": max(room, per_sequence)}
    used = budget if batch >= 1 else sum(parts.values())
    return TracePath("vllm", model, gpus, used, budget, batch, llm_weights, kv_bytes_per_token(cfg, "bf16"), parts=parts)


def vllm_4bit_path(cfg: R1VConfig, job: TraceJob, card_bytes: int, group_size: int, llm_weights: int) -> TracePath:
    """vLLM serving a 4-bit export of this config on one card with that card's best recipe."""
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.model.footprint import kv_bytes_per_token

    card = make_plan(cfg, group_size=group_size, gpu_mems=[("card", card_bytes)]).cards[0]
    recipe = card.best
    budget = int(card_bytes * recipe.util)
    fits_one = recipe.max_model_len >= job.context
    batch = min(job.samples, recipe.max_context // job.context) if fits_one else 0
    parts = {"weights": recipe.gpu_weights, "reserve": recipe.reserve, "KV cache": max(recipe.kv_room, 0)}
    per_token = kv_bytes_per_token(cfg, recipe.kv_dtype)
    used = budget if batch >= 1 else recipe.gpu_weights + recipe.reserve + per_token * job.context
    return TracePath("vllm", FOUR_BIT, 1, used, budget, batch, llm_weights, per_token, tuple(recipe.levers), parts)


@dataclass(frozen=True)
class PhaseTime:
    phase: str
    seconds: float


def generation_seconds(spec: CardSpec, params: int, path: TracePath, job: TraceJob) -> float:
    """Prefill at the compute rate, then ``trace_tokens`` decode steps per wave of ``batch`` sequences."""
    flops = spec.flops * COMPUTE_EFFICIENCY * path.gpus
    bandwidth = spec.bytes_per_s * BANDWIDTH_EFFICIENCY * path.gpus
    batch = max(1, min(path.batch, job.samples))
    waves = math.ceil(job.samples / batch)
    prefill = job.samples * job.prompt_tokens * 2 * params / flops
    step_bytes = path.weight_bytes + batch * (job.prompt_tokens + job.trace_tokens / 2) * path.kv_per_token
    step = max(step_bytes / bandwidth, 2 * params * batch / flops)
    return prefill + waves * job.trace_tokens * step


def layer_seconds(spec: CardSpec, cfg: R1VConfig, tokens: int, grid: int) -> float:
    """One decoder layer's AWQ pass at the compute rate (its weights' disk read not counted)."""
    from r1v_quant.model.layout import llm_linear_shapes

    linear = sum(o * i for o, i in llm_linear_shapes(cfg, 0).values())
    return 2 * linear * tokens * (grid + EXTRA_PASSES) / (spec.flops * COMPUTE_EFFICIENCY)


def layer_loop_seconds(spec: CardSpec, cfg: R1VConfig, tokens: int, grid: int, source_llm_bytes: int) -> float:
    return cfg.num_layers * layer_seconds(spec, cfg, tokens, grid) + source_llm_bytes / DISK_BYTES_PER_S


def export_seconds(totals: dict[str, int]) -> float:
    return (totals["source"] - totals["source llm"] + totals["export"]) / DISK_BYTES_PER_S


@dataclass(frozen=True)
class CardTraces:
    label: str
    card_bytes: int
    spec: CardSpec
    path: TracePath | None        # the path the trace phase takes (None: no path fits)
    tried: list[TracePath]
    times: list[PhaseTime]

    @property
    def total_seconds(self) -> float:
        return sum(t.seconds for t in self.times)

    @property
    def bootstrap(self) -> bool:
        return self.path is not None and self.path.model == FOUR_BIT


def choose_path(tried: list[TracePath]) -> TracePath | None:
    return next((p for p in tried if p.fits), None)


def plan_card(cfg: R1VConfig, label: str, card_bytes: int, job: TraceJob, tokens: int, *, gpus: int = 1,
              engine: str | None = None, traces: str = "self", group_size: int = DEFAULT_GROUP_SIZE,
              grid: int = 20) -> CardTraces:
    """The trace path one card (or `gpus` of them) takes and every phase's predicted seconds.

    `traces` "self" tries full precision first and falls back to a 4-bit bootstrap; "bootstrap"
    takes the 4-bit path only. `engine` restricts the paths to one engine.
    """
    from r1v_quant.quant.chunks import headroom_budget

    if engine is not None and engine not in TRACE_ENGINES:
        raise UserError(f"--trace-engine {engine} is not one of {', '.join(TRACE_ENGINES)}.")
    totals = weight_totals(cfg, group_size)
    tried: list[TracePath] = []
    if traces == "self":
        if engine in (None, "vllm"):
            tried.append(vllm_full_path(cfg, job, card_bytes, gpus, totals["source"], totals["source llm"]))
        if engine in (None, "transformers"):
            tried.append(transformers_path(cfg, job, headroom_budget(card_bytes), totals["source"], totals["source llm"]))
    if engine in (None, "vllm"):
        tried.append(vllm_4bit_path(cfg, job, card_bytes, group_size, totals["export llm"]))
    path = choose_path(tried)
    spec = card_for(card_bytes)
    loop = layer_loop_seconds(spec, cfg, tokens, grid, totals["source llm"])
    export = export_seconds(totals)
    times = []
    if path is not None:
        if path.model == FOUR_BIT:   # the first pass that makes the bootstrap export
            times += [PhaseTime("bootstrap layer loop", loop), PhaseTime("bootstrap export", export)]
        params = llm_params(cfg)
        times.append(PhaseTime("trace generation", generation_seconds(spec, params, path, job)))
    times += [PhaseTime("layer loop", loop), PhaseTime("export", export)]
    return CardTraces(label, card_bytes, spec, path, tried, times)


def no_path_sentence(job: TraceJob, where: str, tried: list[TracePath]) -> str:
    """The one-sentence refusal when no trace path fits, naming the alternatives."""
    need = min((p.device_bytes for p in tried), default=0)
    return (f"the trace phase ({job.samples} prompts, {job.context:,d} tokens of context each) does not fit {where} "
            f"(it needs {human_bytes(need)} per device); use --traces bootstrap (traces from a "
            "4-bit first pass), --trace-model EXPORT, more GPUs with --trace-engine vllm --tensor-parallel-size N, "
            "or calibrate on a trace file with --calib chat:PATH.")


def runtime_path(cfg: R1VConfig, job: TraceJob, engine: str, weights: int, four_bit: bool, budget: int, *,
                 gpus: int = 1, gpu_bytes: int | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> TracePath | None:
    """The path `awq` is about to take on this machine, or None when it cannot be predicted (vLLM without a GPU,
    whose KV cache is vLLM's own setting there). `weights`: the trace model's weight bytes as loaded."""
    model = FOUR_BIT if four_bit else FULL
    if engine == "transformers":
        return transformers_path(cfg, job, budget, weights, weights, model)
    if gpu_bytes is None:
        return None
    if four_bit and gpus == 1:
        return vllm_4bit_path(cfg, job, gpu_bytes, group_size, weights)
    return vllm_full_path(cfg, job, gpu_bytes, gpus, weights, weights, model=model)


def check_trace_phase(path: TracePath | None, job: TraceJob, where: str) -> None:
    """Refuse, before any model is loaded, a trace phase that cannot fit."""
    if path is not None and not path.fits:
        raise UserError(no_path_sentence(job, where, [path]))


def human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
