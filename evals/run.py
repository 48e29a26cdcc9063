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
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from r1v_quant.errors import UserError
from r1v_quant.evals import pass_at_k, published, report, vllm_pass
from r1v_quant.evals.forcing import (
    Closeness,
    ItemResult,
    Prompt,
    Reply,
    batches,
    closeness,
    coarse_kl,
    concat_dists,
    embed_prompt,
    encode,
    generate_batch,
    position_logprobs,
    prompt_opens_think,
    summarize,
)
from r1v_quant.evals.math_scoring import MATH, grade, grade_with_fallback
from r1v_quant.evals.ref_cache import ReferenceCache, RefItem, cache_key, default_cache_dir
from r1v_quant.evals.scoring import reasoning_length
from r1v_quant.evals.settings import BASELINES, EvalSettings, ProgressFn, check_settings
from r1v_quant.evals.suites import Suite, calibration_overlap, load_suite, suite_loader
from r1v_quant.model.prompt import THINK_END

__all__ = ["EvalSettings", "ReferenceCache", "cache_key", "coarse_kl", "evaluate", "load_suite", "suite_loader",
           "summarize"]


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


def group_size_of(candidate: Path) -> int:
    """The candidate's quantisation group size, for an RTN baseline of equal size."""
    from r1v_quant.int4.format import read_quantization_config
    from r1v_quant.model.config import load_config

    cfg = load_config(candidate)
    return read_quantization_config(cfg.quantization or {}, str(candidate)).group_size


def display_name(spec: str, path: Path) -> str:
    return str(spec) if not Path(str(spec)).expanduser().exists() else (path.resolve().name or str(spec))


def model_specs(reference: Path, ref_name: str, candidate: Path, cand_name: str, baselines: Sequence[str],
                settings: EvalSettings) -> list[ModelSpec]:
    from r1v_quant.model.r1v import load_model
    from r1v_quant.quant.baselines import bitsandbytes, build_nf4, build_rtn

    if cand_name == ref_name:
        cand_name += " (candidate)"
    if settings.engine == "vllm":
        return vllm_specs(reference, ref_name, candidate, cand_name, baselines, settings)
    specs = [ModelSpec(ref_name, "reference", lambda: load_model(reference, settings.device, settings.dtype)),
             ModelSpec(cand_name, "candidate", lambda: load_model(candidate, settings.device, settings.dtype))]
    for base in dict.fromkeys(baselines):
        if base == "rtn":
            group = group_size_of(candidate)
            specs.append(ModelSpec(f"RTN w4 g{group}", "baseline",
                                   lambda g=group: build_rtn(reference, g, settings.device, settings.dtype)))
        elif base == "nf4":
            bitsandbytes()  # missing: say so now, not after the reference has run
            specs.append(ModelSpec("NF4 (bitsandbytes)", "baseline",
                                   lambda: build_nf4(reference, settings.device, settings.dtype)))
        else:
            raise UserError(f"--baseline {base} is not one of {', '.join(BASELINES)}.")
    return specs


def vllm_specs(reference: Path, ref_name: str, candidate: Path, cand_name: str, baselines: Sequence[str],
               settings: EvalSettings) -> list[ModelSpec]:
    """The same models for `--engine vllm`: each `load` gives the folder vLLM loads (and its cleanup)."""
    from r1v_quant.evals.vllm_pass import check_engine, rtn_export_folder

    check_engine(baselines)
    specs = [ModelSpec(ref_name, "reference", lambda: (reference, None)),
             ModelSpec(cand_name, "candidate", lambda: (candidate, None))]
    if "rtn" in baselines:  # the one baseline check_engine lets through
        group = group_size_of(candidate)
        specs.append(ModelSpec(f"RTN w4 g{group}", "baseline",
                               lambda g=group: rtn_export_folder(reference, g, settings)))
    return specs


# ---------------------------------------------------------------- running one model


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
            embeds = [embed_prompt(loaded, p)[0] for p in prompts]
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
                  progress: ProgressFn | None, warn: Callable[[str], None] | None = None) -> tuple[list[RefItem], int]:
    """The reference's items, from the cache where present; returns (items, how many were reused).
    `warn` hears of cached items whose digest did not hold, before they are computed again."""
    items: list[RefItem | None] = [cache.load(i, s.id) for i, s in enumerate(suite.samples)]
    missing = [i for i, item in enumerate(items) if item is None]
    if cache.damaged and warn is not None:
        shown = ", ".join(cache.damaged[:3]) + (f" and {len(cache.damaged) - 3} more" if len(cache.damaged) > 3 else "")
        warn(f"{len(cache.damaged)} cached reference output(s) in {cache.folder} failed their checksum ({shown}); "
             "they are computed again.")
    if not missing:
        if progress:
            progress(spec.label, 1, 1)
        return list(items), len(items)
    step = _stepper(spec.label, _work(suite, len(missing)), progress)
    if settings.engine == "vllm":
        with vllm_pass.vllm_model(spec, suite, settings, settings.top_k) as model:
            vllm_pass.reference_pass(model, missing, cache, items, step)
        return list(items), len(items) - len(missing)
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
    if settings.engine == "vllm":
        with vllm_pass.vllm_model(spec, suite, settings, settings.top_k * vllm_pass.CANDIDATE_TOP_K_FACTOR) as model:
            return vllm_pass.candidate_pass(model, ref_items, step)
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
    fallback: list[bool]     # math suites: a reply without a box read by its last expression; else empty


def score(suite: Suite, items: Sequence[ItemResult], think_close_id: int | None) -> Scored:
    out = Scored([], [], [], [], [])
    math = any(s.kind == MATH for s in suite.samples)
    for sample, item in zip(suite.samples, items):
        answer, correct = grade(sample, item.reply.text, think_opened=item.think_opened)
        if math:
            out.fallback.append(grade_with_fallback(sample, item.reply.text, think_opened=item.think_opened)[1])
        out.correct.append(correct)
        out.answers.append(answer)
        if think_close_id is not None:
            out.reasoning.append(reasoning_length(item.reply.ids, end=think_close_id))
        out.runaway.append(not item.reply.finished and answer is None)
    return out


def per_question(suite: Suite, runs: dict[str, tuple[str, list[ItemResult]]], think_close_id: int | None
                 ) -> list[dict]:
    """Each question's gold answer and every model's extracted answer and correctness, so a
    report shows which questions the quantisation changed."""
    k = suite.samples_per_question
    rows = [{"id": s.id, "subject": s.subject, "gold": s.answer, "copy": i % k, "baselines": {}}
            for i, s in enumerate(suite.samples)]
    for label, (role, items) in runs.items():
        scored = score(suite, items, think_close_id)
        for row, answer, correct in zip(rows, scored.answers, scored.correct):
            entry = {"answer": answer, "correct": bool(correct)}
            if role == "baseline":
                row["baselines"][label] = entry
            else:
                row[role] = entry
    return rows


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
                                          unfinished=s.runaway, fallback_correct=s.fallback or None, conf=conf))
        if role != "reference":
            pooled = _pooled(items)
            comparisons.append(report.comparison(
                label, scored[ref_label].correct, s.correct, ref_answers=scored[ref_label].answers,
                cand_answers=s.answers, mean_kl=pooled.kl / pooled.positions if pooled.positions else None,
                top1_agreement=pooled.top1_same / pooled.positions if pooled.positions else None, conf=conf))
    if suite.samples_per_question > 1:
        _pass_at_1_intervals(suite, models, comparisons, scored, ref_label, conf)
    return models, comparisons


def _pass_at_1_intervals(suite: Suite, models: list[report.ModelResult], comparisons: list[report.Comparison],
                         scored: dict[str, Scored], ref_label: str, conf: float) -> None:
    """k replies per question: intervals from a cluster bootstrap over questions."""
    clusters = [i // suite.samples_per_question for i in range(len(suite.samples))]
    for m in models:
        m.accuracy, m.accuracy_lo, m.accuracy_hi = pass_at_k.pass_at_1(scored[m.name].correct, clusters, conf=conf)
        if scored[m.name].fallback:
            m.fallback_accuracy, m.fallback_lo, m.fallback_hi = pass_at_k.pass_at_1(scored[m.name].fallback, clusters,
                                                                                    conf=conf)
    for c in comparisons:
        c.diff, c.diff_lo, c.diff_hi = pass_at_k.paired_pass_at_1(scored[ref_label].correct, scored[c.model].correct,
                                                                  clusters, conf=conf)


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
                progress: ProgressFn | None, warn: Callable[[str], None] | None = None
                ) -> tuple[dict[str, tuple[str, list[ItemResult]]], int, Path]:
    """Every model in turn, the reference first: (label -> (role, items), reference items
    reused from the cache, the cache folder)."""
    with _cache_root(settings) as root:
        cache = ReferenceCache.open(root, key)
        ref_items, reused = run_reference(specs[0], suite, settings, cache, progress, warn)
        runs = {specs[0].label: ("reference", reference_results(ref_items))}
        for spec in specs[1:]:
            runs[spec.label] = (spec.role, run_model(spec, suite, settings, ref_items, progress))
    return runs, reused, cache.folder


def evaluate(reference: str, candidate: str, settings: EvalSettings, baselines: Sequence[str] = (),
             progress: ProgressFn | None = None, on_warning: Callable[[str], None] | None = None) -> EvalRun:
    """Reference, candidate and baselines on the same suite, one model at a time.
    ``on_warning`` hears each warning before the long work starts (a damaged cache entry: when it is found)."""
    from r1v_quant.evals.compat import check_candidate
    from r1v_quant.model.checkpoint import resolve_model
    from r1v_quant.model.identity import model_identity

    check_settings(settings)
    for base in baselines:
        if base not in BASELINES:
            raise UserError(f"--baseline {base} is not one of {', '.join(BASELINES)}.")
    if settings.engine == "vllm":
        vllm_pass.check_engine(baselines)  # vLLM missing: say so before any download or model
    ref_path, cand_path = resolve_model(reference), resolve_model(candidate)
    warnings = check_candidate(ref_path, cand_path, reference)  # before any generation
    suite = load_suite(settings)
    warnings += [w for w in [calibration_overlap(cand_path, suite, settings.data_path)] if w]
    for warning in warnings if on_warning else ():
        on_warning(warning)
    specs = model_specs(ref_path, display_name(reference, ref_path), cand_path, display_name(candidate, cand_path),
                        baselines, settings)
    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning:
            on_warning(message)

    runs, reused, folder = _run_models(specs, suite, settings, cache_key(model_identity(ref_path), suite, settings),
                                       progress, warn)
    questions: list[dict] = []
    if suite.kind == "qa":
        think_close_id = _think_close_id(ref_path)
        models, comparisons = qa_results(suite, runs, think_close_id)
        questions = per_question(suite, runs, think_close_id)
    else:
        models, comparisons = text_results(suite, runs)
    cache_dir = folder if settings.use_cache else None
    results = report.EvalResults(
        suite=suite.name, reference=specs[0].label, candidate=specs[1].label, models=models, comparisons=comparisons,
        baselines=[s.label for s in specs[2:]],
        settings={**settings.describe(), "warnings": warnings, "reference_cache": cache_dir and str(cache_dir),
                  "published": _published(reference, ref_path, suite.name), "suite_note": suite_note(suite.name)},
        questions=questions)
    return EvalRun(results, suite, warnings, cache_dir, reused, len(suite.samples) - reused,
                   {label: items for label, (_, items) in runs.items()})


def suite_note(suite_name: str) -> dict | None:
    """How a vendor suite was posed and read here, and how the vendor scored its figure."""
    from r1v_quant.evals.vendor_suites import SUITE_NOTES

    note = SUITE_NOTES.get(suite_name)
    return None if note is None else {"prompt": note[0], "extraction": note[1],
                                      "vendor": published.VENDOR_SCORING.get(suite_name)}


def _published(reference: str, ref_path: Path, suite_name: str) -> dict | None:
    found = published.lookup(published.identify(reference, ref_path), suite_name)
    return None if found is None else found.to_dict()


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
    found = tok.convert_tokens_to_ids(THINK_END)
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
