"""The question sets an eval runs on, and whether they overlap the candidate's calibration set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals import pass_at_k
from r1v_quant.evals.settings import DEFAULT_LIMITS, SUITE_FORMS, EvalSettings


@dataclass
class Suite:
    spec: str
    name: str
    kind: str                  # "qa": questions with gold answers; "text": perplexity on text
    samples: list[Sample]
    samples_per_question: int = 1   # k > 1: each question's k copies stand next to each other


def suite_loader(spec: str, data_path: Path | None) -> tuple[str, str, Callable[[int | None, int], list[Sample]]]:
    """(display name, kind, loader(limit, seed)) of a suite spec; bad specs fail here."""
    from r1v_quant.calib.builtin import builtin_samples
    from r1v_quant.calib.mmmu import load_mmmu
    from r1v_quant.calib.text import load_text
    from r1v_quant.evals.vendor_suites import VENDOR_SUITES, load_vendor_suite

    if spec == "builtin":
        return "builtin", "qa", lambda n, seed: builtin_samples(n or DEFAULT_LIMITS["builtin"], seed=seed, split="eval")
    if spec == "r1v-mini":
        from r1v_quant.calib.skills import suite_samples

        return "r1v-mini", "qa", lambda n, seed: suite_samples(n or DEFAULT_LIMITS["r1v-mini"], seed=seed)
    if spec == "r1v-outliers":
        from r1v_quant.calib.chains import outlier_suite

        return "r1v-outliers", "qa", lambda n, seed: outlier_suite(n or DEFAULT_LIMITS["r1v-outliers"], seed=seed)
    if spec == "mmmu-sample":
        return "mmmu-val", "qa", lambda n, seed: load_mmmu(data_path, n=n or 10**9, seed=seed)
    if spec in VENDOR_SUITES:
        return VENDOR_SUITES[spec].label, "qa", lambda n, seed: load_vendor_suite(spec, data_path, n, seed)
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
    samples = pass_at_k.replicate(samples, settings.samples_per_question)
    if kind == "qa":
        unanswered = [s.id for s in samples if s.answer is None or not str(s.answer).strip()]
        if unanswered:
            raise UserError(f"suite {settings.suite!r}: question {unanswered[0]} has no gold answer (a split whose answers "
                            "are hidden, such as MMMU's test split, cannot be scored), so evaluate on the validation split.")
    return Suite(settings.suite, name, kind, samples, settings.samples_per_question)


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
