"""Turning a model's reply into an answer and scoring it against the gold answer.

The rules follow the vendor's MMMU scoring so our numbers sit next to the published
ones: the last ``\\boxed{...}`` after the reasoning wins, compared after normalising
(dollar signs and LaTeX commands removed, spaces removed, lower-cased); without one,
option matching on the visible answer text decides.

Multiple choice: a boxed value names an option by its letter ("B", "(B)", "B. 20 N"), its
text, or its number ("20" for "20 N").  A box that names no option counts as missing.
Fallback, in order, when no usable ``\\boxed{}`` is present:

1. the whole visible answer is just an option: ``B``, ``(B)``, ``B.``, or an option's text;
2. the last explicit phrase such as "the answer is B" / "Answer: (B)" / "the correct
   option is 42 N" that names an option (by letter or by its text);
3. option letters mentioned as tokens: exactly one distinct letter -> that letter;
   several different letters -> ``None`` (ambiguous, scored wrong).  "A" and "I" only
   count when marked as options ("(A)", "A.", "A)", "A:" or at the very end), because
   as English words they would make most replies ambiguous;
4. option texts found in the answer: exactly one option (after dropping options whose
   text is part of another found option) -> that letter, else ``None``.

Options that say the same thing (MathVista lists some answers twice) are one answer: the
first of their letters stands for all of them, so any of the letters, or the text, scores.

GPQA (``scoring["extract"] == ANSWER_LINE``): the last ``Answer: X`` line after the reasoning,
as simple-evals reads it, before any of the rules above.

Open questions: the last boxed value, else the last explicit answer phrase, else the
whole visible answer when it is one short line.  Values compare numerically when both
sides parse as numbers (a common unit after the predicted number is dropped), else as
normalised strings.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from r1v_quant.errors import UserError
from r1v_quant.model.prompt import THINK_END, THINK_START

# `</think>` in the DeepSeek-R1-Distill-Qwen tokenizer that the R1V models share.
THINK_END_ID = 151649

MULTIPLE_CHOICE = "multiple-choice"
# A multiple-choice suite posed with "The last line of your response should be ... 'Answer: $LETTER'".
ANSWER_LINE = "answer-line"

# A one-line visible answer longer than this is prose, not an answer.
_SHORT_ANSWER_CHARS = 60

# Relative tolerance for numeric answers: wide enough for float formatting noise,
# far too narrow to accept a different answer.
_REL_TOL = 1e-4


# ---------------------------------------------------------------- reasoning split


def is_unfinished(response: str, *, think_opened: bool = False) -> bool:
    """True when the reply opened a reasoning block and never closed it (ran away or
    hit the token limit).  ``think_opened``: the prompt itself ended with ``<think>``."""
    if THINK_END in response:
        return False
    return think_opened or THINK_START in response


def visible_answer(response: str, *, think_opened: bool = False) -> str | None:
    """The text after the last ``</think>``; ``None`` for an unfinished reply."""
    if is_unfinished(response, think_opened=think_opened):
        return None
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1]
    return response


def reasoning_length(
    tokens_or_text: Sequence[int] | str,
    *,
    end: int | str | None = None,
    tokenize: Callable[[str], Sequence[Any]] | None = None,
) -> int:
    """Length of the reasoning: tokens before the first ``</think>``.

    Token ids: counts ids before ``end`` (default the R1 tokenizer's ``</think>`` id); an
    unfinished reply counts in full.  Text: the part before ``</think>`` (without the
    opening ``<think>``) measured by ``tokenize`` when given, else in whitespace words.
    """
    if isinstance(tokens_or_text, str):
        marker = THINK_END if end is None else str(end)
        reasoning = tokens_or_text.split(marker, 1)[0].replace(THINK_START, "")
        return len(tokenize(reasoning)) if tokenize else len(reasoning.split())
    marker_id = THINK_END_ID if end is None else int(end)
    ids = list(tokens_or_text)
    return ids.index(marker_id) if marker_id in ids else len(ids)


# ---------------------------------------------------------------- normalisation


def last_boxed(text: str) -> str | None:
    """Content of the last complete top-level ``\\boxed{...}`` (or ``\\fbox{}``), nested
    braces and nested boxes kept; an unclosed box at the end (a cut-off reply) is skipped."""
    found: str | None = None
    covered = 0  # boxes starting before this offset sit inside an earlier box
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        if match.start() < covered:
            continue
        rest = text[match.end():]
        if rest.startswith("{"):
            content = _balanced(rest)
            if content is not None:
                found = content
                covered = match.end() + len(content) + 2
        else:
            bare = re.match(r"([A-Za-z0-9.+-]+)", rest)  # "\boxed B" written without braces
            if bare:
                found = bare.group(1)
    return found


def _balanced(text: str) -> str | None:
    """Inside of the brace group that opens ``text``; ``None`` when it never closes."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[1:i]
    return None


_WRAPPERS = (
    "text", "textbf", "textit", "texttt", "textrm", "textnormal", "mathrm", "mathbf",
    "mathit", "mathsf", "mathtt", "mathbb", "operatorname", "mbox", "emph", "boxed", "fbox",
)
_SPACING = re.compile(r"\\(?:left|right|displaystyle|quad|qquad|[,;:! ])")


def _unwrap(text: str) -> str:
    """Replace ``\\text{x}`` and friends by ``x``, innermost first, however deep."""
    pattern = re.compile(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{([^{}]*)\}")
    while True:
        new = pattern.sub(lambda m: m.group(1), text)
        if new == text:
            return new
        text = new


def normalize(text: str) -> str:
    """Canonical form for comparing answers: no dollars, LaTeX wrappers unwrapped and
    other commands reduced to their names, no braces or spaces, lower case."""
    s = text.strip().replace("$", "")
    s = _unwrap(s)
    s = _SPACING.sub("", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|°", "", s)  # degrees: "30^\circ" == "30"
    s = s.replace("\\%", "%")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # \frac{a}{b} -> a/b so simple fractions also parse as numbers.
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\((\s*[+-]?[\d.]+\s*)\)", r"\1", s)
    s = s.replace("\\", "").replace("{", "").replace("}", "")
    s = re.sub(r"\s+", "", s).lower()
    return s.rstrip(".")


# Units a numeric answer may carry ("3.5 cm", "\\text{ kg}") when the gold answer is a
# bare number.  A closed list: stripping any trailing letters would turn "2x" into "2".
_UNIT = re.compile(
    r"(?:k?m|cm|mm|nm|km|m\^?[23]|cm\^?[23]|k?g|mg|s|ms|h|hr|hours?|min|minutes?|seconds?|"
    r"k?n|k?j|k?w|v|mv|a|ma|k?hz|k?pa|atm|mol|m?l|k|ohms?|degrees?|dollars?|units?|m/s|m/s\^?2|km/h)"
)


def parse_number(text: str, *, allow_unit: bool = False) -> float | None:
    """A normalised answer read as a number: "1,000", "3.50", "50%", "1/2", "x=3", and
    with ``allow_unit`` also "3.5 cm"."""
    s = normalize(text)
    s = re.sub(r"^[a-z]=", "", s)  # "x=3" answers the question "x = ?"
    if allow_unit:
        s = re.sub(r"(?<=[\d.])" + _UNIT.pattern + r"$", "", s)
    s = s.rstrip("%")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    fraction = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)/([+-]?\d+(?:\.\d+)?)", s)
    if fraction:
        den = float(fraction.group(2))
        return float(fraction.group(1)) / den if den else None
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?", s):
        return None
    return float(s)


def _decimals(text: str) -> int:
    m = re.search(r"\.(\d+)", normalize(text))
    return len(m.group(1)) if m else 0


def numbers_match(pred: str, gold: str) -> bool:
    """Numeric equality: within a relative tolerance, or equal once the prediction is
    rounded to the decimals the gold answer states (gold "0.33" accepts 1/3).  An
    integer gold answer gets no rounding, so "3.4" never matches "3"."""
    p, g = parse_number(pred, allow_unit=True), parse_number(gold)
    if p is None or g is None:
        return False
    if math.isclose(p, g, rel_tol=_REL_TOL, abs_tol=1e-12):
        return True
    places = _decimals(gold)
    return places > 0 and round(p, places) == round(g, places)


def _same_number(value: float, option: str) -> bool:
    other = parse_number(option, allow_unit=True)
    return other is not None and math.isclose(value, other, rel_tol=_REL_TOL, abs_tol=1e-12)


def open_answers_match(pred: str, gold: str) -> bool:
    """An open answer against one gold value: numerically when both are numbers."""
    if parse_number(pred, allow_unit=True) is not None and parse_number(gold) is not None:
        return numbers_match(pred, gold)
    return normalize(pred) == normalize(gold)


# ---------------------------------------------------------------- multiple choice


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def canonical_letter(letter: str, options: Sequence[str]) -> str:
    """The first letter whose option says the same as ``letter``'s: options listed twice
    (MathVista's ['9', '12', '18', '18']) are one answer."""
    index = LETTERS.find(letter)
    if index < 0 or index >= len(options):
        return letter
    same = normalize(options[index])
    return next(LETTERS[i] for i, option in enumerate(options) if normalize(option) == same)


def option_letters(options: Sequence[str]) -> str:
    """Valid letters for a question; without options listed, A to J are allowed."""
    count = len(options) if options else 10
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:count]


def _letter_from_option_text(text: str, options: Sequence[str], *, prefix: bool = False) -> str | None:
    """The one option whose text equals ``text`` (or, with ``prefix``, starts it)."""
    norm = normalize(text)
    if not norm:
        return None
    # Prefixes end at word boundaries so option "1" never matches the text "12 N".
    words = text.split()
    heads = {normalize(" ".join(words[:k])) for k in range(1, min(len(words), 12) + 1)} if prefix else set()
    hits: list[tuple[int, int]] = []
    for i, option in enumerate(options):
        opt = normalize(option)
        if opt and (norm == opt or opt in heads):
            hits.append((len(opt), i))
    if not hits:
        value = parse_number(text, allow_unit=True)
        if value is not None:
            hits = [(0, i) for i, o in enumerate(options) if _same_number(value, o)]
    if not hits:
        return None
    best = max(h[0] for h in hits)
    longest = {canonical_letter(LETTERS[i], options) for n, i in hits if n == best}
    return longest.pop() if len(longest) == 1 else None


def answer_to_letter(text: str, options: Sequence[str], *, loose: bool = False) -> str | None:
    """Map a short answer (a boxed value, a phrase after "answer is") to an option letter.

    Accepts "B", "(B)", "B.", "option B", or an option's text.  ``loose`` also accepts a
    marked letter followed by more words ("B. 42 N because ...") and option text at the
    start of longer text.
    """
    letters = option_letters(options)
    s = _unwrap(text.replace("$", "")).strip().strip("*").strip()
    s = re.sub(r"^(?:option|choice)\s*", "", s, flags=re.IGNORECASE)
    exact = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", s)
    if exact and exact.group(1).upper() in letters:
        return exact.group(1).upper()
    if loose:
        marked = re.match(r"\(?([A-Z])(?:\)|[.:](?!\w))\s*", s) or re.match(r"([A-Z])(?=\s|,|$)", s)
        if marked and marked.group(1) in letters:
            return marked.group(1)
    return _letter_from_option_text(s, options, prefix=loose)


# "The answer is (B)", "Final Answer: B", "the correct option is 42 N", "answer would be B".
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|answer|correct\s+(?:option|choice))[*_\s]*"
    r"(?:is|would\s+be|should\s+be|will\s+be|:|=)[*_\s]*:?[*_\s]*"
    r"(?P<value>[^\n]*?)\s*(?=\n|$|\.\s|\.$)",
    re.IGNORECASE,
)


# simple-evals' "Answer: X", the letter standing alone ("Answer: After ..." names no option) and
# upper-case (the article in "my answer: a value of 3" is none either).
_ANSWER_LINE = re.compile(r"(?:answer|Answer|ANSWER)[ \t]*:[*_ \t]*\$?\(?([A-Z])\)?\$?(?![A-Za-z0-9])")


def answer_line_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter of the last ``Answer: X`` in ``text``; None when there is none."""
    letters = option_letters(options)
    found = [m.group(1) for m in _ANSWER_LINE.finditer(text) if m.group(1) in letters]
    return found[-1] if found else None


def _explicit_answers(text: str) -> list[str]:
    return [m.group("value").strip() for m in _ANSWER_PHRASE.finditer(text) if m.group("value").strip()]


def mentioned_letters(text: str, options: Sequence[str]) -> list[str]:
    """Distinct option letters standing alone in ``text``, in order of first mention.

    "A" and "I" double as English words, so they count only when marked as options."""
    letters = option_letters(options)
    found: list[str] = []
    for m in re.finditer(r"(?<![A-Za-z0-9\\'])(\()?([A-Z])(\))?(?![A-Za-z0-9'])", text):
        letter = m.group(2)
        if letter not in letters:
            continue
        if letter in "AI":
            after = text[m.end():]
            marked = bool(m.group(1) or m.group(3)) or re.match(r"[.:)](?!\w)", after) or not after.strip()
            if not marked:
                continue
        if letter not in found:
            found.append(letter)
    return found


def _options_in_text(text: str, options: Sequence[str]) -> list[str]:
    norm = normalize(text)
    found = {i: normalize(o) for i, o in enumerate(options) if normalize(o) and normalize(o) in norm}
    # An option whose text sits inside another found option's text ("10" in "100 N") is
    # that other option being mentioned, not a second candidate.
    kept = [i for i, t in found.items() if not any(j != i and t in u and t != u for j, u in found.items())]
    return list(dict.fromkeys(canonical_letter(LETTERS[i], options) for i in kept))


def infer_option(text: str, options: Sequence[str]) -> str | None:
    """Option letter from free answer text, by the fallback rules in the module doc."""
    stripped = text.strip()
    if not stripped:
        return None
    whole = answer_to_letter(stripped, options)
    if whole:
        return whole
    for value in reversed(_explicit_answers(stripped)):
        letter = answer_to_letter(value, options, loose=True)
        if letter:
            return letter
    mentioned = list(dict.fromkeys(canonical_letter(m, options) for m in mentioned_letters(stripped, options)))
    if mentioned:
        return mentioned[0] if len(mentioned) == 1 else None
    by_text = _options_in_text(stripped, options)
    return by_text[0] if len(by_text) == 1 else None


# ---------------------------------------------------------------- public entry points


def extract_answer(
    response: str, kind: str, options: Sequence[str] = (), *, think_opened: bool = False, extract: str | None = None
) -> str | None:
    """The answer a reply commits to, or ``None`` when it gives none (or never finished
    reasoning).  Multiple choice: an upper-case option letter (the first of options that say
    the same).  Open and text questions: the normalised answer string.  ``think_opened``: the
    prompt already opened ``<think>``.  ``extract``: ANSWER_LINE reads the ``Answer: X`` line first.
    """
    answer = visible_answer(response, think_opened=think_opened)
    if answer is None:
        return None
    boxed = last_boxed(answer)
    if kind == MULTIPLE_CHOICE:
        letter = answer_line_letter(answer, options) if extract == ANSWER_LINE else None
        if letter is None and boxed is not None:
            letter = answer_to_letter(boxed, options, loose=True)
        if letter is None:
            letter = infer_option(answer, options)
        return None if letter is None else canonical_letter(letter, options)
    if boxed is not None:
        return normalize(boxed) or None
    explicit = _explicit_answers(answer)
    if explicit:
        return normalize(explicit[-1]) or None
    line = answer.strip()
    if line and "\n" not in line and len(line) <= _SHORT_ANSWER_CHARS:
        return normalize(line) or None
    return None


def _field(sample_like: Any, name: str, default: Any = None) -> Any:
    if isinstance(sample_like, Mapping):
        return sample_like.get(name, default)
    return getattr(sample_like, name, default)


def gold_answers(answer: Any) -> list[str]:
    """Gold answers as a list: MMMU stores some open answers as a list written as text."""
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    text = str(answer).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, (list, tuple)) and parsed:
            return [str(a) for a in parsed]
    return [text]


def is_correct(sample_like: Any, response: str, *, think_opened: bool = False) -> bool:
    """Whether ``response`` answers the sample correctly.

    ``sample_like``: anything with ``answer``, ``kind`` and ``options`` (a ``Sample`` or a
    dict).  A sample without a gold answer cannot be scored and is refused."""
    gold = _field(sample_like, "answer")
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        ident = _field(sample_like, "id", "?")
        raise UserError(f"Sample {ident!r} has no gold answer, so it cannot be scored.")
    kind = _field(sample_like, "kind", "open")
    options = list(_field(sample_like, "options", None) or [])
    extract = (_field(sample_like, "scoring", None) or {}).get("extract")
    predicted = extract_answer(response, kind, options, think_opened=think_opened, extract=extract)
    if predicted is None:
        return False
    if kind == MULTIPLE_CHOICE:
        golds = {canonical_letter(answer_to_letter(g, options) or g.strip().upper(), options) for g in gold_answers(gold)}
        return predicted in golds
    return any(open_answers_match(predicted, g) for g in gold_answers(gold))
