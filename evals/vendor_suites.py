"""The suites the vendor reports besides MMMU, read in their public schemas and posed as
the vendor's kit poses them.

=============  =======================  ===========  =====  ==========================
suite          Hugging Face data set    config       split  kind
=============  =======================  ===========  =====  ==========================
mathvista      AI4Math/MathVista        default      testmini  multiple choice / free form
math-500       HuggingFaceH4/MATH-500   default      test   math (boxed, equivalence)
aime-2024      HuggingFaceH4/aime_2024  default      train  math (boxed, equivalence)
gpqa-diamond   Idavidrein/gpqa (gated)  gpqa_diamond train  multiple choice A-D
=============  =======================  ===========  =====  ==========================

Posing.  MathVista: the vendor's kit (a VLMEvalKit fork) shows the data set's own
``query`` text, which already carries the hint, the question and the lettered choices,
with the picture before it.  MATH-500 and AIME: the kit publishes no prompt of its own, so
they are posed the way R1 models are asked for a boxed answer ("Please reason step by
step, and put your final answer within \\boxed{}.").  GPQA: the kit has no GPQA code, so it
is posed in the form simple-evals, lighteval and open-r1 share ("Answer the following
multiple choice question. ... 'Answer: $LETTER' ..." then ``A) ...`` to ``D) ...``), its four
answers shuffled into A-D by a fixed seed per question, so every run and every model sees
the same order.  :data:`SUITE_NOTES` says, per suite, the template and the answer extraction.

Where the data comes from, first match wins: a local file or folder given with
``--data-path`` (parquet, jsonl, json or csv in the public schema), the ``datasets``
cache, and the Hub when it answers; otherwise one sentence saying how to provide it.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1v_quant.calib import hub
from r1v_quant.calib.mmmu import IMAGE_PLACEHOLDER, decode_image
from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals.math_scoring import FREE_FORM, MATH
from r1v_quant.evals.scoring import ANSWER_LINE, MULTIPLE_CHOICE

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# GPQA's answers are shuffled with this seed (and the question's id): fixed, so the order
# never depends on --seed and the reference cache stays valid across runs.
GPQA_SHUFFLE_SEED = 0
# The zero-shot chain-of-thought form of simple-evals, lighteval and open-r1.
GPQA_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
                 "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step "
                 "before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")
_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class VendorSuite:
    name: str            # the --suite name
    label: str           # shown in reports
    repo: str
    config: str | None
    split: str
    required: tuple[str, ...]
    to_sample: Callable[[dict, int, Path | None], Sample]   # (row, position, data folder)
    gated: bool = False


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value).strip()


# ---------------------------------------------------------------- posing


def _mathvista_image(row: dict, root: Path | None, pid: str):
    value = row.get("decoded_image")
    if value is not None and not (isinstance(value, dict) and not (value.get("bytes") or value.get("path"))):
        return decode_image(value, pid)
    name = row.get("image")
    if isinstance(name, str) and name and root is not None and (root / name).is_file():
        return decode_image({"path": str(root / name)}, pid)
    raise UserError(f"MathVista question {pid} has no picture: its decoded_image is empty and its image "
                    f"{name!r} is not a file under the data folder.")


def mathvista_sample(row: dict, position: int, root: Path | None) -> Sample:
    pid = _text(row, "pid") or str(position)
    query = _text(row, "query") or _text(row, "question")
    choices = [str(c) for c in (row.get("choices") or [])]
    answer = _text(row, "answer")
    metadata = row.get("metadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata) if metadata.startswith("{") else {}
    subject = str(metadata.get("task") or metadata.get("category") or "all")
    prompt = f"{IMAGE_PLACEHOLDER}\n{query}"
    images = [_mathvista_image(row, root, pid)]
    if _text(row, "question_type") == "multi_choice" and choices:
        if answer not in choices:
            raise UserError(f"MathVista question {pid}: its answer {answer!r} is not one of its choices.")
        letter = string.ascii_uppercase[choices.index(answer)]
        return Sample(id=pid, prompt=prompt, images=images, answer=letter, subject=subject, kind=MULTIPLE_CHOICE,
                      options=choices)
    precision = row.get("precision")
    scoring = {"answer_type": _text(row, "answer_type") or "text",
               "precision": None if precision in (None, "") or math.isnan(float(precision)) else int(float(precision))}
    return Sample(id=pid, prompt=prompt, images=images, answer=answer, subject=subject, kind=FREE_FORM,
                  scoring=scoring)


def math500_sample(row: dict, position: int, root: Path | None) -> Sample:
    return Sample(id=_text(row, "unique_id") or str(position), prompt=f"{_text(row, 'problem')}\n{BOXED_INSTRUCTION}",
                  answer=_text(row, "answer"), subject=_text(row, "subject") or "all", kind=MATH)


def aime_sample(row: dict, position: int, root: Path | None) -> Sample:
    return Sample(id=f"aime-{_text(row, 'id') or position}", prompt=f"{_text(row, 'problem')}\n{BOXED_INSTRUCTION}",
                  answer=_text(row, "answer"), subject=f"AIME {_text(row, 'year') or '2024'}", kind=MATH)


def gpqa_options(row: dict, question_id: str) -> tuple[list[str], str]:
    """The four answers in their shuffled order and the correct one's letter."""
    correct = _text(row, "Correct Answer")
    answers = [correct] + [_text(row, f"Incorrect Answer {k}") for k in (1, 2, 3)]
    order = list(range(4))
    random.Random(f"gpqa/{GPQA_SHUFFLE_SEED}/{question_id}").shuffle(order)
    return [answers[i] for i in order], "ABCD"[order.index(0)]


def gpqa_prompt(question: str, options: list[str]) -> str:
    return GPQA_TEMPLATE.format(question=question, **dict(zip("ABCD", options)))


def gpqa_sample(row: dict, position: int, root: Path | None) -> Sample:
    qid = _text(row, "Record ID") or str(position)
    options, letter = gpqa_options(row, qid)
    return Sample(id=qid, prompt=gpqa_prompt(_text(row, "Question"), options), answer=letter,
                  subject=_text(row, "High-level domain") or "all", kind=MULTIPLE_CHOICE, options=options,
                  scoring={"extract": ANSWER_LINE})


VENDOR_SUITES: dict[str, VendorSuite] = {s.name: s for s in (
    VendorSuite("mathvista", "mathvista-testmini", "AI4Math/MathVista", None, "testmini",
                ("pid", "query", "answer", "question_type"), mathvista_sample),
    VendorSuite("math-500", "math-500", "HuggingFaceH4/MATH-500", None, "test",
                ("problem", "answer", "unique_id"), math500_sample),
    VendorSuite("aime-2024", "aime-2024", "HuggingFaceH4/aime_2024", None, "train",
                ("id", "problem", "answer"), aime_sample),
    VendorSuite("gpqa-diamond", "gpqa-diamond", "Idavidrein/gpqa", "gpqa_diamond", "train",
                ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
                gpqa_sample, gated=True),
)}


_BOXED_NOTE = ("the problem, then \"Please reason step by step, and put your final answer within \\boxed{}.\" "
               "(the R1 form; the vendor's kit publishes no prompt for it).")
_MATH_EXTRACTION = ("strict: the last \\boxed{} after </think>, equal to the gold answer by mathematical equivalence "
                    "(math-verify; zero-padded integers such as 025 equal their numbers); the fallback figure also reads "
                    "a reply without a box by its last LaTeX or number expression, as lighteval and open-r1 do.")

# suite label -> (how its questions are posed, how answers are read), shown with its results.
SUITE_NOTES: dict[str, tuple[str, str]] = {
    "mmmu-val": ("the vendor kit's MMMU form (\"Question: ...\", \"Options:\" A. to Z., \"Please select the correct "
                 "answer from the options above.\"), its pictures placed as vLLM's chat server places the kit's "
                 "interleaved message for R1V: one <image> per picture, in the order the <image n> markers name them, "
                 "before the text, the markers removed.",
                 "the last \\boxed{} after </think>, else option matching on the visible answer (rule-scored)."),
    "mathvista-testmini": ("the data set's own query (hint, question, lettered choices) after its picture, as the "
                           "vendor's kit shows it.",
                           "multiple choice: the boxed letter or option text, else option matching, an option listed "
                           "twice counting as one answer; free form: the boxed value, else a short visible answer, "
                           "compared by answer type, floats rounded to the question's precision as MathVista's own "
                           "scorer does (rule-scored)."),
    "math-500": (_BOXED_NOTE, _MATH_EXTRACTION),
    "aime-2024": (_BOXED_NOTE, _MATH_EXTRACTION),
    "gpqa-diamond": ("the zero-shot template of simple-evals, lighteval and open-r1 (\"Answer the following multiple "
                     "choice question. The last line of your response should be of the following format: 'Answer: "
                     "$LETTER' ...\", the question, A) to D)), the four answers shuffled by a fixed seed per question.",
                     "the last \"Answer: X\" after </think>, else a boxed letter or option text, else option matching "
                     "(rule-scored)."),
}


# ---------------------------------------------------------------- reading rows


def _files(path: Path, suite: VendorSuite) -> list[Path]:
    if path.is_file():
        if path.suffix not in _FILE_SUFFIXES:
            raise UserError(f"{path} is not a {', '.join(_FILE_SUFFIXES)} file.")
        return [path]
    if not path.is_dir():
        raise UserError(f"the suite data path {path} does not exist.")
    # a folder holds what `hf download` makes: every configuration and split side by side
    return hub.files_of(path, hub.data_files(path, _FILE_SUFFIXES), suite.split, suite.config)


def _read_file(file: Path) -> tuple[list[str], list[dict]]:
    """A file's column names and rows."""
    try:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(file)
            return table.column_names, table.to_pylist()
        if file.suffix == ".csv":
            import csv

            with file.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                rows = list(reader)
                return list(reader.fieldnames or []), rows
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            data = json.loads(text)
            rows = list(data.values()) if isinstance(data, dict) else list(data)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        # a JSON row may leave out a column it has no value for: a column is one any row names
        return list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row)), rows
    except (OSError, ValueError) as error:
        raise UserError(f"could not read {file} ({error}).") from None
    except Exception as error:  # noqa: BLE001 - pyarrow raises several unrelated types for damaged files
        raise UserError(f"could not read {file} as parquet ({error}).") from None


def local_rows(suite: VendorSuite, path: Path) -> tuple[list[dict], Path]:
    """The rows of local files in the suite's public schema, and the folder pictures are under.
    Every file's columns are checked, so a file of another schema is refused, never read as blanks."""
    files = _files(path, suite)
    if not files:
        raise UserError(f"no {', '.join(_FILE_SUFFIXES)} files of {suite.repo} ({suite.split}) were found under {path}.")
    rows: list[dict] = []
    for file in files:
        columns, file_rows = _read_file(file)
        missing = [c for c in suite.required if c not in columns]
        if missing:
            raise UserError(f"{file} is not in {suite.repo}'s schema: it lacks the column(s) {', '.join(missing)}.")
        rows += file_rows
    return rows, (path if path.is_dir() else path.parent)


def _no_data(suite: VendorSuite) -> str:
    if suite.gated:
        return (f"{suite.repo} ({suite.config}) is gated and not in the local cache: accept its terms on "
                f"https://huggingface.co/datasets/{suite.repo} and log in with `hf auth login` on a connected "
                f"machine, or pass a local CSV or parquet copy with --data-path.")
    return (f"{suite.repo} ({suite.split}) is not available offline and the Hugging Face Hub cannot be reached; "
            "download it on a connected machine and pass the parquet or jsonl file with --data-path.")


def hub_rows(suite: VendorSuite) -> list[dict]:
    try:
        dataset = hub.load_hub_dataset(suite.repo, suite.config, suite.split)
    except hub.HubUnavailable:
        raise UserError(_no_data(suite)) from None
    except UserError:
        if suite.gated:
            raise UserError(_no_data(suite)) from None
        raise
    return [dataset[i] for i in range(len(dataset))]


def choose(total: int, n: int | None, name: str, seed: int) -> list[int]:
    """A seeded choice of ``n`` positions (all when ``n`` is None), in data order."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(f"{name}/{seed}").sample(range(total), n))


def load_vendor_suite(name: str, data_path: Path | None = None, n: int | None = None, seed: int = 0) -> list[Sample]:
    """``n`` questions of a vendor suite (all by default), seeded and in data order."""
    suite = VENDOR_SUITES[name]
    if data_path is not None:
        rows, root = local_rows(suite, Path(data_path).expanduser())
    else:
        rows, root = hub_rows(suite), None
    picked = choose(len(rows), n, name, seed)
    return [suite.to_sample(rows[i], i, root) for i in picked]

