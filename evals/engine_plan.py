"""`eval --engine vllm --dry-run`: the vLLM engine each model would get, and the memory it needs
on each GPU, from the plan (`r1v_quant.deploy.plan`), with no weights loaded.

Per GPU, an engine holds its share of the weights (split evenly over tensor x pipeline ranks),
the plan's activation and runtime reserve (not split: each rank profiles its own), and the KV
cache of at least one sequence of `max_model_len` tokens, which vLLM demands before it starts.
The KV cache splits over tensor ranks by key-value head and over pipeline ranks by layer.
`max_model_len` here is a bound: the longest prompt (its characters, as no tokenizer is read,
plus every image at the most tiles) and `--max-new-tokens`; the real run measures its prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from r1v_quant.evals.settings import EvalSettings
from r1v_quant.units import GiB

TEMPLATE_TOKENS = 512  # the chat template's own tokens, generously


@dataclass
class EnginePlan:
    label: str
    role: str
    kwargs: dict[str, Any]
    weights: int             # bytes, the whole model
    weights_per_gpu: int
    reserve: int
    kv_per_gpu: int          # KV cache of one max_model_len sequence on one GPU
    quantized: bool

    @property
    def per_gpu(self) -> int:
        return self.weights_per_gpu + self.reserve + self.kv_per_gpu


def prompt_bound(samples: Sequence, cfg, text_tokens: int) -> int:
    """Tokens the longest prompt can take, without a tokenizer: one per character at most."""
    from r1v_quant.model.footprint import max_tiles

    per_image = max_tiles(cfg) * cfg.num_image_token + 2
    if samples and samples[0].kind == "text":
        return min(text_tokens, max(len(s.prompt) for s in samples) + 1)
    return max(len(s.prompt) + TEMPLATE_TOKENS + len(s.images) * per_image for s in samples)


def kv_share(cfg, per_token: int, tp: int, pp: int) -> float:
    """KV bytes per token on one GPU: key-value heads split over tensor ranks (replicated when
    there are fewer heads than ranks), layers over pipeline ranks."""
    heads = int(cfg.llm.get("num_key_value_heads") or cfg.llm["num_attention_heads"])
    layers = int(cfg.llm["num_hidden_layers"])
    return per_token * (math.ceil(heads / tp) / heads) * (math.ceil(layers / pp) / layers)


def plan_engines(reference: str, candidate: str, baselines: Sequence[str], settings: EvalSettings,
                 samples: Sequence) -> list[EnginePlan]:
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.deploy.vllm_engine import engine_kwargs
    from r1v_quant.evals.vllm_pass import CANDIDATE_TOP_K_FACTOR, check_engine, parallel_of
    from r1v_quant.int4.format import read_quantization_config
    from r1v_quant.model.checkpoint import resolve_config

    check_engine(baselines, need_vllm=False)
    parallel = parallel_of(settings)
    images = max((len(s.images) for s in samples), default=0)
    ref_cfg, ref_source = resolve_config(reference)
    cand_cfg, cand_source = resolve_config(candidate)
    # (role, label, what vLLM loads, config, its source, AWQ group size when planned as an export)
    models = [("reference", reference, reference, ref_cfg, ref_source, None),
              ("candidate", candidate, candidate, cand_cfg, cand_source, None)]
    if "rtn" in baselines:
        group = read_quantization_config(cand_cfg.quantization or {}, cand_source).group_size
        models.append(("baseline", f"RTN w4 g{group}", "<RTN export of the reference, written before its engine>",
                       ref_cfg, ref_source, group))
    out = []
    for role, label, model, cfg, source, group in models:
        plan = make_plan(cfg, source=source, images=images > 0, group_size=group, gpu_mems=[("GPU", 80 * GiB)])
        quantized = plan.already_quantized or group is not None
        weights = plan.export_total if quantized else plan.source_total
        bound = prompt_bound(samples, cfg, settings.text_tokens)
        length = bound + (0 if samples and samples[0].kind == "text" else settings.max_new_tokens) + 1
        k = settings.top_k * (1 if role == "reference" else CANDIDATE_TOP_K_FACTOR)
        kwargs = engine_kwargs(model, images, max_model_len=length, parallel=parallel, max_logprobs=k).kwargs
        kwargs["seed"] = settings.seed
        kv = int(kv_share(cfg, plan.kv_bytes_per_token, parallel.tensor_parallel_size,
                          parallel.pipeline_parallel_size) * length)
        out.append(EnginePlan(label, role, kwargs, weights, math.ceil(weights / parallel.gpus), plan.reserve.total, kv,
                              quantized))
    return out


def describe(plans: Sequence[EnginePlan], settings: EvalSettings) -> list[str]:
    """The dry run's lines: each engine's `vllm.LLM` arguments and its memory per GPU."""
    gpus = settings.tensor_parallel_size * settings.pipeline_parallel_size
    lines = [f"eval --engine vllm would start {len(plans)} engines, one at a time, each on {gpus} GPU"
             f"{'s' if gpus > 1 else ''} (tensor parallel {settings.tensor_parallel_size} x pipeline parallel "
             f"{settings.pipeline_parallel_size}):"]
    for p in plans:
        args = ", ".join(f"{key}={value!r}" for key, value in p.kwargs.items())
        lines += [f"{p.role} {p.label}:", f"  vllm.LLM({args})",
                  f"  per GPU: weights {p.weights_per_gpu / GiB:.1f} GiB (of {p.weights / GiB:.1f} GiB"
                  f"{', AWQ 4-bit' if p.quantized else ''}) + reserve {p.reserve / GiB:.1f} GiB + KV cache for "
                  f"{p.kwargs['max_model_len']:,d} tokens {p.kv_per_gpu / GiB:.2f} GiB = {p.per_gpu / GiB:.1f} GiB, "
                  f"so a card of at least {p.per_gpu / p.kwargs['gpu_memory_utilization'] / GiB:.1f} GiB at "
                  f"gpu_memory_utilization {p.kwargs['gpu_memory_utilization']:g}"]
    lines.append("memory from the plan's predicted tensor sizes; max_model_len bounds the longest prompt and reply "
                 "(the run measures its prompts). Nothing was loaded.")
    return lines
