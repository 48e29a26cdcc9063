"""The results of an accuracy comparison and the ways we show them.

Schema (``EvalResults``, written by ``to_json`` as a plain JSON object)::

    schema_version   int, 1
    suite            name of the question set, e.g. "mmmu-val"
    reference        name of the full-precision model every other model is compared with
    candidate        name of the quantised model under test
    baselines        names of other models shown for context (e.g. the vendor's AWQ)
    conf             confidence level of every interval, e.g. 0.95
    settings         free-form run settings (generation parameters, seeds, limits); for the
                     vendor's suites "suite_note": {prompt, extraction, vendor} says how the
                     questions were posed, how answers were read and how the vendor scored its figure
    models           one ModelResult per model (reference, candidate, baselines):
        name, role ("reference" | "candidate" | "baseline"), n (questions scored),
        accuracy, accuracy_lo, accuracy_hi        percent, Wilson interval
        per_subject      {subject: accuracy percent}
        perplexity       on the suite's reference text, or null
        reasoning_tokens_mean, reasoning_tokens_median   tokens before </think>, or null
        runaway_share    percent of replies that never closed </think>, or null
        fallback_accuracy, fallback_lo, fallback_hi   math suites: the accuracy when a reply
                         without \\boxed{} is read by its last LaTeX or number expression
                         (lighteval, open-r1), beside the strict accuracy; else null
    comparisons      one Comparison per non-reference model, against the reference:
        model, diff, diff_lo, diff_hi             points (model minus reference), paired bootstrap
        mcnemar_p        exact two-sided McNemar p-value
        answer_agreement percent of questions with the same extracted answer, or null
        mean_kl          mean per-token KL(reference || model) in nats, or null
        top1_agreement   percent of positions with the same most likely token, or null
    questions        one entry per question scored (empty for text suites), in suite order:
        id, subject, gold (the right answer), copy (0..k-1 with --samples-per-question k),
        reference, candidate: {answer (extracted, or null), correct}; baselines: {name: {answer, correct}}

Percent everywhere for shares, so every number in a report reads on the same scale.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from rich import box
from rich.console import Console
from rich.table import Table

from r1v_quant.errors import UserError
from r1v_quant.evals.stats import accuracy_interval, answer_agreement, mcnemar_p, paired_difference
from r1v_quant.output import write_atomic, write_text_atomic

SCHEMA_VERSION = 1
ROLES = ("reference", "candidate", "baseline")


@dataclass
class ModelResult:
    name: str
    role: str
    n: int
    accuracy: float
    accuracy_lo: float
    accuracy_hi: float
    per_subject: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    reasoning_tokens_mean: float | None = None
    reasoning_tokens_median: float | None = None
    runaway_share: float | None = None
    fallback_accuracy: float | None = None
    fallback_lo: float | None = None
    fallback_hi: float | None = None


@dataclass
class Comparison:
    model: str
    diff: float
    diff_lo: float
    diff_hi: float
    mcnemar_p: float
    answer_agreement: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None


@dataclass
class EvalResults:
    suite: str
    reference: str
    candidate: str
    models: list[ModelResult]
    comparisons: list[Comparison] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    conf: float = 0.95
    settings: dict[str, Any] = field(default_factory=dict)
    questions: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def model(self, name: str) -> ModelResult:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def comparison(self, name: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.model == name), None)

    def ordered_models(self) -> list[ModelResult]:
        """Reference first, then the candidate, then baselines: the reading order."""
        return sorted(self.models, key=lambda m: ROLES.index(m.role) if m.role in ROLES else len(ROLES))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- building results


def model_result(
    name: str,
    role: str,
    correct: Sequence[bool],
    subjects: Sequence[str] | None = None,
    *,
    reasoning_lengths: Sequence[int] | None = None,
    unfinished: Sequence[bool] | None = None,
    perplexity: float | None = None,
    fallback_correct: Sequence[bool] | None = None,
    conf: float = 0.95,
) -> ModelResult:
    """Summarise one model's per-question outcomes (``subjects`` parallel to ``correct``);
    ``fallback_correct``: the same replies scored with the no-box fallback (math suites)."""
    acc = accuracy_interval(correct, conf)
    fallback = accuracy_interval(fallback_correct, conf) if fallback_correct else None
    per_subject: dict[str, float] = {}
    if subjects is not None:
        if len(subjects) != len(correct):
            raise UserError(f"{len(subjects)} subjects were given for {len(correct)} answers of {name}.")
        groups: dict[str, list[bool]] = {}
        for subject, ok in zip(subjects, correct):
            groups.setdefault(subject, []).append(bool(ok))
        per_subject = {s: 100.0 * sum(v) / len(v) for s, v in sorted(groups.items())}
    lengths = list(reasoning_lengths or [])
    return ModelResult(
        name=name,
        role=role,
        n=len(correct),
        accuracy=acc.value,
        accuracy_lo=acc.lo,
        accuracy_hi=acc.hi,
        per_subject=per_subject,
        perplexity=perplexity,
        reasoning_tokens_mean=float(statistics.fmean(lengths)) if lengths else None,
        reasoning_tokens_median=float(statistics.median(lengths)) if lengths else None,
        runaway_share=100.0 * sum(map(bool, unfinished)) / len(unfinished) if unfinished else None,
        fallback_accuracy=None if fallback is None else fallback.value,
        fallback_lo=None if fallback is None else fallback.lo,
        fallback_hi=None if fallback is None else fallback.hi,
    )


def comparison(
    name: str,
    ref_correct: Sequence[bool],
    cand_correct: Sequence[bool],
    *,
    ref_answers: Sequence[str | None] | None = None,
    cand_answers: Sequence[str | None] | None = None,
    mean_kl: float | None = None,
    top1_agreement: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    conf: float = 0.95,
) -> Comparison:
    """Compare one model with the reference on the same questions.  ``top1_agreement``
    is taken as a fraction (what ``metrics.top1_agreement`` returns) and stored in percent."""
    diff = paired_difference(ref_correct, cand_correct, n_boot=n_boot, seed=seed, conf=conf)
    agreement = None
    if ref_answers is not None and cand_answers is not None:
        agreement = answer_agreement(ref_answers, cand_answers)
    return Comparison(
        model=name,
        diff=diff.value,
        diff_lo=diff.lo,
        diff_hi=diff.hi,
        mcnemar_p=mcnemar_p(ref_correct, cand_correct),
        answer_agreement=agreement,
        mean_kl=mean_kl,
        top1_agreement=None if top1_agreement is None else 100.0 * top1_agreement,
    )


# ---------------------------------------------------------------- formatting


def _na(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _fmt_acc(m: ModelResult) -> str:
    return f"{m.accuracy:.1f} [{m.accuracy_lo:.1f}, {m.accuracy_hi:.1f}]"


def _fmt_diff(c: Comparison | None) -> str:
    if c is None:
        return "-"
    return f"{c.diff:+.1f} [{c.diff_lo:+.1f}, {c.diff_hi:+.1f}]"


def _fmt_p(c: Comparison | None) -> str:
    if c is None:
        return "-"
    # Fixed decimals line up in a column; tiny p-values would print as 0.000.
    return f"{c.mcnemar_p:.3f}" if c.mcnemar_p >= 0.001 else f"{c.mcnemar_p:.1e}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _rows(results: EvalResults) -> list[list[str]]:
    rows = []
    for m in results.ordered_models():
        c = results.comparison(m.name)
        is_ref = m.role == "reference"
        rows.append([
            m.name,
            m.role,
            str(m.n),
            _fmt_acc(m),
            "-" if is_ref else _fmt_diff(c),
            "-" if is_ref else _fmt_p(c),
            "-" if is_ref else _pct(c.answer_agreement if c else None),
            "-" if is_ref else _na(c.mean_kl if c else None, ".4g"),
            "-" if is_ref else _pct(c.top1_agreement if c else None),
            _na(m.perplexity, ".3f"),
            _na(m.reasoning_tokens_mean, ".0f"),
            _pct(m.runaway_share),
        ])
    return rows


def _headers(results: EvalResults) -> list[str]:
    ci = f"{results.conf * 100:g}% CI"
    return [
        "model", "role", "n", f"accuracy [{ci}]", f"diff vs ref, points [{ci}]", "McNemar p",
        "same answer", "KL (nats)", "top-1 agree", "perplexity", "reasoning tokens", "runaway",
    ]


# The default table's columns, picked from the full rows: model, n, accuracy, diff, same
# answer, KL.  They fit an 80-column terminal; --wide shows every column.
_NARROW = (0, 2, 3, 4, 7, 6)
_NARROW_CAPTION = ("Δ: points vs reference (paired bootstrap); KL: nats per token; "
                   "agree: same answer; --wide for all columns")


def _narrow_headers(results: EvalResults) -> list[str]:
    return ["model", "n", f"acc % [{results.conf * 100:g}% CI]", "Δ [CI]", "KL", "agree"]


def render_table(results: EvalResults, wide: bool = False) -> Table:
    """The summary as a rich Table (one row per model): the columns that fit 80
    characters by default, all of them with ``wide``."""
    title = f"{results.suite}: {results.candidate} vs {results.reference}"
    if wide:
        table = Table(title=title)
        headers, rows = _headers(results), _rows(results)
    else:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
        headers = _narrow_headers(results)
        rows = [[row[i] for i in _NARROW] for row in _rows(results)]
    for i, header in enumerate(headers):
        # headers never wrap or shrink to an ellipsis; long model names wrap instead
        table.add_column(header, justify="left" if i < (2 if wide else 1) else "right",
                         no_wrap=i > 0, min_width=len(header))
    for row in rows:
        table.add_row(*row)
    return table


def published_lines(results: EvalResults) -> list[str]:
    """The vendor's own figures for this reference and suite, when known, and how they were scored."""
    found = results.settings.get("published") if isinstance(results.settings, dict) else None
    if not found:
        return []
    if found.get("bf16") is None and found.get("vendor_awq") is None:
        return [f"{found['model']}: the vendor published no {found['suite']} score."]
    line = (f"{found['model']} on {found['suite']}, {found['source']}: bf16 {_na(found.get('bf16'), '.1f')}, "
            f"vendor AWQ {_na(found.get('vendor_awq'), '.1f')}.")
    note = (results.settings.get("suite_note") or {}).get("vendor")
    return [line + (f" Vendor's scoring: {note}" if note else "")]


def fallback_lines(results: EvalResults) -> list[str]:
    """Math suites: every model's accuracy once more, a reply without a box read by its last expression."""
    models = [m for m in results.ordered_models() if m.fallback_accuracy is not None]
    if not models:
        return []
    scores = "; ".join(f"{m.name} {m.fallback_accuracy:.1f} [{m.fallback_lo:.1f}, {m.fallback_hi:.1f}]" for m in models)
    return ["Accuracy above is strict (the last \\boxed{} after the reasoning). With the fallback of lighteval and "
            f"open-r1 (no box: the last LaTeX or number expression): {scores}."]


def suite_note_lines(results: EvalResults) -> list[str]:
    """How the suite was posed and its answers read."""
    note = results.settings.get("suite_note") if isinstance(results.settings, dict) else None
    if not note:
        return []
    return [f"Prompt: {note['prompt']} Answers: {note['extraction']}"]


def print_report(results: EvalResults, console: Console | None = None, wide: bool = False) -> None:
    """Print the summary table, the vendor's published figures when the reference is one
    of its models, and the per-subject table when there are subjects."""
    console = console or Console()
    console.print(render_table(results, wide=wide))
    if not wide:
        console.print(f"[dim]{_NARROW_CAPTION}[/]", highlight=False)
    for line in fallback_lines(results) + suite_note_lines(results) + published_lines(results):
        console.print(line, highlight=False)
    subjects = _subjects(results)
    if subjects:
        table = Table(title="accuracy per subject (%)")
        table.add_column("subject")
        for m in results.ordered_models():
            table.add_column(m.name, justify="right")
        for subject in subjects:
            table.add_row(subject, *[_na(m.per_subject.get(subject), ".1f") for m in results.ordered_models()])
        console.print(table)


def _subjects(results: EvalResults) -> list[str]:
    return sorted({s for m in results.models for s in m.per_subject})


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def to_markdown(results: EvalResults) -> str:
    """The summary and per-subject tables as Markdown (for model cards and READMEs)."""
    lines = [f"## {results.suite}: {results.candidate} vs {results.reference}", ""]
    lines += _md_table(_headers(results), _rows(results))
    notes = fallback_lines(results) + suite_note_lines(results) + published_lines(results)
    if notes:
        lines += [""] + notes
    subjects = _subjects(results)
    if subjects:
        models = results.ordered_models()
        lines += ["", "### Accuracy per subject (%)", ""]
        rows = [[s] + [_na(m.per_subject.get(s), ".1f") for m in models] for s in subjects]
        lines += _md_table(["subject"] + [m.name for m in models], rows)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- files


def json_text(results: EvalResults) -> str:
    """The results as JSON (the schema in this module's doc)."""
    return json.dumps(results.to_dict(), indent=2, allow_nan=False) + "\n"


def to_json(results: EvalResults, path: str | os.PathLike) -> Path:
    """Write the results as JSON (the schema in this module's doc)."""
    return write_text_atomic(Path(path), json_text(results))


# ---------------------------------------------------------------- per-subject chart

# Okabe-Ito colours: distinct for the common kinds of colour blindness.
_PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
_BAR_H, _BAR_GAP, _GROUP_GAP = 16, 2, 12
_PLOT_W, _MARGIN = 640, 20


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in ("DejaVuSans.ttf", "Arial.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def plot_per_subject(results: EvalResults, png_path: str | os.PathLike) -> Path:
    """Grouped horizontal bar chart of accuracy per subject (overall first), one colour
    per model, drawn with Pillow and written as PNG."""
    path = Path(png_path)
    write_atomic(path, plot_writer(results))
    return path


def plot_writer(results: EvalResults):
    """A function that writes the per-subject chart of `plot_per_subject` as PNG to the path it is given."""
    models = results.ordered_models()
    if not models:
        raise UserError("The results hold no models, so there is nothing to plot.")
    groups = [("Overall", {m.name: m.accuracy for m in models})]
    groups += [(s.replace("_", " "), {m.name: m.per_subject.get(s) for m in models}) for s in _subjects(results)]

    font, small, title_font = _font(14), _font(12), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_w(probe, g[0], font) for g in groups) + 12
    group_h = len(models) * (_BAR_H + _BAR_GAP) + _GROUP_GAP
    legend_h = 24 * len(models)
    top = _MARGIN + 28 + legend_h + 8
    axis_h = 28
    width = _MARGIN + label_w + _PLOT_W + 60 + _MARGIN
    height = top + len(groups) * group_h + axis_h + _MARGIN

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_MARGIN, _MARGIN), f"{results.suite}: accuracy per subject (%)", fill="black", font=title_font)
    colours = {m.name: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(models)}
    for i, m in enumerate(models):
        y = _MARGIN + 28 + 24 * i
        draw.rectangle([_MARGIN, y + 3, _MARGIN + 14, y + 17], fill=colours[m.name])
        draw.text((_MARGIN + 22, y + 2), f"{m.name} ({m.role}, {m.accuracy:.1f})", fill="black", font=font)

    x0 = _MARGIN + label_w
    bottom = top + len(groups) * group_h
    for tick in range(0, 101, 20):
        x = x0 + _PLOT_W * tick / 100
        draw.line([x, top, x, bottom], fill="#dddddd" if tick else "#444444", width=1)
        text = str(tick)
        draw.text((x - _text_w(draw, text, small) / 2, bottom + 6), text, fill="black", font=small)

    for g, (label, values) in enumerate(groups):
        y = top + g * group_h
        block = len(models) * (_BAR_H + _BAR_GAP)
        draw.text((x0 - 8 - _text_w(draw, label, font), y + block / 2 - 9), label, fill="black", font=font)
        for i, m in enumerate(models):
            yb = y + i * (_BAR_H + _BAR_GAP)
            value = values.get(m.name)
            if value is None:
                draw.text((x0 + 4, yb + 1), "n/a", fill="#777777", font=small)
                continue
            xe = x0 + _PLOT_W * max(0.0, min(100.0, value)) / 100
            if xe > x0:
                draw.rectangle([x0, yb, xe, yb + _BAR_H - 1], fill=colours[m.name])
            draw.text((xe + 4, yb + 1), f"{value:.1f}", fill="black", font=small)

    return lambda path: image.save(path, format="PNG")
