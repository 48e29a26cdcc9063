"""MMMU validation questions as samples, posed the way the vendor's evaluation kit poses them.

Prompt format (multiple choice)::

    [Hint: {hint}\\n]Question: {question}\\nOptions:\\nA. {a}\\nB. {b}\\n...
    Please select the correct answer from the options above. \\n

Open questions stop after the ``Question:`` line.

Pictures are placed as the model is served.  The vendor's kit cuts the text at MMMU's
``<image n>`` markers (in the question and the options alike) and sends the pieces and the
pictures interleaved, as content parts of one message, to a vLLM server.  R1V's chat template
takes a message's content as one string, and for such templates vLLM's chat handling joins
the text parts with newlines and puts one ``<image>`` per picture, each on its own line, in
front of them (:func:`r1v_quant.model.prompt.served_prompt`).  So the prompt here is exactly
that: ``<image>\\n`` once per marker, in marker order (a picture named twice is listed twice,
pictures the text never names are left out), then the text pieces, markers removed, joined by
newlines.  A row whose text names none of its pictures gets all of them, in column order, as
the kit sends them first.  The same text goes to ``--engine torch`` and ``--engine vllm``,
which both expand each ``<image>`` in place, so the two engines, the vendor's published runs
and a client of ``serve`` sending the kit's message all show the model the same prompt.

Where the data comes from, first match wins: a folder or parquet file given by the user
(MMMU's own layout ``<Subject>/validation-*.parquet`` or flat files), MMMU files already
in the Hugging Face hub cache, the ``datasets`` cache (downloading only when the Hub
answers), and otherwise a UserError that says how to provide the data.
"""

from __future__ import annotations

import ast
import io
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from r1v_quant.errors import UserError
from r1v_quant.model.prompt import IMAGE_PLACEHOLDER, served_prompt

from . import hub
from .sample import Sample

MMMU_REPO = "MMMU/MMMU"
MMMU_SPLIT = "validation"

MMMU_SUBJECTS: tuple[str, ...] = (
    "Accounting",
    "Agriculture",
    "Architecture_and_Engineering",
    "Art",
    "Art_Theory",
    "Basic_Medical_Science",
    "Biology",
    "Chemistry",
    "Clinical_Medicine",
    "Computer_Science",
    "Design",
    "Diagnostics_and_Laboratory_Medicine",
    "Economics",
    "Electronics",
    "Energy_and_Power",
    "Finance",
    "Geography",
    "History",
    "Literature",
    "Manage",
    "Marketing",
    "Materials",
    "Math",
    "Mechanical_Engineering",
    "Music",
    "Pharmacy",
    "Physics",
    "Psychology",
    "Public_Health",
    "Sociology",
)

IMAGE_COLUMNS: tuple[str, ...] = tuple(f"image_{k}" for k in range(1, 8))
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "question", "options", "answer")

# MMMU's test split keeps its answers hidden: each row's answer reads "?".
HIDDEN_ANSWER = "?"

OPTIONS_INSTRUCTION = "Please select the correct answer from the options above. \n"

_MARKER = re.compile(r"<image (\d+)>")
_ROW_ID = re.compile(r"^(?:validation|dev|test)_(.+)_(\d+)$")

NO_DATA_MESSAGE = (
    "MMMU validation data is not available offline and the Hugging Face Hub cannot be "
    "reached; download the MMMU/MMMU parquet files on a connected machine and pass their "
    "folder with --calib-path (or use --calib builtin)."
)


# ---------------------------------------------------------------- prompt format


def pose_question(question: str, options: Sequence[str] = (), hint: str | None = None) -> str:
    """The vendor kit's text for one question: optional hint, question, lettered options."""
    if len(options) > len(string.ascii_uppercase):
        raise UserError(f"a question has {len(options)} options; at most 26 can be lettered.")
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n"
        text += "".join(f"{letter}. {option}\n" for letter, option in zip(string.ascii_uppercase, options))
        text += OPTIONS_INSTRUCTION
    return text


def parse_options(value: Any, row_id: str = "?") -> list[str]:
    """MMMU stores options as the text of a Python list literal; accept a real list too."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UserError(f"MMMU row {row_id} has options that are not a list literal: {value[:60]!r}.") from None
    if not isinstance(value, (list, tuple)):
        raise UserError(f"MMMU row {row_id} has options of type {type(value).__name__}, expected a list.")
    return [str(option) for option in value]


def decode_image(value: Any, row_id: str = "?") -> Image.Image:
    """An RGB picture from what parquet or ``datasets`` hold: a PIL image or {bytes, path}."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        raise UserError(f"MMMU row {row_id} has an image cell that holds neither bytes nor a path.")
    # convert() also forces the lazy decode, so no file handle outlives this call
    return image.convert("RGB")


def message_parts(text: str, row: dict, row_id: str) -> tuple[list[str | None], list[Image.Image]]:
    """The vendor kit's interleaved message for a row: text pieces and None where a picture
    stands (the text cut at each ``<image n>``, the marker removed), and the pictures in order."""
    decoded: dict[int, Image.Image] = {}

    def image_number(k: int) -> Image.Image:
        if k not in decoded:
            value = row.get(f"image_{k}")
            if value is None:
                raise UserError(f"MMMU row {row_id} refers to <image {k}> but its image_{k} is empty.")
            decoded[k] = decode_image(value, row_id)
        return decoded[k]

    pieces = _MARKER.split(text)  # text, number, text, number, ..., text
    if len(pieces) == 1:
        present = [k for k in range(1, len(IMAGE_COLUMNS) + 1) if row.get(f"image_{k}") is not None]
        return [None] * len(present) + [text], [image_number(k) for k in present]
    parts: list[str | None] = [pieces[0]]
    images = []
    for number, after in zip(pieces[1::2], pieces[2::2]):
        images.append(image_number(int(number)))
        parts += [None, after]
    return parts, images


def format_mmmu_question(row: dict) -> tuple[str, list[Image.Image]]:
    """The vendor-format prompt of one MMMU row as the served model sees it, and its images in placeholder order."""
    row_id = str(row.get("id", "?"))
    options = parse_options(row.get("options"), row_id)
    text = pose_question(str(row["question"]), options, row.get("hint") or None)
    if IMAGE_PLACEHOLDER in text:
        # a literal "<image>" in MMMU's own text would pair pictures with the wrong slots
        raise UserError(f"MMMU row {row_id} contains a literal {IMAGE_PLACEHOLDER} in its text.")
    parts, images = message_parts(text, row, row_id)
    return served_prompt(parts), images


def subject_of(row_id: str, fallback: str = "unknown") -> str:
    """'validation_Art_Theory_1' -> 'Art_Theory'."""
    match = _ROW_ID.match(row_id)
    return match.group(1) if match else fallback


def mmmu_sample(row: dict, subject: str | None = None) -> Sample:
    """One MMMU row as a Sample."""
    prompt, images = format_mmmu_question(row)
    row_id = str(row["id"])
    options = parse_options(row.get("options"), row_id)
    kind = row.get("question_type") or ("multiple-choice" if options else "open")
    answer = row.get("answer")
    return Sample(
        id=row_id,
        prompt=prompt,
        images=images,
        answer=None if answer is None or str(answer).strip() == HIDDEN_ANSWER else str(answer),
        subject=subject or subject_of(row_id),
        kind=str(kind),
        options=options,
    )


# ---------------------------------------------------------------- seeded stratified choice


def subject_rank(subject: str) -> tuple[int, str]:
    """MMMU's own subject order first, any other subject after them alphabetically."""
    if subject in MMMU_SUBJECTS:
        return (MMMU_SUBJECTS.index(subject), "")
    return (len(MMMU_SUBJECTS), subject)


def stratified_counts(sizes: dict[str, int], n: int, seed: int = 0) -> dict[str, int]:
    """How many rows to take from each subject: as even as the subjects' sizes allow.

    Counts differ by at most one between subjects that still had rows to give.  The
    subjects that get the odd extra row come from a seeded order, so a larger ``n``
    only ever adds rows to a smaller one's choice.
    """
    subjects = sorted(sizes, key=subject_rank)
    tie_order = subjects[:]
    random.Random(f"mmmu-subjects/{seed}").shuffle(tie_order)
    counts = {s: 0 for s in subjects}
    remaining = min(n, sum(sizes.values()))
    while remaining > 0:
        open_subjects = [s for s in tie_order if counts[s] < sizes[s]]
        share = remaining // len(open_subjects)
        if share == 0:
            for s in open_subjects[:remaining]:
                counts[s] += 1
            break
        for s in open_subjects:
            take = min(share, sizes[s] - counts[s])
            counts[s] += take
            remaining -= take
    return counts


def choose_rows(subjects: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """Indices of a seeded, subject-stratified choice of ``n`` rows, given each row's subject.

    The result is ordered by subject (MMMU's order) and then by position, never by the
    random draw, so equal inputs give equal lists.
    """
    by_subject: dict[str, list[int]] = {}
    for index, subject in enumerate(subjects):
        by_subject.setdefault(subject, []).append(index)
    counts = stratified_counts({s: len(rows) for s, rows in by_subject.items()}, n, seed)
    chosen: list[int] = []
    for subject in sorted(by_subject, key=subject_rank):
        order = by_subject[subject][:]
        random.Random(f"mmmu-rows/{seed}/{subject}").shuffle(order)
        chosen.extend(sorted(order[: counts[subject]]))
    return chosen


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """Rows known by subject before any is read, so only the chosen ones get decoded."""

    subjects: list[str]
    fetch: Callable[[list[int]], list[dict]]  # indices -> rows, in the order given


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".parquet":
            raise UserError(f"{path} is not a .parquet file; pass a parquet file or a folder of them.")
        return [path]
    if not path.is_dir():
        raise UserError(f"the MMMU data path {path} does not exist.")
    # by path, so <Subject>/validation/0000.parquet (the Hub's converted layout) counts too:
    # dev rows would leak few-shot examples and test rows carry no answers
    return hub.files_of(path, hub.data_files(path, (".parquet",)), MMMU_SPLIT)


def _read_ids(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(file).names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UserError(f"{file} is not in MMMU's layout: it lacks the column(s) {', '.join(missing)}.")
        return [str(v) for v in pq.read_table(file, columns=["id"]).column("id").to_pylist()]
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow raises several unrelated types for damaged files
        raise UserError(f"could not read {file} as parquet ({error}).") from None


def _subject_for(row_id: str, file: Path, root: Path) -> str:
    parts = file.relative_to(root).parts if file != root else (file.name,)
    return subject_of(row_id, fallback=parts[0] if len(parts) > 1 else file.stem)


def parquet_source(path: str | Path) -> _Source:
    """A source over a parquet file or a folder of them (MMMU's layout or flat)."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    files = _parquet_files(root)
    if not files:
        raise UserError(f"no MMMU validation parquet files were found under {root}.")
    locations: list[tuple[Path, int]] = []
    subjects: list[str] = []
    seen: set[str] = set()
    for file in files:
        for position, row_id in enumerate(_read_ids(file)):
            if row_id in seen:  # the same data both in subject folders and flat
                continue
            seen.add(row_id)
            locations.append((file, position))
            subjects.append(_subject_for(row_id, file, root))

    def fetch(indices: list[int]) -> list[dict]:
        rows: dict[int, dict] = {}
        by_file: dict[Path, list[int]] = {}
        for index in indices:
            by_file.setdefault(locations[index][0], []).append(index)
        for file, wanted in by_file.items():
            table = pq.read_table(file).take([locations[i][1] for i in wanted])
            rows.update(zip(wanted, table.to_pylist()))
        return [rows[i] for i in indices]

    return _Source(subjects, fetch)


def _hub_snapshot() -> Path | None:
    """The newest local snapshot of MMMU/MMMU in the hub cache (e.g. from snapshot_download)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"datasets--{MMMU_REPO.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return snapshots[0] if snapshots else None


def _hub_cache_source() -> _Source | None:
    snapshot = _hub_snapshot()
    try:
        if snapshot is None or not _parquet_files(snapshot):
            return None
    except UserError:  # a cached snapshot without the validation split: look further
        return None
    return parquet_source(snapshot)


# ---------------------------------------------------------------- the datasets cache


def datasets_source(subjects: Iterable[str] = MMMU_SUBJECTS) -> _Source | None:
    """A source over the MMMU subjects ``datasets`` can provide; None when it has none."""
    online = hub.once(hub.hub_reachable)
    loaded: list[tuple[str, Any]] = []
    for subject in subjects:
        try:
            loaded.append((subject, hub.load_hub_dataset(MMMU_REPO, subject, MMMU_SPLIT, online)))
        except hub.HubUnavailable:
            continue
    if not loaded:
        return None
    locations = [(subject, dataset, i) for subject, dataset in loaded for i in range(len(dataset))]

    def fetch(indices: list[int]) -> list[dict]:
        return [locations[i][1][locations[i][2]] for i in indices]

    return _Source([loc[0] for loc in locations], fetch)


# ---------------------------------------------------------------- loading


def sample_source(source: _Source, n: int, seed: int = 0) -> list[Sample]:
    """A stratified, seeded choice of ``n`` rows of a source, as Samples."""
    chosen = choose_rows(source.subjects, n, seed)
    rows = source.fetch(chosen)
    return [mmmu_sample(row, source.subjects[i]) for i, row in zip(chosen, rows)]


def find_mmmu_source(source_path: str | Path | None = None) -> _Source:
    """The first place that holds MMMU validation data, in the order the module describes."""
    if source_path is not None:
        return parquet_source(source_path)
    for find in (_hub_cache_source, datasets_source):
        source = find()
        if source is not None and source.subjects:
            return source
    raise UserError(NO_DATA_MESSAGE)


def load_mmmu(source_path: str | Path | None = None, n: int = 128, seed: int = 0) -> list[Sample]:
    """``n`` MMMU validation questions, stratified across subjects, seeded and stably ordered."""
    if n < 0:
        raise UserError(f"the number of MMMU samples must not be negative (got {n}).")
    return sample_source(find_mmmu_source(source_path), n, seed)
