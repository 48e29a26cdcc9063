"""One-shot chat through vLLM's Python API (`r1v-quant chat --engine vllm`).

The prompt is rendered with the checkpoint tokenizer's own chat template. Images go to vLLM as
`multi_modal_data={"image": [PIL images]}`, and the user text carries one `<image>` per image:
vLLM's Skywork-R1V processor (the InternVL one) replaces each `<image>` with `<img>`, 256
`<IMG_CONTEXT>` per tile and `</img>`, in order. Without markers in the text, one `<image>\\n` per
image goes in front of it, as in the vendor's chat.

The engine is built with what this model needs: `trust_remote_code`, bfloat16 activations (the
fp16 AWQ kernels overflow on Qwen2), a `max_model_len` by `vllm_args`' context-length policy for the GPU
found, and `limit_mm_per_prompt` set to the number of images (0 for text only, so that no vision
activations are profiled, and recent vLLM does not even load the vision tower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1v_quant.deploy.vllm_args import VLLM_MISSING, planned_max_model_len, vllm_settings
from r1v_quant.errors import UserError
from r1v_quant.model.prompt import IMAGE_PLACEHOLDER, with_image_placeholders


def import_vllm():
    """The vllm module, or UserError saying how to get it."""
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "vllm":
            raise UserError(VLLM_MISSING) from None
        raise UserError(f"vLLM is installed but does not import here: module {e.name} is missing.") from None
    except Exception as e:  # noqa: BLE001 - broken native deps surface as many error types
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"vLLM is installed but does not import here ({type(e).__name__}: {first}).") from None
    return vllm


def with_placeholders(prompt: str, n_images: int) -> str:
    """The user text with exactly one `<image>` per image: kept where the user wrote them, else prepended."""
    prompt = with_image_placeholders(prompt, n_images)
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != n_images:
        raise UserError(f"the prompt has {found} {IMAGE_PLACEHOLDER} markers but {n_images} images were given; "
                        f"use one marker per image, or none to put the images first.")
    return prompt


def open_images(paths: Sequence[str | Path]) -> list[Any]:
    """PIL RGB images; UserError naming the first file that is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise UserError(f"image {path} does not exist.")
        try:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"image {path} could not be read ({type(e).__name__}).") from None
    return out


def render_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The chat-template rendering of one user turn (and a system prompt), ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the checkpoint's tokenizer has no chat template, so the prompt cannot be rendered.")
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(model: str):
    """The checkpoint's own tokenizer (a folder or a Hugging Face id)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model), trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - missing files, bad remote code and hub errors all end the same way
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"the tokenizer of {model} could not be loaded ({type(e).__name__}: {detail[:200]}).") from None


def sampling_kwargs(sampling) -> dict[str, Any]:
    """vLLM SamplingParams arguments for an `r1v_quant.model.generate.Sampling`; greedy is temperature 0."""
    kwargs: dict[str, Any] = {"max_tokens": int(sampling.max_new_tokens)}
    if sampling.greedy:
        kwargs.update(temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    else:
        kwargs.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                      repetition_penalty=float(sampling.repetition_penalty))
    if sampling.seed is not None:
        kwargs["seed"] = int(sampling.seed)
    return kwargs


@dataclass
class EngineSettings:
    kwargs: dict[str, Any]
    note: str


@dataclass(frozen=True)
class Parallel:
    """How one engine spreads over GPUs (and nodes, through Ray): vLLM's own arguments, passed through."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None   # None: vLLM's choice (mp on one node, ray across nodes)

    @property
    def gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size,
                               "pipeline_parallel_size": self.pipeline_parallel_size}
        if self.distributed_executor_backend is not None:
            out["distributed_executor_backend"] = self.distributed_executor_backend
        return out


def engine_kwargs(model: str, n_images: int, gpu_bytes: int | None = None, max_model_len: int | None = None,
                  util: float = 0.9, parallel: Parallel | None = None, max_logprobs: int | None = None
                  ) -> EngineSettings:
    """`vllm.LLM` arguments for this model (chat and eval alike); max_model_len from the plan
    when a GPU is known and the engine has one GPU."""
    from r1v_quant.deploy.serve import gpu_memory

    kwargs: dict[str, Any] = {"model": str(model), **vllm_settings(n_images, util, max_model_len)}
    if parallel is not None:
        kwargs.update(parallel.kwargs())
    if max_logprobs is not None:
        kwargs["max_logprobs"] = int(max_logprobs)
    if max_model_len is not None:
        return EngineSettings(kwargs, f"max_model_len {max_model_len} as given")
    if parallel is not None and parallel.gpus > 1:
        return EngineSettings(kwargs, "max_model_len left to vLLM: the plan is for one GPU and this engine spans several")
    if gpu_bytes is None:
        found = gpu_memory()
        gpu_bytes = found[0] if found else None
    if gpu_bytes is None:
        return EngineSettings(kwargs, "no CUDA GPU found: max_model_len left to vLLM")
    from r1v_quant.deploy.compromises import evaluate
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.model.checkpoint import resolve_config

    cfg, source = resolve_config(str(model))
    plan = make_plan(cfg, source=source, util=util, gpu_mems=[("GPU", gpu_bytes)], images=n_images > 0)
    # The engine is given no compromise's settings, so its recipe is the export as it is.
    length = planned_max_model_len(evaluate(plan.basis, gpu_bytes, frozenset()))
    if length <= 0:
        raise UserError(f"{model} does not fit this {gpu_bytes / 1024**3:.1f} GiB GPU ({plan.cards[0].reason}); "
                        "`r1v-quant plan` shows what would fit.")
    kwargs["max_model_len"] = length
    return EngineSettings(kwargs, f"max_model_len {length} from the plan")


def drop_leading_bos(tokenizer, text: str) -> str:
    """vLLM tokenizes prompts with special tokens on; a template that already wrote BOS would get two."""
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def chat_once(model: str | Path, prompt: str, image_paths: Sequence[str | Path], sampling, system: str | None = None,
              *, gpu_bytes: int | None = None, max_model_len: int | None = None) -> str:
    """Answer one prompt (with images) through vLLM and return the generated text (reasoning included)."""
    vllm = import_vllm()
    images = open_images(image_paths)
    tokenizer = load_tokenizer(str(model))
    text = drop_leading_bos(tokenizer, render_prompt(tokenizer, with_placeholders(prompt, len(images)), system))
    settings = engine_kwargs(str(model), len(images), gpu_bytes=gpu_bytes, max_model_len=max_model_len)
    llm = vllm.LLM(**settings.kwargs)
    request: dict[str, Any] = {"prompt": text}
    if images:
        request["multi_modal_data"] = {"image": images}
    try:
        outputs = llm.generate([request], vllm.SamplingParams(**sampling_kwargs(sampling)), use_tqdm=False)
    except ValueError as e:   # vLLM's request validation (prompt longer than max_model_len, ...)
        first = str(e).strip().split(". ")[0].rstrip(".")
        raise UserError(f"vLLM rejected the request: {first}.") from None
    return outputs[0].outputs[0].text


def release_engine(holder: dict) -> None:
    """Shut down the engine in ``holder["llm"]`` and free its memory before the next one starts
    (the caller's dict is the only other reference, so the engine can be collected)."""
    import gc

    llm = holder.pop("llm", None)
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - a half-started engine may fail to stop; its memory is freed below
            pass
    del llm, core, shutdown
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001 - versions without these helpers need only the collection below
        pass
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - no CUDA runtime: nothing to empty
        pass


def with_card_recipe(settings: EngineSettings, cfg, n_images: int, parallel: Parallel | None = None,
                     gpu_bytes: int | None = None) -> EngineSettings:
    """A 4-bit export on one GPU gets that card's best serving recipe from the plan (tower offload,
    fp8 KV cache and so on) over `engine_kwargs`' settings; anything else is returned unchanged."""
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.deploy.serve import gpu_memory, recipe_settings

    if not cfg.quantization or (parallel is not None and parallel.gpus > 1):
        return settings
    if gpu_bytes is None:
        found = gpu_memory()
        gpu_bytes = found[0] if found else None
    if gpu_bytes is None:
        return settings
    recipe = make_plan(cfg, gpu_mems=[("GPU", gpu_bytes)]).cards[0].best
    kwargs = {**settings.kwargs, **recipe_settings(recipe, n_images, settings.kwargs.get("max_model_len"))}
    return EngineSettings(kwargs, f"{settings.note}; the card's recipe: {' + '.join(recipe.levers) or 'as exported'}")
