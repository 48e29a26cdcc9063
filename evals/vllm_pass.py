"""`eval --engine vllm`: each model's replies from vLLM's offline `LLM`, and teacher forcing
through its `prompt_logprobs`.

One engine is alive at a time; it is shut down and its memory freed before the next model
starts (`r1v_quant.deploy.vllm_engine.release_engine`). Each prompt goes to vLLM as token ids
with its `<image>` markers unexpanded and the pictures as `multi_modal_data`, so vLLM's own
processor tiles the images and expands the markers; replies stop at the tokenizer's
end-of-sequence token only, as with the torch engine.

Teacher forcing: the prompt plus the reference's reply (its first `kl_positions` tokens) is
sent back as a prompt with `prompt_logprobs`. The reference keeps its top-k log-probabilities
per position (the same summary the torch engine stores, its tail mass derived from the top k);
every other model returns its top 2k, and `r1v_quant.evals.forcing.coarse_kl_topk` gives the
same coarse-grained KL as the torch engine: the reference's top-k tokens plus one bin for the
rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals.forcing import (
    Closeness,
    ItemResult,
    Reply,
    coarse_kl_topk,
    cut_reply,
    encode,
    prompt_opens_think,
    summary_from_topk,
)
from r1v_quant.evals.ref_cache import ReferenceCache, RefItem
from r1v_quant.evals.settings import EvalSettings

CANDIDATE_TOP_K_FACTOR = 2   # a compared model returns its top 2k, so that it almost always covers the reference's k
GENERATE_CHUNK = 256         # questions per generate call: vLLM batches them; the cache is written after each
FORCE_CHUNK = 8              # sequences per teacher-forcing call: vLLM returns log-probs of every prompt position


def prompt_request(tok, sample: Sample, text_tokens: int) -> dict[str, Any]:
    """What vLLM is given for one sample: token ids with one `<image>` marker per picture, and the pictures."""
    from r1v_quant.model.generate import user_turn
    from r1v_quant.model.prompt import IMAGE_PLACEHOLDER, render_chat

    if sample.kind == "text":
        return {"prompt_token_ids": tok(sample.prompt, add_special_tokens=True).input_ids[:text_tokens]}
    text = user_turn(sample.prompt, sample.images).turns[0].text
    pieces = render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True).split(IMAGE_PLACEHOLDER)
    marker = tok(IMAGE_PLACEHOLDER, add_special_tokens=False).input_ids
    ids = tok(pieces[0], add_special_tokens=False).input_ids
    for piece in pieces[1:]:
        ids += marker + tok(piece, add_special_tokens=False).input_ids
    request: dict[str, Any] = {"prompt_token_ids": ids}
    if sample.images:
        request["multi_modal_data"] = {"image": [im.convert("RGB") for im in sample.images]}
    return request


def sampling_kwargs(settings: EvalSettings, eos: int, index: int) -> dict[str, Any]:
    """vLLM SamplingParams for question `index`: greedy, or the vendor's sampling with a per-question seed."""
    kwargs: dict[str, Any] = {"max_tokens": settings.max_new_tokens, "ignore_eos": True, "stop_token_ids": [eos],
                              "detokenize": False}
    if settings.greedy:
        return {**kwargs, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    return {**kwargs, "temperature": settings.temperature, "top_p": settings.top_p,
            "repetition_penalty": settings.repetition_penalty, "seed": settings.seed * 1_000_003 + index}


def reply_of(tok, token_ids: Sequence[int], stopped: bool) -> Reply:
    """vLLM's output as the torch engine's Reply (the end-of-sequence token kept when reached)."""
    ids, eos = list(token_ids), tok.eos_token_id
    if stopped and (not ids or ids[-1] != eos):
        ids.append(eos)
    return cut_reply(tok, ids, eos)


def position_arrays(steps: Sequence[dict], targets: Sequence[int], k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's per-position {token: Logprob} as (ids [P, k], log-probs [P, k], nll of the next token [P])."""
    ids, logp, nll = [], [], []
    for step, target in zip(steps, targets):
        ranked = sorted((v.rank, tok_id, v.logprob) for tok_id, v in step.items() if v.rank is not None and v.rank <= k)
        if len(ranked) < k:
            raise UserError(f"vLLM returned {len(ranked)} log-probabilities for a position where {k} were asked; "
                            "the vocabulary is smaller than the top-k the eval keeps.")
        ids.append([r[1] for r in ranked[:k]])
        logp.append([r[2] for r in ranked[:k]])
        nll.append(-step[target].logprob)
    return (torch.tensor(ids, dtype=torch.long).reshape(-1, k), torch.tensor(logp, dtype=torch.float32).reshape(-1, k),
            torch.tensor(nll, dtype=torch.float32))


def measured_steps(prompt_logprobs: Sequence, prompt_ids: Sequence[int], forced_len: int | None
                   ) -> tuple[list[dict], list[int]]:
    """The measured positions of one teacher-forced sequence: each one's log-probs and next token.
    With a reply (question suites), the reply's tokens; without (text suites), every token but the first."""
    start = 1 if forced_len is None else len(prompt_ids) - forced_len
    return list(prompt_logprobs[start:]), list(prompt_ids[start:])


@dataclass
class VllmModel:
    """One model's vLLM engine and its checkpoint tokenizer, alive until `close`."""

    label: str
    folder: Path
    settings: EvalSettings
    samples: Sequence[Sample]
    logprobs: int
    cleanup: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        from r1v_quant.deploy.vllm_engine import engine_kwargs, import_vllm
        from r1v_quant.model.config import load_config
        from r1v_quant.model.r1v import load_tokenizer

        self.vllm = import_vllm()
        self.tokenizer = load_tokenizer(self.folder)
        cfg = load_config(self.folder)
        view = SimpleNamespace(tokenizer=self.tokenizer, config=cfg)
        longest = max(encode(view, s, self.settings.text_tokens).ids.shape[1] for s in self.samples)
        images = max(len(s.images) for s in self.samples)
        extra = 0 if self.samples[0].kind == "text" else self.settings.max_new_tokens
        self.engine = engine_kwargs(str(self.folder), images, max_model_len=longest + extra + 1,
                                    parallel=parallel_of(self.settings), max_logprobs=self.logprobs)
        self.engine.kwargs["seed"] = self.settings.seed
        self.holder: dict[str, Any] = {"llm": self.vllm.LLM(**self.engine.kwargs)}

    @property
    def llm(self):
        return self.holder["llm"]

    def requests(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [prompt_request(self.tokenizer, self.samples[i], self.settings.text_tokens) for i in indices]

    def generate(self, indices: Sequence[int]) -> list[tuple[list[int], Reply, bool]]:
        """(vLLM's expanded prompt ids, reply, whether the prompt opened the reasoning block) per index."""
        eos = self.tokenizer.eos_token_id
        params = [self.vllm.SamplingParams(**sampling_kwargs(self.settings, eos, i)) for i in indices]
        outs = self.llm.generate(self.requests(indices), params, use_tqdm=False)
        found = []
        for out in outs:
            prompt_ids = list(out.prompt_token_ids)
            reply = reply_of(self.tokenizer, out.outputs[0].token_ids, out.outputs[0].finish_reason == "stop")
            found.append((prompt_ids, reply, prompt_opens_think(self.tokenizer, torch.tensor([prompt_ids]))))
        return found

    def force(self, indices: Sequence[int], forced: Sequence[Sequence[int] | None], k: int):
        """Per index: (expanded prompt ids, ids [P, k], log-probs [P, k], nll [P]) along the forced reply."""
        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        requests = self.requests(indices)
        for request, reply in zip(requests, forced):
            if reply is not None:
                request["prompt_token_ids"] = request["prompt_token_ids"] + list(reply)
        out = []
        for lo in range(0, len(requests), FORCE_CHUNK):
            chunk = requests[lo:lo + FORCE_CHUNK]
            for reply, result in zip(forced[lo:lo + FORCE_CHUNK], self.llm.generate(chunk, params, use_tqdm=False)):
                ids = list(result.prompt_token_ids)
                steps, targets = measured_steps(result.prompt_logprobs, ids, None if reply is None else len(reply))
                out.append((ids if reply is None else ids[:len(ids) - len(reply)], *position_arrays(steps, targets, k)))
        return out

    def close(self) -> None:
        from r1v_quant.deploy.vllm_engine import release_engine

        release_engine(self.holder)
        if self.cleanup is not None:
            self.cleanup()


def parallel_of(settings: EvalSettings):
    from r1v_quant.deploy.vllm_engine import Parallel

    return Parallel(settings.tensor_parallel_size, settings.pipeline_parallel_size,
                    settings.distributed_executor_backend)


def _forced_reply(reply: Reply | None, settings: EvalSettings) -> list[int] | None:
    return None if reply is None else list(reply.ids)[:settings.kl_positions]


def reference_pass(model: VllmModel, missing: Sequence[int], cache: ReferenceCache, items: list,
                   step: Callable[[int], None]) -> None:
    """The reference's replies and top-k summaries for the questions not in the cache, saved as they come."""
    settings, qa = model.settings, model.samples[0].kind != "text"
    for lo in range(0, len(missing), GENERATE_CHUNK):
        chunk = list(missing[lo:lo + GENERATE_CHUNK])
        made = model.generate(chunk) if qa else [(None, None, False)] * len(chunk)
        step(len(chunk) if qa else 0)
        forced = [_forced_reply(reply, settings) for _, reply, _ in made]
        for i, (_, reply, opened), (prompt_ids, ids, logp, nll) in zip(chunk, made,
                                                                       model.force(chunk, forced, settings.top_k)):
            items[i] = RefItem(model.samples[i].id, prompt_ids, reply, opened, summary_from_topk(logp, ids, nll))
            cache.save(i, items[i])
            step(1)


def candidate_pass(model: VllmModel, ref_items: Sequence[RefItem], step: Callable[[int], None]) -> list[ItemResult]:
    """A compared model's own replies, then its closeness to the reference along the reference's replies."""
    settings, qa = model.settings, model.samples[0].kind != "text"
    indices = list(range(len(ref_items)))
    made: list = []
    for lo in range(0, len(indices), GENERATE_CHUNK) if qa else ():
        made += model.generate(indices[lo:lo + GENERATE_CHUNK])
        step(len(indices[lo:lo + GENERATE_CHUNK]))
    if not qa:
        made = [(None, None, False)] * len(indices)
    forced = [_forced_reply(ref.reply, settings) for ref in ref_items]
    k = settings.top_k * CANDIDATE_TOP_K_FACTOR
    results = []
    for i, (_, reply, opened), (prompt_ids, ids, logp, nll) in zip(indices, made, model.force(indices, forced, k)):
        ref = ref_items[i]
        if prompt_ids != ref.prompt_ids:
            raise UserError(f"{model.label} encodes question {ref.sample_id} differently from the reference "
                            "(another tokenizer or image settings), so the two cannot be compared.")
        if ids.shape[0] != ref.dist.top1.shape[0]:
            raise UserError("the reference's cached outputs do not match the sequence being compared; "
                            "clear the eval cache (--no-cache or --cache-dir) and run again.")
        close = Closeness(float(coarse_kl_topk(ref.dist, ids, logp).double().sum()),
                          int((ids[:, 0] == ref.dist.top1).sum()), float(nll.double().sum()), int(ids.shape[0]))
        results.append(ItemResult(ref.sample_id, reply, opened, close))
        step(1)
    return results


@contextmanager
def vllm_model(spec, suite, settings: EvalSettings, logprobs: int):
    """The engine for a model spec whose `load` gives (folder, cleanup or None), freed on leaving."""
    folder, cleanup = spec.load()
    model = None
    try:
        model = VllmModel(spec.label, Path(folder), settings, suite.samples, logprobs, cleanup)
        yield model
    finally:
        if model is not None:
            model.close()
        elif cleanup is not None:
            cleanup()


def rtn_export_folder(reference: Path, group_size: int, settings: EvalSettings) -> tuple[Path, Callable[[], None]]:
    """The RTN baseline written as an AWQ export next to the eval cache, and how to remove it."""
    import shutil
    import tempfile

    from r1v_quant.evals.ref_cache import default_cache_dir
    from r1v_quant.quant.baselines import write_rtn_export

    root = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"rtn-w4-g{group_size}-", dir=root))
    try:
        write_rtn_export(reference, group_size, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, lambda: shutil.rmtree(folder, ignore_errors=True)


def check_engine(baselines: Sequence[str], need_vllm: bool = True) -> None:
    """Refuse what `--engine vllm` cannot run, before any model is loaded: a baseline vLLM cannot
    load, or vLLM itself missing (one sentence saying how to install it)."""
    from r1v_quant.evals.settings import VLLM_BASELINES

    for base in baselines:
        if base not in VLLM_BASELINES:
            raise UserError(f"--baseline {base} runs with --engine torch only; --engine vllm takes "
                            f"{', '.join(VLLM_BASELINES)}.")
    if need_vllm:
        from r1v_quant.deploy.vllm_engine import import_vllm

        import_vllm()
