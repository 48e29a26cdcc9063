"""Reasoning-aware calibration: the full-precision model's own replies to the calibration prompts.

A reasoning model spends most of its tokens inside its ``<think>`` chain, so activations
measured on prompts alone under-represent what the quantised model will mostly compute.
:func:`add_self_traces` lets the full-precision model answer every visual prompt first
(greedy, so the same model and settings always give the same reply) and stores the reply as
the sample's ``response``; the calibration encoder then feeds prompt + response + eos.

The stored response is exactly the text the model generated after the rendered generation
prompt (end-of-sequence token left out, and any image-block token dropped, which only
an untrained model writes): whether the chat template already opens the
``<think>`` block or the model writes it itself, prompt + response is the sequence the
model saw and produced.

Two engines write them: our runtime's ``generate`` (``transformers``, one prompt at a time on
one device) and vLLM's offline engine (``vllm``: the same `vllm.LLM` builder as `chat` and
`eval --engine vllm`, all missing prompts in one batch, tensor and pipeline parallel passed
through, the engine shut down before quantisation starts). The model writing them is the
full-precision source, or a 4-bit export (``--trace-model``, or the bootstrap's first pass).

Replies are cached on disk, one JSON file per model identity, settings and sample set,
written atomically (after every reply with transformers, after the batch with vLLM): a rerun
reads the file without loading the model, and an interrupted run resumes with the replies
still missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from r1v_quant.cache import CACHE_ENV, cache_folder, record_digest
from r1v_quant.errors import UserError
from r1v_quant.model.identity import model_identity
from r1v_quant.output import write_text_atomic

from .sample import Sample, sample_key

# 2: keyed on the weight files' headers and modification times; each reply carries its digest
CACHE_FORMAT = 2
TRACE_ENGINES = ("transformers", "vllm")
DTYPE = "bf16"  # what load_model uses by default; part of the settings a trace depends on

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------- keys


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_cache_dir() -> Path:
    """``$R1V_QUANT_CACHE/traces`` when the variable is set, else ``~/.cache/r1v-quant/traces``."""
    return cache_folder("traces")


def trace_settings(max_trace_tokens: int) -> dict:
    return {"max_trace_tokens": int(max_trace_tokens), "decoding": "greedy", "dtype": DTYPE}


def cache_file(cache_dir: Path, identity: dict, settings: dict, keys: Sequence[str]) -> Path:
    payload = json.dumps({"format": CACHE_FORMAT, "model": identity, "settings": settings, "samples": list(keys)},
                         sort_keys=True)
    name = Path(identity["path"]).name or "model"
    return cache_dir / f"{name}-{_sha256(payload.encode())[:24]}.json"


# ---------------------------------------------------------------- the cache file


def _read_cache(path: Path) -> tuple[dict[str, dict], list[str]]:
    """The replies already stored under ``path`` whose digests hold, and the keys of those whose
    digests do not (they are generated again); an unreadable file counts as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("traces"), dict):
        return {}, []
    good, damaged = {}, []
    for k, v in data["traces"].items():
        if isinstance(v, dict) and isinstance(v.get("response"), str) and v.get("digest") == record_digest(k, v):
            good[k] = v
        else:
            damaged.append(k)
    return good, damaged


def _cache_error(path: Path, error: OSError) -> UserError:
    return UserError(
        f"could not write the trace cache {path} ({error.strerror or error}); set {CACHE_ENV} to a writable folder."
    )


def _make_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cache_error(path, error) from None


def _write_atomic(path: Path, data: dict) -> None:
    _make_folder(path)
    try:
        write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    except OSError as error:
        raise _cache_error(path, error) from None


# ---------------------------------------------------------------- generation


def trace_record(tok, sample_id: str, token_ids: Sequence[int], finished: bool) -> dict:
    """One cached reply from the generated ids: the text after the generation prompt, eos left out."""
    from r1v_quant.model.prompt import IMG_CONTEXT, IMG_END, IMG_START

    body = list(token_ids)
    if finished and body and body[-1] == tok.eos_token_id:
        body = body[:-1]
    # image-block tokens in a reply would be read as image slots when the sample is encoded;
    # a trained model never writes them, an untrained one might
    markers = {tok.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, IMG_START, IMG_END)}
    body = [t for t in body if t not in markers]
    # decoded here rather than taken from a reply's text so no clean-up pass can alter spacing
    text = tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {"id": sample_id, "response": text, "tokens": len(body), "finished": bool(finished)}


def generate_trace(loaded, sample: Sample, max_trace_tokens: int) -> dict:
    """The model's greedy reply to one sample: the text after the generation prompt, eos left out."""
    from r1v_quant.model.generate import Sampling, reply_to, user_turn

    reply = reply_to(loaded, user_turn(sample.prompt, sample.images), Sampling(greedy=True, max_new_tokens=max_trace_tokens))
    return trace_record(loaded.tokenizer, sample.id, reply.token_ids, reply.finished)


def vllm_sampling(max_trace_tokens: int, eos: int) -> dict:
    """Greedy, stopping at the tokenizer's end-of-sequence token only (as our runtime's generate does)."""
    return {"max_tokens": int(max_trace_tokens), "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0,
            "ignore_eos": True, "stop_token_ids": [int(eos)], "detokenize": False, "seed": 0}


def generate_traces_vllm(folder: Path, samples: Sequence[Sample], max_trace_tokens: int, parallel=None) -> list[dict]:
    """Greedy replies to all ``samples`` from one vLLM engine, in one batch; the engine is shut down after."""
    from r1v_quant.deploy.vllm_engine import engine_kwargs, import_vllm, release_engine, with_card_recipe
    from r1v_quant.evals.vllm_pass import prompt_request
    from r1v_quant.model.config import load_config
    from r1v_quant.model.generate import encode_prompt
    from r1v_quant.model.r1v import load_tokenizer

    vllm = import_vllm()
    tok = load_tokenizer(folder)
    cfg = load_config(folder)
    # vLLM expands the image markers itself; the expanded length is ours to count for max_model_len
    longest = max(encode_prompt(cfg, tok, s.prompt, s.images)[0].shape[1] for s in samples)
    images = max(len(s.images) for s in samples)
    settings = engine_kwargs(str(folder), images, max_model_len=longest + max_trace_tokens + 1, parallel=parallel)
    settings = with_card_recipe(settings, cfg, images, parallel)
    params = vllm.SamplingParams(**vllm_sampling(max_trace_tokens, tok.eos_token_id))
    requests = [prompt_request(tok, s, longest) for s in samples]
    holder = {"llm": vllm.LLM(**settings.kwargs)}
    try:
        outputs = holder["llm"].generate(requests, params, use_tqdm=False)
    finally:
        release_engine(holder)
    return [trace_record(tok, s.id, out.outputs[0].token_ids, out.outputs[0].finish_reason == "stop")
            for s, out in zip(samples, outputs)]


def add_self_traces(
    samples: Sequence[Sample],
    model_dir,
    max_trace_tokens: int,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
    engine: str = "transformers",
    parallel=None,
    before_load: Callable[[], None] | None = None,
) -> list[Sample]:
    """Copies of ``samples`` whose ``response`` is the full-precision model's own greedy reply.

    Text samples (``kind == "text"``) and samples that already carry a reply (chat data) are returned
    as they are. Replies come from the cache
    under ``cache_dir`` (default :func:`default_cache_dir`) when present; the model is loaded
    only if some reply is missing, and each new reply is stored as soon as it is generated.
    ``progress(done, total)`` is called after each generated reply (after the batch with vLLM),
    ``total`` counting only the replies that were missing. A cached reply whose digest does not
    hold is generated again, and ``on_warning`` (default: standard error) hears how many.
    ``engine`` is "transformers" or "vllm" (``parallel``: its `Parallel` settings); ``before_load``
    runs when some reply is missing, before anything is written or loaded (the memory pre-check).
    """
    from r1v_quant.model.checkpoint import resolve_model

    if max_trace_tokens < 1:
        raise UserError(f"--max-trace-tokens must be at least 1 (got {max_trace_tokens}).")
    if engine not in TRACE_ENGINES:
        raise UserError(f"--trace-engine {engine} is not one of {', '.join(TRACE_ENGINES)}.")
    samples = list(samples)
    # text samples have no question to answer; chat samples carry their reply already
    wanted = [i for i, s in enumerate(samples) if s.kind != "text" and not s.response]
    if not wanted:
        return samples

    folder = resolve_model(model_dir)
    identity = model_identity(folder)
    settings = trace_settings(max_trace_tokens)
    if engine != "transformers":  # another engine's greedy replies may differ at near-ties: cached apart
        settings["engine"] = engine
    keys = {i: sample_key(samples[i]) for i in wanted}
    path = cache_file(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), identity, settings,
                      [keys[i] for i in wanted])
    traces, damaged = _read_cache(path)
    missing = [i for i in wanted if keys[i] not in traces]
    if damaged:
        (on_warning or _to_stderr)(f"{len(damaged)} cached trace(s) in {path} failed their checksum; "
                                   "they are generated again.")

    if missing and engine == "vllm":
        if before_load is not None:
            before_load()
        _make_folder(path)
        replies = generate_traces_vllm(folder, [samples[i] for i in missing], max_trace_tokens, parallel)
        traces.update({keys[i]: {**reply, "digest": record_digest(keys[i], reply)} for i, reply in zip(missing, replies)})
        _write_atomic(path, {"format": CACHE_FORMAT, "model": identity, "settings": settings, "traces": traces})
        if progress is not None:
            progress(len(missing), len(missing))
    elif missing:
        from r1v_quant.model.r1v import load_model

        if before_load is not None:
            before_load()
        _make_folder(path)  # before minutes of generation, not after the first reply
        record = {"format": CACHE_FORMAT, "model": identity, "settings": settings, "traces": traces}
        loaded = load_model(folder, device=device)
        try:
            for done, i in enumerate(missing, start=1):
                trace = generate_trace(loaded, samples[i], max_trace_tokens)
                traces[keys[i]] = {**trace, "digest": record_digest(keys[i], trace)}
                _write_atomic(path, record)
                if progress is not None:
                    progress(done, len(missing))
        finally:
            del loaded
            _free_device_memory()

    out = list(samples)
    for i in wanted:
        out[i] = dataclasses.replace(samples[i], response=traces[keys[i]]["response"])
    return out


def _to_stderr(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)


def _free_device_memory() -> None:
    """Give the full-precision model's memory back before quantisation needs it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
