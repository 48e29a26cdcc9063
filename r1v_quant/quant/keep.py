"""Which decoder linear groups an AWQ export keeps in bf16 (`awq --keep-bf16`), and their bf16 weights.

Sensitivity. While a layer is quantised (`quantize_layer`, with `AWQSettings.sensitivity`), after
its AWQ tensors are packed, each linear group in turn is put back to its float weights (AWQ
scales folded, unclipped) with the rest left 4-bit, and the layer is run over the calibration
tokens already captured. The group's sensitivity is what that removes from the squared relative
layer-output error, err²(all 4-bit) − err²(all 4-bit but this group): the gain of keeping exactly
that group, measured where nearly everything else stays quantised. It costs four layer passes per
layer and a host copy of the layer's float weights; no extra pass over the model.

Choosing in a streaming loop. A layer's sensitivity is known only once that layer is done, and
the choice needs every layer's. So the choice is made at export: each layer's work file keeps its
packed tensors and, tiny beside them, its AWQ scales (`awq_scales.<group>`); a kept group's bf16
weight is rebuilt then from the source checkpoint and those scales (`kept_weight`). Nothing of
the size of a bf16 layer is stored twice, the work folder grows by a few KiB per layer, and the
same work folder can be exported at any budget. Later layers were calibrated on the outputs of
fully 4-bit earlier layers, which a kept group makes slightly more accurate than assumed.

Budget. `auto` fills what the card's plan leaves beyond the KV cache of the context asked
(`deploy.plan`: util x card − export weights − reserve − context x KV bytes per token) with the
groups that remove the most error per extra byte, greedily; `N%` keeps at most N% of the decoder
linears' parameters in bf16 the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r1v_quant.errors import UserError
from r1v_quant.int4.format import AWQ_DTYPES, awq_shapes
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.kept import GROUPS, group_sort_key, parse_keep_list
from r1v_quant.model.layout import llm_linear_shapes
from r1v_quant.model.topology import QWEN2_GROUPS

SCALES_PREFIX = "awq_scales."   # a layer work file's per-group AWQ scales, float32 [in]
DEFAULT_CONTEXT = 32768


# ---------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class KeepRequest:
    """`--keep-bf16` as given: `auto` (with a card), a share of the linears, or explicit groups."""

    mode: str                                  # "auto", "share" or "list"
    card_bytes: int | None = None              # auto: the card's memory
    context: int = DEFAULT_CONTEXT             # auto: the tokens of KV cache it must still hold
    share: float = 0.0                         # share: the most of the linears' parameters kept
    groups: tuple[tuple[int, str], ...] = ()   # list: (layer, group)

    @property
    def measures(self) -> bool:
        """Whether the choice needs the sensitivities measured during calibration."""
        return self.mode != "list"

    def describe(self) -> str:
        if self.mode == "auto":
            return f"auto: the most sensitive groups within a {self.card_bytes / 2**30:.1f} GiB card at {self.context:,d} tokens"
        if self.mode == "share":
            return f"the most sensitive groups, up to {self.share:.1%} of the decoder linears' parameters"
        return f"{len(self.groups)} listed groups"


def parse_keep(text: str, cfg: R1VConfig, budget: str | None = None, context: int | None = None) -> KeepRequest:
    """`--keep-bf16 auto --budget 40GiB [--context N]`, `--keep-bf16 5%` or `--keep-bf16 3.down,0.qkv`."""
    from r1v_quant.units import parse_size

    text = text.strip()
    if text != "auto" and (budget is not None or context is not None):
        raise UserError("--budget and --context go with --keep-bf16 auto only.")
    if text == "auto":
        if budget is None:
            raise UserError("--keep-bf16 auto needs --budget, the card's memory (e.g. 48GiB).")
        if context is not None and context < 1:
            raise UserError(f"--context {context} must be a positive number of tokens.")
        return KeepRequest("auto", card_bytes=parse_size(budget, "--budget", 2**30),
                           context=DEFAULT_CONTEXT if context is None else context)
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = math.nan
        if not 0 <= share <= 1:
            raise UserError(f"--keep-bf16 {text} is not a share between 0% and 100%.")
        return KeepRequest("share", share=share)
    return KeepRequest("list", groups=tuple(parse_keep_list(text, cfg.num_layers)))


# ---------------------------------------------------------------------------------------------
# Bytes


def _awq_bytes(out_f: int, in_f: int, group_size: int) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=AWQ_DTYPES[leaf]).element_size()
               for leaf, (shape, _) in awq_shapes(out_f, in_f, group_size).items())


@dataclass(frozen=True)
class GroupCost:
    params: int      # weights of the group's linears
    awq: int         # bytes of their AWQ tensors
    kept: int        # bytes of their weights in the model dtype

    @property
    def extra(self) -> int:
        """What keeping the group adds to the export."""
        return self.kept - self.awq


def group_costs(cfg: R1VConfig, group_size: int, dtype_bytes: int = 2) -> dict[str, GroupCost]:
    """Bytes of one layer's groups, 4-bit and kept (the same in every layer)."""
    shapes = {name.split(".", 4)[-1]: shape for name, shape in llm_linear_shapes(cfg, 0).items()}
    out = {}
    for group, names in GROUPS.items():
        params = sum(shapes[n][0] * shapes[n][1] for n in names)
        out[group] = GroupCost(params, sum(_awq_bytes(*shapes[n], group_size) for n in names), params * dtype_bytes)
    return out


def linear_params(cfg: R1VConfig) -> int:
    return cfg.num_layers * sum(c.params for c in group_costs(cfg, 128).values())


def card_room(cfg: R1VConfig, card_bytes: int, context: int, group_size: int, util: float = 0.9) -> int:
    """Bytes the card's plan leaves for kept groups: its KV room for the all-4-bit export less `context` tokens of KV."""
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.model.footprint import kv_bytes_per_token

    card = make_plan(cfg, group_size=group_size, util=util, gpu_mems=[("card", card_bytes)]).cards[0]
    return card.kv_room_bytes - context * kv_bytes_per_token(cfg)


# ---------------------------------------------------------------------------------------------
# The choice


def choose(gains: dict[tuple[int, str], float], costs: dict[str, int], limit: int) -> list[tuple[int, str]]:
    """Greedy knapsack: groups by gain per byte, each taken when it still fits within `limit` bytes.

    Groups with no measured gain are never kept; ties go to the earlier layer and group.
    """
    ranked = sorted((k for k, g in gains.items() if g > 0),
                    key=lambda k: (-gains[k] / costs[k[1]], group_sort_key(k)))
    chosen, used = [], 0
    for k in ranked:
        if used + costs[k[1]] <= limit:
            chosen.append(k)
            used += costs[k[1]]
    return sorted(chosen, key=group_sort_key)


def resolve(request: KeepRequest, cfg: R1VConfig, group_size: int,
            sensitivity: dict[int, dict[str, float]]) -> tuple[list[tuple[int, str]], dict]:
    """The groups to keep, and a summary for the report: what was asked, the room, what it holds."""
    costs = group_costs(cfg, group_size)
    gains = {(i, g): float(v) for i, per in sensitivity.items() for g, v in per.items()}
    info: dict = {"request": request.describe()}
    if request.mode == "list":
        chosen = list(request.groups)
    elif request.mode == "share":
        limit = int(request.share * linear_params(cfg))
        chosen = choose(gains, {g: c.params for g, c in costs.items()}, limit)
    else:
        room = card_room(cfg, request.card_bytes, request.context, group_size)
        info["room_bytes"] = room
        if room < 0:
            raise UserError(f"a {request.card_bytes / 2**30:.1f} GiB card cannot hold {request.context:,d} tokens of KV "
                            f"cache beside the 4-bit export ({-room / 2**30:.2f} GiB short), so no room is left to keep "
                            "linears in bf16; lower --context or drop --keep-bf16.")
        chosen = choose(gains, {g: c.extra for g, c in costs.items()}, room)
    total = linear_params(cfg)
    info.update({
        "groups": [f"{i}.{g}" for i, g in chosen],
        "params_share": sum(costs[g].params for _, g in chosen) / total,
        "extra_bytes": sum(costs[g].extra for _, g in chosen),
    })
    return chosen, info


def most_extra_bytes(request: KeepRequest, cfg: R1VConfig, group_size: int) -> int:
    """The most a request can add to the export, before any sensitivity is known (for the disk check)."""
    costs = group_costs(cfg, group_size)
    if request.mode == "list":
        return sum(costs[g].extra for _, g in request.groups)
    all_extra = cfg.num_layers * sum(c.extra for c in costs.values())
    if request.mode == "share":
        return int(request.share * all_extra) + max(c.extra for c in costs.values())
    return max(0, min(all_extra, card_room(cfg, request.card_bytes, request.context, group_size)))


# ---------------------------------------------------------------------------------------------
# Kept weights


def layer_scales(found_scales: dict) -> dict[str, torch.Tensor]:
    """A layer's AWQ scales as work-file tensors (`awq_scales.<group>`, float32)."""
    return {SCALES_PREFIX + name: r.scales.detach().float().cpu().contiguous() for name, r in found_scales.items()}


def kept_weight(source: torch.Tensor, linear: str, layer_tensors: dict[str, torch.Tensor],
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A kept linear's stored weight: the source weight with the layer's folded AWQ scales accounted for.

    Its group's scales multiply its input channels (the op before divided its outputs by them),
    and when it is itself the op before a later group (v_proj before o_proj, up_proj before
    down_proj) its output rows are divided by that group's scales, as its bias already is. So the
    kept linear, fed the export's scaled inputs, computes what the source computes.
    """
    w = source.float()
    for g in QWEN2_GROUPS:
        s = layer_tensors.get(SCALES_PREFIX + g.name)
        if s is None:
            continue
        if linear in g.linears:
            w = w * s.float()[None, :]
        if linear == g.prev:
            w = w / s.float()[:, None]
    return w.to(dtype)


def check_scales_present(layer_tensors: dict[str, torch.Tensor], where: str) -> None:
    """UserError when a work file predates stored scales (a run resumed from an older version): the q/k/v
    group's scales, folded into the input norm, are in every layer's file that has any."""
    if SCALES_PREFIX + QWEN2_GROUPS[0].name not in layer_tensors:
        raise UserError(f"{where} holds no AWQ scales, which keeping linears in bf16 needs; rerun without --resume.")


# ---------------------------------------------------------------------------------------------
# Sensitivity (inside quantize_layer)


def snapshot(linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """Host copies of the layer's float weights (scales folded, before clipping)."""
    return {k: m.weight.data.detach().to("cpu", copy=True) for k, m in linears.items()}


def measure_gains(error_of, linears: dict[str, torch.nn.Linear], floats: dict[str, torch.Tensor],
                  err_all: float) -> dict[str, float]:
    """Per group: err²(all 4-bit) − err²(this group float, the rest 4-bit); weights restored after each group.

    `error_of()` runs the layer and returns its relative output error.
    """
    gains = {}
    for group, names in GROUPS.items():
        held = {n: linears[n].weight.data for n in names}
        for n in names:
            linears[n].weight.data = floats[n].to(held[n].device, held[n].dtype)
        try:
            err = error_of()
        finally:
            for n in names:
                linears[n].weight.data = held[n]
        gains[group] = err_all ** 2 - err ** 2
    return gains


# ---------------------------------------------------------------------------------------------
# What `plan` shows


PLAN_SHARES = (0.01, 0.02, 0.05, 0.10)


@dataclass
class KeepFit:
    """`--keep-bf16 auto` on one card, from the plan alone (no sensitivities: the bound, not the groups)."""

    card: str
    context: int                 # the context asked
    room_bytes: int              # what the card leaves beyond that context's KV cache (negative: none)
    auto_share: float            # the most of the linears' parameters auto could keep there
    auto_bytes: int              # what that share adds to the export
    max_context: int             # tokens with every linear 4-bit
    context_after: int           # tokens left once auto has filled the room (>= context)
    context_at: dict[float, int]  # share kept -> tokens left


def plan_keep(plan, context: int = DEFAULT_CONTEXT, shares: tuple[float, ...] = PLAN_SHARES) -> list[KeepFit]:
    """Per card of a `deploy.plan.Plan`: the room `--keep-bf16 auto` fills, the share it could keep, and the context
    each share leaves. Keeping a share s of the linears adds s x (bf16 - 4-bit bytes of all decoder linears); auto keeps
    whole groups, so its real share is at most `auto_share`."""
    from r1v_quant.model.footprint import context_tokens

    cfg = plan.basis.cfg
    costs = group_costs(cfg, plan.group_size)
    all_extra = cfg.num_layers * sum(c.extra for c in costs.values())
    per_token = plan.kv_bytes_per_token
    out = []
    for card in plan.cards:
        room = card.kv_room_bytes - context * per_token
        share = min(1.0, max(0, room) / all_extra)
        used = int(share * all_extra)
        out.append(KeepFit(card.label, context, room, share, used, card.max_context,
                           context_tokens(card.kv_room_bytes - used, per_token),
                           {s: context_tokens(card.kv_room_bytes - int(s * all_extra), per_token) for s in shares}))
    return out
