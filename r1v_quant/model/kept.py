"""Decoder linears kept in bf16 inside an AWQ export: their names in `modules_to_not_convert`, and how readers match them.

The unit that can be kept is a linear group of one decoder layer (`QWEN2_GROUPS`): q/k/v together,
o_proj, gate/up together, down_proj. vLLM fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj` and refuses a fused module whose parts differ in precision, so those stay whole.

vLLM decides by substring: a linear stays unquantised when an entry of `modules_to_not_convert`
occurs in its prefix. Current vLLM tests the unfused names of a fused module's parts
(`...self_attn.q_proj`); older releases test the fused prefix (`...self_attn.qkv_proj`). An export
therefore lists, per kept group, the full dotted name of each linear and, for a fused group, the
fused name too: each ends at a module boundary, so `layers.1.` never matches `layers.10.`.
Plain data and string functions, so the loader, the planner and the inspector share one rule.
"""

from __future__ import annotations

import re

from r1v_quant.errors import UserError
from r1v_quant.model.topology import FUSED_LINEARS, QUANT_LINEARS, QWEN2_GROUPS

LAYERS = "language_model.model.layers."
GROUPS: dict[str, tuple[str, ...]] = {g.name: g.linears for g in QWEN2_GROUPS}
_FUSED_OF = {leaf: fused for fused, leaves in FUSED_LINEARS.items() for leaf in leaves}
_GROUP_OF = {name: g for g, names in GROUPS.items() for name in names}


def fused_prefix(module: str) -> str:
    """The prefix vLLM gives a module: q/k/v become `qkv_proj`, gate/up `gate_up_proj` inside the decoder."""
    if module.startswith(LAYERS):
        head, _, leaf = module.rpartition(".")
        return f"{head}.{_FUSED_OF.get(leaf, leaf)}"
    return module


def is_skipped(module: str, entries: list[str]) -> bool:
    """Whether a reader following vLLM's substring rule, old or new, leaves `module` (an unfused name) unquantised."""
    names = {module, fused_prefix(module)}
    return any(e in n for e in entries for n in names)


def group_modules(layer: int, group: str) -> list[str]:
    """Full checkpoint names of one group's linears, without `.weight`."""
    return [f"{LAYERS}{layer}.{name}" for name in GROUPS[group]]


def group_entries(layer: int, group: str) -> list[str]:
    """What `modules_to_not_convert` lists for one kept group: each linear, and a fused group's fused name."""
    names = group_modules(layer, group)
    fused = fused_prefix(names[0])
    return names + ([fused] if fused not in names else [])


def group_sort_key(item: tuple[int, str]) -> tuple[int, int]:
    return item[0], list(GROUPS).index(item[1])


def keep_entries(base: list[str], kept: list[tuple[int, str]]) -> list[str]:
    """`base` (vision_model, mlp1) followed by the entries of each kept (layer, group), in model order."""
    out = list(base)
    for layer, group in sorted(set(kept), key=group_sort_key):
        out += group_entries(layer, group)
    return out


def kept_linears(num_layers: int, entries: list[str] | None) -> set[str]:
    """The decoder linears (full names) that `entries` keep unquantised."""
    entries = entries or []
    return {f"{LAYERS}{i}.{name}" for i in range(num_layers) for name in QUANT_LINEARS
            if is_skipped(f"{LAYERS}{i}.{name}", entries)}


def kept_groups(num_layers: int, entries: list[str] | None) -> list[tuple[int, str]]:
    """(layer, group) of every group all of whose linears `entries` keep; UserError for a fused group kept in part."""
    kept = kept_linears(num_layers, entries)
    out = []
    for i in range(num_layers):
        for group in GROUPS:
            names = group_modules(i, group)
            held = [n in kept for n in names]
            if all(held):
                out.append((i, group))
            elif any(held):
                raise UserError(f"modules_to_not_convert keeps {names[held.index(True)]} but not "
                                f"{names[held.index(False)]}; vLLM fuses them, so they must be kept together.")
    return out


_SHORT = re.compile(r"^(?:layers\.)?(\d+)\.(\w+)$")


def parse_keep_list(text: str, num_layers: int) -> list[tuple[int, str]]:
    """`--keep-bf16 LIST`: comma-separated `LAYER.GROUP` (e.g. `3.down`, `0.qkv`) or full linear names
    (`language_model.model.layers.3.mlp.down_proj`; one linear of a fused group keeps the whole group)."""
    out: list[tuple[int, str]] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        short = _SHORT.match(raw)
        if short:
            layer, group = int(short.group(1)), short.group(2)
        else:
            name = raw.removesuffix(".weight")
            m = re.match(re.escape(LAYERS) + r"(\d+)\.(.+)$", name)
            leaf = m.group(2) if m else ""
            fused = {f: leaves for f, leaves in FUSED_LINEARS.items()}
            if m and leaf.rpartition(".")[2] in fused:  # a fused name such as self_attn.qkv_proj
                leaf = f"{leaf.rpartition('.')[0]}.{fused[leaf.rpartition('.')[2]][0]}"
            if not m or leaf not in _GROUP_OF:
                raise UserError(f"--keep-bf16 entry {raw!r} is neither LAYER.GROUP (groups: {', '.join(GROUPS)}) nor "
                                f"the full name of a decoder linear such as {LAYERS}0.mlp.down_proj.")
            layer, group = int(m.group(1)), _GROUP_OF[leaf]
        if group not in GROUPS:
            raise UserError(f"--keep-bf16 entry {raw!r}: {group!r} is not a linear group ({', '.join(GROUPS)}).")
        if not 0 <= layer < num_layers:
            raise UserError(f"--keep-bf16 entry {raw!r}: the model has layers 0 to {num_layers - 1}.")
        out.append((layer, group))
    if not out:
        raise UserError("--keep-bf16 names no group; pass auto, a share such as 5%, or entries such as 3.down,0.qkv.")
    return sorted(set(out), key=group_sort_key)
