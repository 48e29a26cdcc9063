"""The compromises vLLM offers for fitting one card: what each costs the user, the vLLM version each
needs, and the best combination of them (a recipe) for a card.

Compromises, cheapest first. This order is the ranking:
  1. util-95        `--gpu-memory-utilization 0.95`: costs nothing if nothing else uses the GPU.
  2. fp8-kv         `--kv-cache-dtype fp8`: half the KV bytes per token. Ampere serves it with FlashInfer
                    or Triton attention (FlashAttention 2 has no fp8 KV cache), Hopper with FlashAttention 3.
                    The scales default to 1.0, which costs a little accuracy at long context.
  3. lm-head-4bit   an export written with `awq --quantize-lm-head` (`"lm_head": true`): it needs a
                    re-export, and the logits come from 4-bit weights.
  4. tower-offload  the vision encoder and mlp1 stay bf16 but live in pinned host memory (vLLM's UVA
                    offloader, `--offload-backend uva --cpu-offload-gb N --cpu-offload-params vision_model
                    mlp1`): every image-encoding step reads them over PCIe (seconds per image), and host
                    RAM holds them. Decode steps never run the encoder.
  5. tiles-6        `max_dynamic_patch` 6: a smaller vision activation reserve; less detail on big pictures.
  6. text-only      `--limit-mm-per-prompt '{"image": 0}'`: vLLM does not build the tower at all (its
                    bytes are not resident), and no image can be asked about.

The best recipe for a card is the cheapest one that reaches the longest context goal the card allows
(GOALS: 32k tokens for an R1 chain of thought, else 16k, else 4k for one large image and a short
answer; each capped at max_position_embeddings). Cheapest compares the costliest compromise first,
so any number of cheaper compromises beat one costlier one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

from packaging.version import InvalidVersion, Version

from r1v_quant.errors import UserError
from r1v_quant.model.footprint import context_tokens, estimate_reserve, fit_status, kv_bytes_per_token
from r1v_quant.units import GiB

if TYPE_CHECKING:
    from r1v_quant.model.config import R1VConfig

UTIL_HIGH = 0.95
FEWER_TILES = 6
# The modules vLLM's UVA offloader is asked to keep in host memory (segment names of the parameters).
TOWER_MODULES = ("vision_model", "mlp1")
# PCIe 4.0 x16 carries 31.5 GB/s per direction after line coding; pinned host-to-device reads reach
# about 25 GB/s in practice. A GEMM that reads zero-copy host memory may fetch a weight tile more than
# once, so bytes / this bandwidth is a lower bound on the time an image-encoding step adds.
PCIE_BYTES_PER_S = 25e9

COMPROMISES = ("util-95", "fp8-kv", "lm-head-4bit", "tower-offload", "tiles-6", "text-only")
TITLES = {
    "util-95": "95% of the GPU",
    "fp8-kv": "fp8 KV cache",
    "lm-head-4bit": "4-bit lm_head",
    "tower-offload": "vision encoder in host memory",
    "tiles-6": f"at most {FEWER_TILES} tiles per image",
    "text-only": "text only",
}
NOTES = {
    "util-95": "only if nothing else uses the GPU",
    "fp8-kv": "half the KV bytes; small accuracy cost at long context (scales 1.0)",
    "lm-head-4bit": "needs a re-export with `awq --quantize-lm-head`",
    "tower-offload": "stays bf16; read over PCIe at each image-encoding step",
    "tiles-6": "less detail on big images",
    "text-only": "no image inputs; vLLM does not build the vision encoder",
}
# Context goals, longest first: an R1 chain of thought, a long answer, one 13-tile image and a short answer.
GOALS = (32768, 16384, 4096)

# vLLM versions. The baseline is the oldest vLLM whose flag spelling serve writes (the JSON form of
# --limit-mm-per-prompt). "verified" means read in vLLM's own source (0.32.0); the rest are assumed.
BASELINE_VLLM = "0.10"


@dataclass(frozen=True)
class Feature:
    what: str
    min_version: str
    verified: bool
    source: str


FEATURES = {
    "tower-offload": Feature(
        "offloading the vision encoder", "0.32", True,
        "vLLM pull request 53120 (BaseOffloader.supports_tower_offload, read in 0.32.0); before it the same "
        "flags offload the first decoder layers, which every decode step reads"),
    "text-only": Feature(
        "leaving the vision encoder unbuilt without images", "0.32", True,
        "SupportsMultiModal._mark_tower_model, read in 0.32.0; older versions are assumed to build it"),
    "lm-head-4bit": Feature(
        "a 4-bit lm_head in an AWQ export", BASELINE_VLLM, False,
        "AutoAWQConfig reads \"lm_head\" in 0.32.0 (read); assumed in every release since the baseline"),
    "fp8-kv": Feature(
        "an fp8 KV cache", BASELINE_VLLM, False,
        "--kv-cache-dtype fp8 is in 0.32.0 (read); assumed in every release since the baseline"),
}


def parse_version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise UserError(f"vLLM version {text!r} is not a version such as 0.32.0.") from None


def has(feature: str, version: Version | None) -> bool:
    """Whether vLLM `version` has `feature`; None is a vLLM new enough for everything."""
    return version is None or version >= Version(FEATURES[feature].min_version)


def check_levers(names: list[str], allowed: tuple[str, ...] = COMPROMISES) -> frozenset[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UserError(f"unknown compromise {unknown[0]!r}; choose from {', '.join(allowed)} (or none).")
    if "text-only" in names and ({"tower-offload", "tiles-6"} & set(names)):
        raise UserError("text-only leaves no vision encoder to offload or tiles to cut; drop tower-offload and tiles-6.")
    return frozenset(names)


# ---------------------------------------------------------------------------------------------
# Evaluating a recipe


@dataclass(frozen=True)
class Basis:
    """What every recipe for one model starts from."""

    cfg: R1VConfig
    util: float
    kv_dtype: str
    weights: int               # export tensor bytes, all resident
    tower: int                 # vision_model + mlp1 bytes
    lm_head_saving: int        # bytes a 4-bit lm_head saves (0 when it is already 4-bit, or tied)
    max_batched_tokens: int
    max_dynamic_patch: int | None
    images: bool
    max_pos: int


@dataclass
class Recipe:
    levers: tuple[str, ...]
    util: float
    kv_dtype: str
    images: bool
    max_dynamic_patch: int | None
    gpu_weights: int
    reserve: int
    kv_room: int
    max_context: int
    max_model_len: int
    status: str
    host_pinned: int = 0       # bytes held in pinned host memory by the offloader
    offload_gib: int = 0       # --cpu-offload-gb
    encode_seconds: float = 0.0  # at least this much PCIe time per image-encoding step
    min_vllm: str = BASELINE_VLLM
    goal: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return " + ".join(TITLES[n] for n in self.levers) if self.levers else "as exported (no compromise)"

    @property
    def features(self) -> list[str]:
        return [n for n in self.levers if n in FEATURES]


def lever_cost(levers) -> int:
    return sum(2 ** COMPROMISES.index(n) for n in levers)


def evaluate(basis: Basis, gpu: int, levers: frozenset[str], version: Version | None = None) -> Recipe:
    """The context one recipe leaves on a card of `gpu` bytes, under vLLM `version` (None: the newest)."""
    util = max(basis.util, UTIL_HIGH) if "util-95" in levers else basis.util
    kv = "fp8" if "fp8-kv" in levers else basis.kv_dtype
    text_only = "text-only" in levers or not basis.images
    patch = FEWER_TILES if "tiles-6" in levers else basis.max_dynamic_patch
    weights = basis.weights - (basis.lm_head_saving if "lm-head-4bit" in levers else 0)
    notes = []
    offloaded = "tower-offload" in levers
    # A basis planned without images has already left the tower out; "text-only" is the lever.
    if offloaded or ("text-only" in levers and has("text-only", version)):
        weights -= basis.tower
    elif "text-only" in levers:
        notes.append(f"vLLM {version} is assumed to build the vision encoder even without images, so its bytes are counted")
    reserve = estimate_reserve(basis.cfg, max_batched_tokens=basis.max_batched_tokens, max_dynamic_patch=patch,
                               images=not text_only).total
    per_token = kv_bytes_per_token(basis.cfg, kv)
    room = int(gpu * util) - weights - reserve
    tokens = context_tokens(room, per_token)
    needed = [FEATURES[n].min_version for n in levers if n in FEATURES and n != "text-only"]
    if "text-only" in levers and has("text-only", version):
        needed.append(FEATURES["text-only"].min_version)
    recipe = Recipe(tuple(n for n in COMPROMISES if n in levers), util, kv, not text_only, patch, weights, reserve,
                    room, tokens, min(tokens, basis.max_pos), fit_status(tokens),
                    min_vllm=max(needed + [BASELINE_VLLM], key=Version), notes=notes)
    if offloaded:
        recipe.host_pinned = basis.tower
        recipe.offload_gib = math.ceil(basis.tower / GiB)
        recipe.encode_seconds = basis.tower / PCIE_BYTES_PER_S
    return recipe


def candidates(basis: Basis, allowed: frozenset[str], required: frozenset[str],
               version: Version | None) -> list[frozenset[str]]:
    """Every combination of the allowed compromises that includes the required ones and that
    vLLM `version` can run (text-only always runs; only its saving depends on the version)."""
    pool = [n for n in COMPROMISES if n in allowed | required]
    if not basis.images:
        pool = [n for n in pool if n not in ("tower-offload", "tiles-6", "text-only")]
    if basis.util >= UTIL_HIGH:
        pool = [n for n in pool if n != "util-95"]
    if basis.kv_dtype == "fp8":
        pool = [n for n in pool if n != "fp8-kv"]
    if basis.lm_head_saving == 0:
        pool = [n for n in pool if n != "lm-head-4bit"]
    must = required & set(pool)
    out = []
    for k in range(len(pool) + 1):
        for combo in combinations(pool, k):
            s = frozenset(combo)
            if not must <= s:
                continue
            if "text-only" in s and ({"tower-offload", "tiles-6"} & s):
                continue
            if any(n != "text-only" and n in FEATURES and not has(n, version) for n in s):
                continue
            out.append(s)
    return out


def best_recipe(basis: Basis, gpu: int, allowed: frozenset[str] = frozenset(COMPROMISES),
                required: frozenset[str] = frozenset(), version: Version | None = None) -> Recipe:
    """The cheapest recipe that reaches the longest goal any candidate reaches (see the module doc);
    when none reaches even the shortest goal, the one with the longest context (then the most KV room:
    the nearest to fitting)."""
    recipes = [evaluate(basis, gpu, s, version) for s in candidates(basis, allowed, required, version)]
    for goal in GOALS:
        target = min(goal, basis.max_pos)
        reaching = [r for r in recipes if r.max_context >= target]
        if reaching:
            best = min(reaching, key=lambda r: lever_cost(r.levers))
            best.goal = target
            return best
    return max(recipes, key=lambda r: (r.max_context, r.kv_room, -lever_cost(r.levers)))


def vllm_needed(recipe: Recipe) -> str:
    """'vLLM >= 0.32 (verified)' for the newest feature the recipe uses."""
    used = [FEATURES[n] for n in recipe.features if Version(FEATURES[n].min_version) == Version(recipe.min_vllm)]
    verified = any(f.verified for f in used) if used else False
    return f">= {recipe.min_vllm}" + ("" if verified else " (assumed)")


