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

from r1v_quant.deploy.plan import DEFAULT_MAX_BATCHED_TOKENS, MIN_USEFUL_CONTEXT, CardFit, make_plan, max_tiles
from r1v_quant.deploy.units import GiB, human_int
from r1v_quant.errors import UserError
from r1v_quant.model.config import R1VConfig

VLLM_MISSING = ("vLLM is not installed; pip install 'r1v-quant[vllm]' on a CUDA machine, "
                "or see scripts/vllm-env.sh for CPU checks.")
VLLM_MODULE = "vllm.entrypoints.cli.main"
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_UTIL = 0.9

# The flags we set, by their canonical vLLM name.
OURS = ("trust-remote-code", "dtype", "max-model-len", "limit-mm-per-prompt", "gpu-memory-utilization")
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


def vllm_settings(images_per_prompt: int, util: float, max_model_len: int | None = None) -> dict[str, Any]:
    """What this model needs from vLLM (see the module doc), as `vllm.LLM` keyword arguments;
    `serve_flags` spells the same settings for `vllm serve`."""
    out: dict[str, Any] = {"trust_remote_code": True, "dtype": "bfloat16"}
    if max_model_len is not None:
        out["max_model_len"] = int(max_model_len)
    out["limit_mm_per_prompt"] = {"image": images_per_prompt}
    out["gpu_memory_utilization"] = util
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
        else:
            args += [f"--{flag}", f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def build_serve(model_dir: str | Path, cfg: R1VConfig, gpu_bytes: int | None, extra_args: Sequence[str] = (),
                util: float = DEFAULT_UTIL, images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
                gpu_label: str | None = None) -> ServeCommand:
    """`vllm serve` arguments for an export (after the executable), with notes for the user.

    `gpu_bytes` is the card to plan --max-model-len for; None means no GPU was found, and the
    flag is left to vLLM. `extra_args` go last, unchanged, and any flag they name replaces ours.
    """
    extra = list(extra_args)
    given = user_flags(extra)
    if not 0 < util <= 1:
        raise UserError(f"--util {util} must lie in (0, 1], e.g. 0.9.")
    if images_per_prompt < 0:
        raise UserError(f"--images {images_per_prompt} is below 0.")
    notes: list[str] = []

    # What the server will really run with: the user's values where given.
    run_util = _number(extra, "gpu-memory-utilization", float, util)
    if not 0 < run_util <= 1:
        raise UserError(f"--gpu-memory-utilization {run_util} must lie in (0, 1].")
    images = images_per_prompt
    if "limit-mm-per-prompt" in given:
        text = user_value(extra, "limit-mm-per-prompt")
        images = images_from_limit(text) if text is not None else images
    kv = (user_value(extra, "kv-cache-dtype") or "auto").lower()
    kv = "fp8" if kv.startswith("fp8") else "bf16"
    chunk = _number(extra, "max-num-batched-tokens", human_int, DEFAULT_MAX_BATCHED_TOKENS)
    offload_gb = _number(extra, "cpu-offload-gb", float, 0.0)

    if "dtype" in given and (user_value(extra, "dtype") or "").lower() in ("half", "float16", "fp16"):
        notes.append("--dtype float16 was kept as given, but fp16 AWQ kernels overflow on Qwen2; bfloat16 is safer.")

    result = ServeCommand([], notes)
    if "max-model-len" in given:
        notes.append("--max-model-len as given (vLLM 0.32 and later also take 'auto', which measures the card); "
                     "`r1v-quant plan` shows what fits each GPU.")
    elif given & set(PARALLEL_FLAGS):
        notes.append("--max-model-len left to vLLM: the plan is for one GPU and this server spans several.")
    elif gpu_bytes is None:
        notes.append("no CUDA GPU found, so --max-model-len is left to vLLM; pass --gpu-mem (e.g. 80GiB) to plan for a card.")
    else:
        label = gpu_label or f"{gpu_bytes / GiB:.1f} GiB GPU"
        # --cpu-offload-gb moves that many GB of weights off the card: plan for a card whose
        # budget (util x size) is larger by exactly that much.
        planned_card = gpu_bytes + int(offload_gb * 1e9 / run_util)
        plan = make_plan(cfg, source=str(model_dir), kv_dtype=kv, util=run_util,
                         gpu_mems=[(label, planned_card)], max_batched_tokens=chunk, images=images > 0)
        card = plan.cards[0]
        result.card = card
        if card.max_model_len <= 0:
            raise UserError(
                f"{model_dir} does not fit the {label} at --gpu-memory-utilization {run_util} ({card.reason}); "
                "pass --max-model-len yourself to try anyway, or see `r1v-quant plan` for what would fit.")
        result.max_model_len = card.max_model_len
        detail = f"{card.max_context:,d} tokens of KV cache fit the {label} at {run_util:.0%}"
        if card.max_model_len < card.max_context:
            detail += f", capped at max_position_embeddings {card.max_model_len:,d}"
        notes.append(f"--max-model-len {card.max_model_len} from the plan: {detail}.")
        if card.max_context < MIN_USEFUL_CONTEXT:
            notes.append(f"that is under {MIN_USEFUL_CONTEXT} tokens, too short for one large image and an answer; "
                         "`r1v-quant plan` lists ways to lengthen it.")
        if images > 0:
            per_image = max_tiles(cfg) * cfg.num_image_token
            if images * per_image > card.max_model_len:
                notes.append(f"{images} images at the most tiles take {images * per_image:,d} tokens, more than the "
                             "context; smaller images take fewer.")

    settings = vllm_settings(images_per_prompt, util, result.max_model_len)
    result.args = ["serve", str(model_dir), *serve_flags(settings, given), *extra]
    return result


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
