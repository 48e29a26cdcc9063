"""Running an accuracy comparison: suites, each model's replies, and how close each model
stays to the reference token by token.

Models are evaluated one after another and freed in between, so two 38B models are never
resident together.  The reference goes first.  For every question it answers, and for
every measured position of its own prompt + reply (or of the text, for text suites), it
leaves on disk its top-k next-token log-probabilities, the log of the remaining mass, its
most likely token and the log-probability of the actual next token.  Every other model
then reads exactly those sequences (teacher forcing) and is compared with the stored
distributions, so the reference never needs loading again and a second candidate costs
only its own run.

KL from a top-k summary: the reference's distribution is coarse-grained into k + 1 bins
(its k most likely tokens and "everything else"), the candidate's into the same bins, and
the KL of the binned pair is reported.  Merging bins never increases KL, so this is a
lower bound of the full KL that is exact once k reaches the vocabulary size; in practice
the reference puts nearly all its mass on its top 64 tokens, where the two differ.  The
candidate's numbers come from the same code on the same inputs, so an identical model
scores exactly 0.

The cache lives in ``$R1V_QUANT_CACHE/eval`` (default ``~/.cache/r1v-quant/eval``), one
folder per model identity, suite, question set and settings, one file per question,
written as soon as the question is done: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals import report
from r1v_quant.evals.scoring import THINK_CLOSE, extract_answer, is_correct, reasoning_length

CACHE_FORMAT = 1
CACHE_ENV = "R1V_QUANT_CACHE"
DEFAULT_LIMITS = {"builtin": 64, "r1v-mini": 120, "text": 64}  # other suites: every question they hold
BASELINES = ("rtn", "nf4")
SUITE_FORMS = "builtin, r1v-mini, mmmu-sample, text:PATH (.txt or .jsonl), or a folder / .parquet file in MMMU's layout"
DEFAULT_GROUP_SIZE = 128

# (model label, questions done, questions in all) after each step of one model's work.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class EvalSettings:
    suite: str = "builtin"
    data_path: Path | None = None
    limit: int | None = None          # None: the suite's default (see DEFAULT_LIMITS)
    seed: int = 0
    max_new_tokens: int = 2048
    greedy: bool = True               # deterministic, so reruns and the cache agree
    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    batch_size: int = 4
    device: str | None = None
    dtype: str = "bf16"
    cache_dir: Path | None = None
    use_cache: bool = True
    top_k: int = 64                   # reference log-probs kept per position
    kl_positions: int = 1024          # measured positions per reply (its first tokens)
    text_tokens: int = 2048           # longest text-suite item, in tokens

    def generation(self) -> dict:
        """The settings a reply depends on (part of the cache key)."""
        out = {"max_new_tokens": self.max_new_tokens, "greedy": self.greedy, "batch_size": self.batch_size,
               "dtype": self.dtype}
        if not self.greedy:
            out.update(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                       seed=self.seed)
        return out

    def describe(self) -> dict:
        """Run settings for the report."""
        decoding = "greedy" if self.greedy else (
            f"sampled (temperature {self.temperature}, top_p {self.top_p}, "
            f"repetition_penalty {self.repetition_penalty}, seed {self.seed})")
        return {"suite": self.suite, "data_path": None if self.data_path is None else str(self.data_path),
                "limit": self.limit, "seed": self.seed, "decoding": decoding,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "dtype": self.dtype,
                "kl": f"top-{self.top_k} coarse-grained KL(reference || model) on the reference's own outputs, "
                      f"first {self.kl_positions} reply tokens per question"}


def check_settings(s: EvalSettings) -> None:
    for name, value in (("--limit", s.limit if s.limit is not None else 1), ("--max-new-tokens", s.max_new_tokens),
                        ("--batch-size", s.batch_size), ("top-k", s.top_k), ("KL positions", s.kl_positions),
                        ("text tokens", s.text_tokens)):
        if value < 1:
            raise UserError(f"{name} must be at least 1 (got {value}).")


# ---------------------------------------------------------------- suites


@dataclass
class Suite:
    spec: str
    name: str
    kind: str                  # "qa": questions with gold answers; "text": perplexity on text
    samples: list[Sample]


def suite_loader(spec: str, data_path: Path | None) -> tuple[str, str, Callable[[int | None, int], list[Sample]]]:
    """(display name, kind, loader(limit, seed)) of a suite spec; bad specs fail here."""
    from r1v_quant.calib.builtin import builtin_samples
    from r1v_quant.calib.mmmu import load_mmmu
    from r1v_quant.calib.text import load_text

    if spec == "builtin":
        return "builtin", "qa", lambda n, seed: builtin_samples(n or DEFAULT_LIMITS["builtin"], seed=seed, split="eval")
    if spec == "r1v-mini":
        from r1v_quant.calib.skills import suite_samples

        return "r1v-mini", "qa", lambda n, seed: suite_samples(n or DEFAULT_LIMITS["r1v-mini"], seed=seed)
    if spec == "mmmu-sample":
        return "mmmu-val", "qa", lambda n, seed: load_mmmu(data_path, n=n or 10**9, seed=seed)
    if spec.startswith("text:") and len(spec) > len("text:"):
        path = Path(spec[len("text:"):]).expanduser()
        return f"text:{path.name}", "text", lambda n, seed: load_text(path, n=n or DEFAULT_LIMITS["text"], seed=seed)
    path = Path(spec).expanduser()
    if path.is_dir() or path.suffix == ".parquet":
        return path.name or spec, "qa", lambda n, seed: load_mmmu(path, n=n or 10**9, seed=seed)
    raise UserError(f"unknown suite {spec!r}; use {SUITE_FORMS}.")


def load_suite(settings: EvalSettings) -> Suite:
    from r1v_quant.calib.mmmu import NO_DATA_MESSAGE

    name, kind, load = suite_loader(settings.suite, settings.data_path)
    try:
        samples = load(settings.limit, settings.seed)
    except UserError as error:
        if str(error) != NO_DATA_MESSAGE:
            raise
        # the calibration wording names awq's flags; say it with this command's
        raise UserError("MMMU validation data is not available offline and the Hugging Face Hub cannot be reached; "
                        "download the MMMU/MMMU parquet files on a connected machine and pass their folder with "
                        "--data-path (or use --suite builtin).") from None
    if not samples:
        raise UserError(f"suite {settings.suite!r} has no questions.")
    if kind == "qa":
        unanswered = [s.id for s in samples if s.answer is None or not str(s.answer).strip()]
        if unanswered:
            raise UserError(f"suite {settings.suite!r}: question {unanswered[0]} has no gold answer, so it cannot be scored.")
    return Suite(settings.suite, name, kind, samples)


def calibration_overlap(candidate: Path, suite: Suite, data_path: Path | None) -> str | None:
    """A warning when questions of the suite were also calibration questions of the
    candidate, recomputed from the recipe saved in its r1v_quant_report.json; None when clean."""
    from r1v_quant.calib.sets import load_calibration
    from r1v_quant.quant.recipe import read_recipe

    try:
        recipe = read_recipe(candidate)
    except ValueError as error:
        return f"{error}, so the overlap of eval and calibration questions was not checked."
    if recipe is None:
        return None
    try:
        calib_ids = {s.id for s in load_calibration(recipe.spec, n=recipe.samples, seed=recipe.seed,
                                                    calib_path=data_path or recipe.path, mix=recipe.mix)}
    except UserError as error:
        return f"the overlap of eval and calibration questions was not checked ({error})"
    shared = [s.id for s in suite.samples if s.id in calib_ids]
    if not shared:
        return None
    return (f"{len(shared)} of {len(suite.samples)} eval questions were also calibration questions of "
            f"{Path(candidate).name} ({recipe.spec}, {recipe.samples} samples, seed {recipe.seed}), which flatters the "
            "candidate; evaluate on other questions (another --seed or suite) for a clean estimate.")


# ---------------------------------------------------------------- encoding


@dataclass
class Prompt:
    ids: torch.Tensor                 # [1, T] on CPU
    pixels: torch.Tensor | None       # [tiles, 3, H, W] on CPU


def encode(loaded, sample: Sample, text_tokens: int) -> Prompt:
    """What the model reads: the chat prompt (question suites) or the text itself."""
    from r1v_quant.model.generate import Conversation, encode_conversation

    tok = loaded.tokenizer
    if sample.kind == "text":
        ids = tok(sample.prompt, add_special_tokens=True).input_ids[:text_tokens]
        return Prompt(torch.tensor([ids]), None)
    conv = Conversation()
    conv.add_user(sample.prompt, sample.images)
    ids, pixels, _ = encode_conversation(loaded.config, tok, conv)
    return Prompt(ids, pixels)


def prompt_opens_think(tok, ids: torch.Tensor) -> bool:
    """Whether the rendered generation prompt already opened the reasoning block, so a
    reply without ``</think>`` is unfinished rather than an answer."""
    tail = tok.decode(ids[0, -8:].tolist(), skip_special_tokens=False)
    return tail.rstrip().endswith("<think>")


def _embed_prompt(loaded, prompt: Prompt) -> torch.Tensor:
    pixels = None if prompt.pixels is None else prompt.pixels.to(loaded.device, loaded.dtype)
    return loaded.model.input_embeddings(prompt.ids.to(loaded.device), pixels)


# ---------------------------------------------------------------- generation


@dataclass
class Reply:
    ids: list[int]        # generated tokens, the end-of-sequence token included when reached
    text: str             # decoded, end-of-sequence token left out
    finished: bool        # False when max_new_tokens ran out first


def _sampling(settings: EvalSettings):
    from r1v_quant.model.generate import Sampling

    return Sampling(temperature=settings.temperature, top_p=settings.top_p,
                    repetition_penalty=settings.repetition_penalty, max_new_tokens=settings.max_new_tokens,
                    greedy=settings.greedy)


def _left_pad(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0]:] = r
    return out


def _cut_reply(tok, row: list[int], eos: int) -> Reply:
    finished = eos in row
    ids = row[: row.index(eos) + 1] if finished else row
    body = ids[:-1] if finished else ids
    return Reply(ids, tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False), finished)


@torch.inference_mode()
def generate_batch(loaded, prompts: Sequence[Prompt], embeds: Sequence[torch.Tensor], settings: EvalSettings,
                   seed: int) -> list[Reply]:
    """Replies to several prompts at once (``embeds``: each prompt's [T, D] input embeddings):
    left-padded, one generate call."""
    tok, lm = loaded.tokenizer, loaded.model.language_model
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = _left_pad([p.ids[0].to(loaded.device) for p in prompts], pad)
    mask = _left_pad([torch.ones(p.ids.shape[1], dtype=torch.long, device=loaded.device) for p in prompts], 0)
    if not settings.greedy:
        torch.manual_seed(seed)
    out = lm.generate(input_ids=ids, inputs_embeds=_left_pad(list(embeds), 0.0), attention_mask=mask,
                      max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                      **_sampling(settings).generate_kwargs())
    return [_cut_reply(tok, row, eos) for row in out[:, ids.shape[1]:].tolist()]


def batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), in a fixed order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + size] for i in range(0, len(order), size)]


# ---------------------------------------------------------------- teacher forcing


@dataclass
class RefDist:
    """The reference at the measured positions of one sequence."""

    logp: torch.Tensor      # [P, k] float32, its k largest log-probs, descending
    ids: torch.Tensor       # [P, k] int64, their tokens
    tail: torch.Tensor      # [P] float32, log of the mass outside them (-inf when k covers the vocabulary)
    top1: torch.Tensor      # [P] int64, its most likely token
    nll: torch.Tensor       # [P] float32, -log p(actual next token)


_DIST_FIELDS = ("logp", "ids", "tail", "top1", "nll")


@dataclass
class Closeness:
    """One model against the reference on one sequence, summed over positions."""

    kl: float = 0.0
    top1_same: int = 0
    nll: float = 0.0
    positions: int = 0


_LOGIT_CHUNK = 512  # positions per float32 [chunk, vocab] block: bounds memory on a 152k vocabulary


def _measured(prompt_len: int, reply_ids: Sequence[int] | None, kl_positions: int) -> tuple[torch.Tensor, int, int]:
    """(tokens appended after the prompt, first measured position, number of measured positions)."""
    if reply_ids is None:  # text: every next-token prediction of the text itself
        return torch.empty(0, dtype=torch.long), 0, prompt_len - 1
    reply = torch.tensor(list(reply_ids)[:kl_positions], dtype=torch.long)
    return reply, prompt_len - 1, reply.numel()


@torch.inference_mode()
def position_logprobs(loaded, prompt_embeds: torch.Tensor, prompt_ids: torch.Tensor, reply_ids: Sequence[int] | None,
                      kl_positions: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 log-probs [c, vocab], next tokens [c]) at the measured positions, in chunks.

    ``prompt_embeds`` [T, D] are the prompt's input embeddings, pictures merged in; the
    reply is appended as plain token embeddings, so a stray image token written by an
    untrained model never asks for a picture."""
    lm = loaded.model.language_model
    reply, start, count = _measured(prompt_ids.shape[0], reply_ids, kl_positions)
    if count <= 0:
        return
    embeds = prompt_embeds
    if reply.numel():
        embeds = torch.cat([embeds, lm.get_input_embeddings()(reply.to(loaded.device)).to(embeds.dtype)])
    tokens = torch.cat([prompt_ids.cpu(), reply]).to(loaded.device)
    hidden = lm.model(inputs_embeds=embeds[None], use_cache=False).last_hidden_state[0]
    for lo in range(start, start + count, _LOGIT_CHUNK):
        hi = min(lo + _LOGIT_CHUNK, start + count)
        # stays on the device: only the top-k summary or a few sums ever leave it
        yield torch.log_softmax(lm.lm_head(hidden[lo:hi]).float(), dim=-1), tokens[lo + 1:hi + 1]


def _tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)


def summarize(logp: torch.Tensor, targets: torch.Tensor, k: int) -> RefDist:
    """The reference's summary of some positions, moved to the CPU for the cache."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    dist = RefDist(values, ids, _tail(logp, ids), logp.argmax(dim=-1), -logp.gather(1, targets[:, None]).squeeze(1))
    return RefDist(*(getattr(dist, f).cpu() for f in _DIST_FIELDS))


def concat_dists(parts: Sequence[RefDist], k: int) -> RefDist:
    if not parts:
        empty = torch.empty(0)
        return RefDist(empty.reshape(0, k), empty.reshape(0, k).long(), empty, empty.long(), empty)
    return RefDist(*(torch.cat([getattr(p, f) for p in parts]) for f in _DIST_FIELDS))


# Tail log-masses below this are treated alike on both sides: exp(-80) is far below any
# measurable effect, and clamping both the same way keeps identical models at exactly 0.
_TAIL_FLOOR = -80.0


def coarse_kl(ref: RefDist, cand_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || candidate) over the reference's top-k tokens plus one
    bin for the rest (see the module doc); exactly 0 when the candidate is the reference."""
    lq = cand_logp.gather(1, ref.ids)
    head = (ref.logp.exp() * (ref.logp - lq)).sum(dim=-1)
    rt, ct = ref.tail.clamp_min(_TAIL_FLOOR), _tail(cand_logp, ref.ids).clamp_min(_TAIL_FLOOR)
    tail = torch.where(torch.isneginf(ref.tail), torch.zeros_like(rt), rt.exp() * (rt - ct))
    return (head + tail).clamp_min(0.0)


def closeness(ref: RefDist, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Closeness:
    """Compare a model's log-prob chunks with the reference's summary of the same positions."""
    out, at = Closeness(), 0
    for logp, targets in chunks:
        n = logp.shape[0]
        part = RefDist(*(getattr(ref, f)[at:at + n].to(logp.device) for f in _DIST_FIELDS))
        out.kl += float(coarse_kl(part, logp).double().sum())
        out.top1_same += int((logp.argmax(dim=-1) == part.top1).sum())
        out.nll += float(-logp.gather(1, targets[:, None]).double().sum())
        out.positions += n
        at += n
    if at != ref.top1.shape[0]:
        raise UserError("the reference's cached outputs do not match the sequence being compared; "
                        "clear the eval cache (--no-cache or --cache-dir) and run again.")
    return out


# ---------------------------------------------------------------- the reference cache


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "r1v-quant") / "eval"


def _sha(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def cache_key(identity: dict, suite: Suite, settings: EvalSettings) -> dict:
    from r1v_quant.calib.traces import sample_key

    return {
        "format": CACHE_FORMAT,
        "model": identity,
        "suite": suite.spec,
        "limit": settings.limit,
        "seed": settings.seed,
        # what the model is shown, not the gold answers, which its outputs do not depend on
        "questions": _sha("\n".join(sample_key(s) for s in suite.samples)),
        "generation": settings.generation() if suite.kind == "qa" else {"dtype": settings.dtype},
        "device": "cpu" if settings.device is None and not torch.cuda.is_available() else str(settings.device or "cuda"),
        "top_k": settings.top_k,
        "kl_positions": settings.kl_positions,
        "text_tokens": settings.text_tokens,
    }


@dataclass
class RefItem:
    sample_id: str
    prompt_ids: list[int]
    reply: Reply | None          # None for text suites
    think_opened: bool
    dist: RefDist


class ReferenceCache:
    """One file per question under a folder named by the hash of everything the reference's
    outputs depend on; files are written whole (temporary name, then rename)."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = key

    @classmethod
    def open(cls, root: Path, key: dict) -> ReferenceCache:
        name = Path(key["model"]["path"]).name or "model"
        folder = root / f"{name}-{_sha(json.dumps(key, sort_keys=True))[:24]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        except OSError as error:
            raise UserError(f"could not write the eval cache {folder} ({error.strerror or error}); "
                            f"pass --cache-dir or set {CACHE_ENV} to a writable folder.") from None
        return cls(folder, key)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.safetensors"

    def load(self, index: int, sample_id: str) -> RefItem | None:
        from safetensors import safe_open

        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - a damaged cache file is simply redone
            return None
        if meta.get("id") != sample_id:
            return None
        reply = None
        if meta.get("kind") == "qa":
            reply = Reply(t["reply_ids"].tolist(), meta["text"], meta["finished"] == "1")
        dist = RefDist(t["logp"], t["ids"].long(), t["tail"], t["top1"].long(), t["nll"])
        return RefItem(sample_id, t["prompt_ids"].tolist(), reply, meta.get("think_opened") == "1", dist)

    def save(self, index: int, item: RefItem) -> None:
        from safetensors.torch import save_file

        tensors = {"prompt_ids": torch.tensor(item.prompt_ids, dtype=torch.int64),
                   "logp": item.dist.logp.contiguous(), "ids": item.dist.ids.to(torch.int32).contiguous(),
                   "tail": item.dist.tail.contiguous(), "top1": item.dist.top1.to(torch.int32),
                   "nll": item.dist.nll.contiguous()}
        meta = {"id": item.sample_id, "kind": "text", "think_opened": "1" if item.think_opened else "0"}
        if item.reply is not None:
            tensors["reply_ids"] = torch.tensor(item.reply.ids, dtype=torch.int64)
            meta.update(kind="qa", text=item.reply.text, finished="1" if item.reply.finished else "0")
        path = self.path(index)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except OSError as error:
            Path(tmp).unlink(missing_ok=True)
            raise UserError(f"could not write the eval cache {path} ({error.strerror or error}).") from None


# ---------------------------------------------------------------- models


@dataclass
class ModelSpec:
    """One model to evaluate: its label, role, and how to load it when needed."""

    label: str
    role: str
    load: Callable[[], object]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def loaded_model(spec: ModelSpec):
    loaded = spec.load()
    try:
        yield loaded
    finally:
        del loaded
        free_memory()


def _quant_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    from r1v_quant.model.layout import is_quant_linear

    return [(n, m) for n, m in model.named_modules() if is_quant_linear(n) and isinstance(m, torch.nn.Linear)]


def _swap(model, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def build_rtn(reference: Path, group_size: int, device: str | None, dtype: str):
    """The reference with every quantised linear rounded to nearest (4 bits, same group
    size, no activation-aware scaling): what AWQ is measured against."""
    from r1v_quant.model.r1v import load_model
    from r1v_quant.quant.linear import AWQLinear

    loaded = load_model(reference, device=device, dtype=dtype)
    for name, linear in _quant_linears(loaded.model):
        _swap(loaded.model, name, AWQLinear.from_linear(linear, group_size, name).to(loaded.device))
    return loaded


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--baseline nf4 needs bitsandbytes: pip install 'r1v-quant[nf4]'.") from None
    return bitsandbytes


def build_nf4(reference: Path, device: str | None, dtype: str):
    """The reference with every quantised linear in bitsandbytes NF4 (4 bits, blocks of 64)."""
    from r1v_quant.model.r1v import load_model

    bnb = _bitsandbytes()

    loaded = load_model(reference, device=device, dtype=dtype)
    try:
        for name, linear in _quant_linears(loaded.model):
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=loaded.dtype, quant_type="nf4", device="cpu")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
            _swap(loaded.model, name, layer.to(loaded.device))
    except Exception as error:  # noqa: BLE001 - bitsandbytes fails in many ways on unsupported devices
        raise UserError(f"bitsandbytes could not build the NF4 baseline on {loaded.device} "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:160]}).") from None
    return loaded


def group_size_of(candidate: Path) -> int:
    """The candidate's quantisation group size, for an RTN baseline of equal size."""
    from r1v_quant.model.config import load_config

    q = load_config(candidate).quantization or {}
    return int(q.get("group_size", q.get("q_group_size", DEFAULT_GROUP_SIZE)))


def display_name(spec: str, path: Path) -> str:
    return str(spec) if not Path(str(spec)).expanduser().exists() else (path.resolve().name or str(spec))


def model_specs(reference: Path, ref_name: str, candidate: Path, cand_name: str, baselines: Sequence[str],
                settings: EvalSettings) -> list[ModelSpec]:
    from r1v_quant.model.r1v import load_model

    if cand_name == ref_name:
        cand_name += " (candidate)"
    specs = [ModelSpec(ref_name, "reference", lambda: load_model(reference, settings.device, settings.dtype)),
             ModelSpec(cand_name, "candidate", lambda: load_model(candidate, settings.device, settings.dtype))]
    for base in dict.fromkeys(baselines):
        if base == "rtn":
            group = group_size_of(candidate)
            specs.append(ModelSpec(f"RTN w4 g{group}", "baseline",
                                   lambda g=group: build_rtn(reference, g, settings.device, settings.dtype)))
        elif base == "nf4":
            _bitsandbytes()  # missing: say so now, not after the reference has run
            specs.append(ModelSpec("NF4 (bitsandbytes)", "baseline",
                                   lambda: build_nf4(reference, settings.device, settings.dtype)))
        else:
            raise UserError(f"--baseline {base} is not one of {', '.join(BASELINES)}.")
    return specs


# ---------------------------------------------------------------- running one model


@dataclass
class ItemResult:
    """One model on one question or text."""

    sample_id: str
    reply: Reply | None = None
    think_opened: bool = False
    close: Closeness = field(default_factory=Closeness)


def _stepper(label: str, total: int, progress: ProgressFn | None) -> Callable[[int], None]:
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(label, done, total)

    step(0)
    return step


# What to teacher-force for item i given the model's own reply: the reference's reply ids,
# or None for text suites, where the text itself is the sequence.
ForcedFn = Callable[[int, "Reply | None"], "Sequence[int] | None"]
# Receives item i's prompt, the model's own reply (None for text) and the log-prob chunks.
HandleFn = Callable[[int, Prompt, "Reply | None", Iterator[tuple[torch.Tensor, torch.Tensor]]], None]


def model_pass(loaded, suite: Suite, settings: EvalSettings, indices: Sequence[int], forced: ForcedFn,
               handle: HandleFn, step: Callable[[int], None]) -> None:
    """Generate (question suites) and teacher-force, a batch at a time, so each prompt's
    pictures go through the vision encoder once and only one batch of them is held."""
    indices = list(indices)
    lengths = [encode(loaded, suite.samples[i], settings.text_tokens).ids.shape[1] for i in indices]
    for b, group in enumerate(batches(lengths, settings.batch_size)):
        chosen = [indices[g] for g in group]
        prompts = [encode(loaded, suite.samples[i], settings.text_tokens) for i in chosen]
        with torch.inference_mode():
            embeds = [_embed_prompt(loaded, p)[0] for p in prompts]
        replies: list[Reply | None] = [None] * len(chosen)
        if suite.kind == "qa":
            replies = generate_batch(loaded, prompts, embeds, settings, seed=settings.seed * 1_000_003 + b)
            step(len(chosen))
        for i, prompt, embed, reply in zip(chosen, prompts, embeds, replies):
            handle(i, prompt, reply, position_logprobs(loaded, embed, prompt.ids[0], forced(i, reply),
                                                       settings.kl_positions))
            step(1)


def _work(suite: Suite, n: int) -> int:
    return n * (2 if suite.kind == "qa" else 1)


def run_reference(spec: ModelSpec, suite: Suite, settings: EvalSettings, cache: ReferenceCache,
                  progress: ProgressFn | None) -> tuple[list[RefItem], int]:
    """The reference's items, from the cache where present; returns (items, how many were reused)."""
    items: list[RefItem | None] = [cache.load(i, s.id) for i, s in enumerate(suite.samples)]
    missing = [i for i, item in enumerate(items) if item is None]
    if not missing:
        if progress:
            progress(spec.label, 1, 1)
        return list(items), len(items)
    step = _stepper(spec.label, _work(suite, len(missing)), progress)
    with loaded_model(spec) as loaded:
        def handle(i, prompt, reply, chunks):
            dist = concat_dists([summarize(lp, t, settings.top_k) for lp, t in chunks], settings.top_k)
            items[i] = RefItem(suite.samples[i].id, prompt.ids[0].tolist(), reply,
                               prompt_opens_think(loaded.tokenizer, prompt.ids), dist)
            cache.save(i, items[i])

        model_pass(loaded, suite, settings, missing, lambda i, reply: reply.ids if reply else None, handle, step)
    return list(items), len(items) - len(missing)


def run_model(spec: ModelSpec, suite: Suite, settings: EvalSettings, ref_items: Sequence[RefItem],
              progress: ProgressFn | None) -> list[ItemResult]:
    """One non-reference model: its own replies, then teacher forcing on the reference's."""
    results: list[ItemResult | None] = [None] * len(ref_items)
    step = _stepper(spec.label, _work(suite, len(ref_items)), progress)
    with loaded_model(spec) as loaded:
        def handle(i, prompt, reply, chunks):
            ref = ref_items[i]
            if prompt.ids[0].tolist() != ref.prompt_ids:
                raise UserError(f"{spec.label} encodes question {ref.sample_id} differently from the reference "
                                "(another tokenizer or image settings), so the two cannot be compared.")
            results[i] = ItemResult(ref.sample_id, reply, prompt_opens_think(loaded.tokenizer, prompt.ids),
                                    closeness(ref.dist, chunks))

        model_pass(loaded, suite, settings, range(len(ref_items)),
                   lambda i, reply: ref_items[i].reply.ids if ref_items[i].reply else None, handle, step)
    return list(results)


def reference_results(items: Sequence[RefItem]) -> list[ItemResult]:
    """The reference as an ItemResult list: its KL to itself is 0 by definition."""
    out = []
    for item in items:
        p = int(item.dist.top1.shape[0])
        close = Closeness(0.0, p, float(item.dist.nll.double().sum()), p)
        out.append(ItemResult(item.sample_id, item.reply, item.think_opened, close))
    return out


# ---------------------------------------------------------------- summarising


@dataclass
class Scored:
    correct: list[bool]
    answers: list[str | None]
    reasoning: list[int]
    runaway: list[bool]


def score(suite: Suite, items: Sequence[ItemResult], think_close_id: int | None) -> Scored:
    out = Scored([], [], [], [])
    for sample, item in zip(suite.samples, items):
        text, opened = item.reply.text, item.think_opened
        answer = extract_answer(text, sample.kind, sample.options, think_opened=opened)
        out.correct.append(is_correct(sample, text, think_opened=opened))
        out.answers.append(answer)
        if think_close_id is not None:
            out.reasoning.append(reasoning_length(item.reply.ids, end=think_close_id))
        out.runaway.append(not item.reply.finished and answer is None)
    return out


def _pooled(items: Sequence[ItemResult]) -> Closeness:
    total = Closeness()
    for item in items:
        total.kl += item.close.kl
        total.top1_same += item.close.top1_same
        total.nll += item.close.nll
        total.positions += item.close.positions
    return total


def _perplexity(total: Closeness) -> float | None:
    return math.exp(total.nll / total.positions) if total.positions else None


def qa_results(suite: Suite, runs: dict[str, tuple[str, list[ItemResult]]], think_close_id: int | None,
               conf: float = 0.95) -> tuple[list[report.ModelResult], list[report.Comparison]]:
    subjects = [s.subject or "all" for s in suite.samples]
    scored = {label: score(suite, items, think_close_id) for label, (_, items) in runs.items()}
    ref_label = next(label for label, (role, _) in runs.items() if role == "reference")
    models, comparisons = [], []
    for label, (role, items) in runs.items():
        s = scored[label]
        models.append(report.model_result(label, role, s.correct, subjects, reasoning_lengths=s.reasoning or None,
                                          unfinished=s.runaway, conf=conf))
        if role != "reference":
            pooled = _pooled(items)
            comparisons.append(report.comparison(
                label, scored[ref_label].correct, s.correct, ref_answers=scored[ref_label].answers,
                cand_answers=s.answers, mean_kl=pooled.kl / pooled.positions if pooled.positions else None,
                top1_agreement=pooled.top1_same / pooled.positions if pooled.positions else None, conf=conf))
    return models, comparisons


def text_results(suite: Suite, runs: dict[str, tuple[str, list[ItemResult]]]
                 ) -> tuple[list[report.ModelResult], list[report.Comparison]]:
    """Text suites have no answers: accuracy fields stay empty, perplexity and KL carry it."""
    models, comparisons = [], []
    for label, (role, items) in runs.items():
        pooled = _pooled(items)
        models.append(report.ModelResult(label, role, len(items), None, None, None, perplexity=_perplexity(pooled)))
        if role != "reference" and pooled.positions:
            comparisons.append(report.Comparison(label, None, None, None, None, None, pooled.kl / pooled.positions,
                                                 100.0 * pooled.top1_same / pooled.positions))
    return models, comparisons


@dataclass
class EvalRun:
    results: report.EvalResults
    suite: Suite
    warnings: list[str]
    cache_dir: Path | None
    reference_reused: int           # reference items read from the cache
    reference_generated: int        # reference items computed in this run
    items: dict[str, list[ItemResult]]


def _run_models(specs: Sequence[ModelSpec], suite: Suite, settings: EvalSettings, key: dict,
                progress: ProgressFn | None) -> tuple[dict[str, tuple[str, list[ItemResult]]], int, Path]:
    """Every model in turn, the reference first: (label -> (role, items), reference items
    reused from the cache, the cache folder)."""
    with _cache_root(settings) as root:
        cache = ReferenceCache.open(root, key)
        ref_items, reused = run_reference(specs[0], suite, settings, cache, progress)
        runs = {specs[0].label: ("reference", reference_results(ref_items))}
        for spec in specs[1:]:
            runs[spec.label] = (spec.role, run_model(spec, suite, settings, ref_items, progress))
    return runs, reused, cache.folder


def evaluate(reference: str, candidate: str, settings: EvalSettings, baselines: Sequence[str] = (),
             progress: ProgressFn | None = None, on_warning: Callable[[str], None] | None = None) -> EvalRun:
    """Reference, candidate and baselines on the same suite, one model at a time.
    ``on_warning`` hears each warning before the long work starts."""
    from r1v_quant.calib.traces import model_identity
    from r1v_quant.model.checkpoint import resolve_model

    check_settings(settings)
    for base in baselines:
        if base not in BASELINES:
            raise UserError(f"--baseline {base} is not one of {', '.join(BASELINES)}.")
    ref_path, cand_path = resolve_model(reference), resolve_model(candidate)
    suite = load_suite(settings)
    warnings = [w for w in [calibration_overlap(cand_path, suite, settings.data_path)] if w]
    for warning in warnings if on_warning else ():
        on_warning(warning)
    specs = model_specs(ref_path, display_name(reference, ref_path), cand_path, display_name(candidate, cand_path),
                        baselines, settings)
    runs, reused, folder = _run_models(specs, suite, settings, cache_key(model_identity(ref_path), suite, settings),
                                       progress)
    if suite.kind == "qa":
        models, comparisons = qa_results(suite, runs, _think_close_id(ref_path))
    else:
        models, comparisons = text_results(suite, runs)
    cache_dir = folder if settings.use_cache else None
    results = report.EvalResults(
        suite=suite.name, reference=specs[0].label, candidate=specs[1].label, models=models, comparisons=comparisons,
        baselines=[s.label for s in specs[2:]],
        settings={**settings.describe(), "warnings": warnings, "reference_cache": cache_dir and str(cache_dir)})
    return EvalRun(results, suite, warnings, cache_dir, reused, len(suite.samples) - reused,
                   {label: items for label, (_, items) in runs.items()})


@contextmanager
def _cache_root(settings: EvalSettings):
    """The cache folder; with caching off, a temporary one removed afterwards."""
    if settings.use_cache:
        yield Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
        return
    with tempfile.TemporaryDirectory(prefix="r1v-quant-eval-") as tmp:
        yield Path(tmp)


def _think_close_id(model_dir: Path) -> int | None:
    from r1v_quant.model.r1v import load_tokenizer

    tok = load_tokenizer(model_dir)
    found = tok.convert_tokens_to_ids(THINK_CLOSE)
    return None if found in (None, tok.unk_token_id) else int(found)


# ---------------------------------------------------------------- gates and text tables


def accuracy_drop(results: report.EvalResults) -> float | None:
    """Reference minus candidate accuracy, in points (positive: the candidate lost)."""
    comparison = results.comparison(results.candidate)
    # 0.0 - diff rather than -diff: no "-0.0" when nothing changed
    return None if comparison is None or comparison.diff is None else 0.0 - comparison.diff


def text_table(results: report.EvalResults) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for a text suite, whose results have no accuracy."""
    rows = []
    for m in results.ordered_models():
        c = results.comparison(m.name)
        rows.append([m.name, m.role, str(m.n), "n/a" if m.perplexity is None else f"{m.perplexity:.3f}",
                     "-" if c is None or c.mean_kl is None else f"{c.mean_kl:.4g}",
                     "-" if c is None or c.top1_agreement is None else f"{c.top1_agreement:.1f}%"])
    return ["model", "role", "texts", "perplexity", "KL (nats)", "top-1 agree"], rows
