"""Every argument r1v-quant gives vLLM, said once: the `vllm serve` flags and `vllm.LLM` keywords this
model needs, the flags each compromise adds, the context-length policy, and reading the user's own flags.

What this model needs from vLLM, beyond the folder:
  * `--trust-remote-code`: the config class of `skywork_chat` lives in the export's Python files.
  * `--dtype bfloat16`: the AWQ kernels that take fp16 activations overflow on Qwen2; Marlin takes bf16.
  * `--max-model-len`: vLLM's default is the model's `max_position_embeddings`, which may not fit the
    KV cache of the GPU at hand, and then vLLM stops after loading the weights. The policy
    (`planned_max_model_len`): the longest context whose KV cache fits the card under the recipe
    served, capped at `max_position_embeddings`; a value the user gives wins, and an engine spread
    over several GPUs leaves it to vLLM (the plan is for one GPU).
  * `--limit-mm-per-prompt '{"image": N}'`: images per prompt, in the JSON form vLLM takes since
    0.10 (the older `image=N` form is rejected).
  * `--gpu-memory-utilization`: the fraction the plan assumed.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1v_quant.deploy.compromises import FEWER_TILES, TOWER_MODULES, Recipe
from r1v_quant.errors import UserError

VLLM_MISSING = ("vLLM is not installed; pip install 'r1v-quant[vllm]' on a CUDA machine, "
                "or see scripts/vllm-env.sh for CPU checks.")
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_UTIL = 0.9
# What every server of this model needs (see the module doc), before the per-card settings.
BASE_SETTINGS: dict[str, Any] = {"trust_remote_code": True, "dtype": "bfloat16"}

# User flags after which our --max-model-len would be a single-GPU guess for a multi-GPU server.
PARALLEL_FLAGS = ("tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size")
SHORT_FLAGS = {"-tp": "tensor-parallel-size", "-pp": "pipeline-parallel-size", "-dp": "data-parallel-size"}


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


def user_number(extra: Sequence[str], name: str, kind, default):
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


def vllm_settings(images_per_prompt: int, util: float, max_model_len: int | None = None, *,
                  kv_cache_dtype: str | None = None, cpu_offload_gb: int | None = None,
                  max_dynamic_patch: int | None = None) -> dict[str, Any]:
    """What this model needs from vLLM (see the module doc), as `vllm.LLM` keyword arguments;
    `serve_flags` spells the same settings for `vllm serve`.

    The recipe fields (`compromises.py`): `images_per_prompt=0` is text only (vLLM 0.32 then builds no
    vision encoder); `kv_cache_dtype="fp8"`; `cpu_offload_gb` keeps the vision encoder and mlp1 in
    pinned host memory through the UVA offloader (needs vLLM 0.32: before it the same flags offload
    the first decoder layers); `max_dynamic_patch` caps the tiles per image. A 4-bit lm_head needs no
    setting: vLLM reads `"lm_head": true` from the export's quantization_config."""
    out: dict[str, Any] = dict(BASE_SETTINGS)
    if max_model_len is not None:
        out["max_model_len"] = int(max_model_len)
    out["limit_mm_per_prompt"] = {"image": images_per_prompt}
    out["gpu_memory_utilization"] = util
    if kv_cache_dtype is not None:
        out["kv_cache_dtype"] = kv_cache_dtype
    if cpu_offload_gb:
        out["offload_backend"] = "uva"
        out["cpu_offload_gb"] = int(cpu_offload_gb)
        out["cpu_offload_params"] = list(TOWER_MODULES)
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


def recipe_settings(recipe: Recipe, images_per_prompt: int, max_model_len: int | None = None) -> dict[str, Any]:
    """`vllm_settings` for a recipe."""
    levers = set(recipe.levers)
    return vllm_settings(images_per_prompt if recipe.images else 0, recipe.util, max_model_len,
                         kv_cache_dtype="fp8" if "fp8-kv" in levers else None,
                         cpu_offload_gb=recipe.offload_gib or None,
                         max_dynamic_patch=FEWER_TILES if "tiles-6" in levers else None)


def recipe_flags(recipe: Recipe) -> list[str]:
    """Only the `vllm serve` flags the recipe's compromises add."""
    settings = recipe_settings(recipe, DEFAULT_IMAGES_PER_PROMPT)
    keep = {k for n in recipe.levers for k in LEVER_KEYS[n]}
    return serve_flags({k: v for k, v in settings.items() if k in keep})


def how(recipe: Recipe) -> str:
    """What to do for a recipe: the vLLM flags it adds (spelled by `vllm_settings`), and the re-export."""
    parts = ["awq --quantize-lm-head"] if "lm-head-4bit" in recipe.levers else []
    flags = recipe_flags(recipe)
    if flags:
        parts.append(shlex.join(flags))
    return "; ".join(parts) or "-"


def serve_args(model_dir: str | Path, settings: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The arguments after the `vllm` executable: our settings, less any flag the user names, then the user's flags."""
    extra = list(extra)
    return ["serve", str(model_dir), *serve_flags(settings, user_flags(extra)), *extra]


def serve_line(folder: str = "<folder>") -> str:
    """The shortest `vllm serve` line that runs an export, for people to read: the settings every server of
    this model needs (the folder as given, unquoted, so that a placeholder reads as one)."""
    return " ".join(["vllm", *serve_args(folder, BASE_SETTINGS)])


def planned_max_model_len(recipe: Recipe) -> int:
    """The context-length policy serve, chat and `eval --engine vllm` share: the longest context whose
    KV cache fits the card under `recipe`, capped at max_position_embeddings (0: none fits)."""
    return recipe.max_model_len
