"""The vendor's suites in their public schemas: loading from local files, posing, scoring
(boxed answers, mathematical equivalence, MathVista's answer types, GPQA's letters),
pass@1 over k samples, and the published figures."""

import csv
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from r1v_quant.calib.sample import Sample
from r1v_quant.errors import UserError
from r1v_quant.evals import pass_at_k, published
from r1v_quant.evals.math_scoring import grade, grade_with_fallback, math_equal
from r1v_quant.evals.vendor_suites import BOXED_INSTRUCTION, GPQA_TEMPLATE, VENDOR_SUITES, gpqa_options, load_vendor_suite


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def mathvista_rows():
    """Two MathVista testmini rows in the hub's schema: one multiple choice, one float."""
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
            "img_height": 24, "img_width": 32, "language": "english", "skills": ["algebraic reasoning"],
            "source": "Geometry3K", "split": "testmini", "task": "geometry problem solving"}
    return [
        {"pid": "1", "question": "Find the angle x.", "image": "images/1.jpg",
         "decoded_image": {"bytes": _png("red"), "path": None}, "choices": ["30", "45", "60", "90"],
         "unit": None, "precision": None, "answer": "60", "question_type": "multi_choice",
         "answer_type": "text", "metadata": meta,
         "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                  "at the end.\nQuestion: Find the angle x.\nChoices:\n(A) 30\n(B) 45\n(C) 60\n(D) 90"},
        {"pid": "2", "question": "How long is the bar?", "image": "images/2.jpg",
         "decoded_image": {"bytes": _png("blue"), "path": None}, "choices": None, "unit": None,
         "precision": 2.0, "answer": "1.25", "question_type": "free_form", "answer_type": "float",
         "metadata": {**meta, "task": "figure question answering"},
         "query": "Hint: Please answer the question requiring a floating-point number with two decimal places "
                  "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: How long is the bar?"},
    ]


@pytest.fixture
def mathvista_file(tmp_path):
    path = tmp_path / "testmini-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(mathvista_rows()), path)
    return path


MATH500 = [
    {"problem": "What is $1/2$ written as a fraction?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
     "answer": "\\frac{1}{2}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Compute $3/4$.", "solution": "$\\boxed{\\dfrac{3}{4}}$", "answer": "\\dfrac{3}{4}",
     "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"},
    {"problem": "What is $2+2$?", "solution": "$\\boxed{4}$", "answer": "4", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/3.json"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# The header of gpqa_main.csv, gpqa_diamond.csv and gpqa_extended.csv in Idavidrein/gpqa.
GPQA_COLUMNS = (
    "Pre-Revision Question", "Pre-Revision Correct Answer", "Pre-Revision Incorrect Answer 1",
    "Pre-Revision Incorrect Answer 2", "Pre-Revision Incorrect Answer 3", "Pre-Revision Explanation",
    "Self-reported question-writing time (minutes)", "Question", "Correct Answer", "Incorrect Answer 1",
    "Incorrect Answer 2", "Incorrect Answer 3", "Explanation", "Revision Comments (from Question Writer)", "Subdomain",
    "Writer's Difficulty Estimate", "Extra Revised Question", "Extra Revised Explanation", "Extra Revised Correct Answer",
    "Extra Revised Incorrect Answer 1", "Extra Revised Incorrect Answer 2", "Extra Revised Incorrect Answer 3",
    "Non-Expert Validator Accuracy", "Majority Non-Expert Vals Incorrect", "Expert Validator Accuracy", "Record ID",
    "High-level domain", "Question Writer",
    *(f"{field}_EV_{k}" for k in (1, 2) for field in (
        "Feedback", "Validator Revision Suggestion", "Is First Validation", "Post hoc agreement", "Sufficient Expertise?",
        "Understand the question?", "Question Difficulty", "Validator Answered Correctly", "Self-reported time (minutes)",
        "Probability Correct", "Manual Correctness Adjustment", "Expert Validator")),
    *(f"{field}_NEV_{k}" for k in (1, 2, 3) for field in (
        "Feedback", "Validator Answered Correctly", "Explanation", "Self-reported time (minutes)", "Websites visited",
        "Probability Correct", "Manual Correctness Adjustment", "Non-Expert Validator")),
    "Expert Validator Disagreement Category", "Canary String",
)
# gpqa_experts.csv describes the experts, not questions: none of the question columns.
GPQA_EXPERT_COLUMNS = ("Expert ID", "Domain", "Subdomain", "Highest degree", "Role")


def gpqa_row(rid: str, domain: str = "Physics") -> dict:
    row = dict.fromkeys(GPQA_COLUMNS, "")
    row.update({"Question": f"Which value is right in case {rid}?", "Correct Answer": f"right {rid}",
                "Incorrect Answer 1": f"wrong {rid}a", "Incorrect Answer 2": f"wrong {rid}b",
                "Incorrect Answer 3": f"wrong {rid}c", "Subdomain": f"{domain} (general)", "Record ID": rid,
                "High-level domain": domain, "Canary String": "canary"})
    return row


def write_csv(path, columns, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def gpqa_csv(path, n=3):
    return write_csv(path, GPQA_COLUMNS, [gpqa_row(f"rec{i}") for i in range(n)])


def gpqa_folder(root, diamond=3, main_extra=4, extended_extra=5):
    """Idavidrein/gpqa as `hf download --local-dir` leaves it: four CSVs side by side (diamond
    inside main inside extended, the experts file in its own schema), the card, the licence
    and the download's metadata."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"recD{i}" for i in range(diamond)]
    main = ids + [f"recM{i}" for i in range(main_extra)]
    extended = main + [f"recX{i}" for i in range(extended_extra)]
    write_csv(root / "gpqa_diamond.csv", GPQA_COLUMNS, [gpqa_row(r) for r in ids])
    write_csv(root / "gpqa_main.csv", GPQA_COLUMNS, [gpqa_row(r) for r in main])
    write_csv(root / "gpqa_extended.csv", GPQA_COLUMNS, [gpqa_row(r) for r in extended])
    write_csv(root / "gpqa_experts.csv", GPQA_EXPERT_COLUMNS,
              [{"Expert ID": f"e{i}", "Domain": "Physics", "Subdomain": "Optics", "Highest degree": "PhD",
                "Role": "writer"} for i in range(6)])
    (root / "README.md").write_text("configs:\n- config_name: gpqa_diamond\n  data_files: gpqa_diamond.csv\n")
    (root / "license.txt").write_text("CC BY 4.0\n")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "gpqa_diamond.csv.metadata").write_text("x\n")
    return root, ids


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("pred, gold", [("0.5", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "0.75"), ("\\frac12", "1/2"),
                                        ("(3, 4)", "(3,4)"), ("\\text{Evelyn}", "Evelyn"), ("2\\sqrt{2}", "\\sqrt{8}")])
def test_equivalent_forms_match(pred, gold):
    assert math_equal(pred, gold)


@pytest.mark.parametrize("pred, gold", [("0.75", "\\frac{1}{2}"), ("3", "4"), ("\\sqrt{2}", "2"), ("Eve", "Evelyn")])
def test_different_answers_do_not_match(pred, gold):
    assert not math_equal(pred, gold)


def _math(answer):
    return Sample(id="q", prompt="p", answer=answer, kind="math")


def test_math_scores_the_last_boxed_answer_after_the_reasoning():
    reply = "<think>maybe \\boxed{1}</think>First \\boxed{0.3}, then finally \\boxed{\\dfrac{3}{4}}."
    assert grade(_math("0.75"), reply) == ("\\dfrac{3}{4}", True)
    assert grade(_math("0.5"), "</think>The answer is $\\boxed{\\frac{1}{2}}$") == ("\\frac{1}{2}", True)
    assert grade(_math("4"), "</think>\\boxed{5}") == ("5", False)
    assert grade(_math("4"), "</think>The answer is 4.") == (None, False)  # no box: no answer
    assert grade(_math("4"), "<think>still \\boxed{4}", think_opened=True) == (None, False)  # never finished


# ---------------------------------------------------------------- MathVista


def test_mathvista_is_posed_with_its_query_and_picture(mathvista_file):
    choice, free = load_vendor_suite("mathvista", mathvista_file)
    assert choice.prompt == "<image>\n" + mathvista_rows()[0]["query"]
    assert choice.images[0].size == (32, 24) and choice.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert (choice.kind, choice.answer, choice.options) == ("multiple-choice", "C", ["30", "45", "60", "90"])
    assert choice.subject == "geometry problem solving"
    assert (free.kind, free.answer, free.scoring) == ("free-form", "1.25", {"answer_type": "float", "precision": 2})
    assert free.images[0].getpixel((0, 0)) == (0, 0, 255)


def test_mathvista_scoring_by_answer_type(mathvista_file):
    choice, free = load_vendor_suite("mathvista", mathvista_file)
    assert grade(choice, "</think>\\boxed{C}")[1] and grade(choice, "</think>\\boxed{60}")[1]
    assert grade(choice, "</think>C")[1] and not grade(choice, "</think>\\boxed{B}")[1]
    assert grade(free, "</think>\\boxed{1.25}")[1] and grade(free, "</think>\\boxed{1.2499}")[1]  # 2 decimals
    assert grade(free, "</think>\\boxed{\\frac{5}{4}}")[1]
    assert not grade(free, "</think>\\boxed{1.26}")[1]
    integer = Sample(id="i", prompt="p", answer="7", kind="free-form", scoring={"answer_type": "integer"})
    assert grade(integer, "</think>\\boxed{7}")[1] and not grade(integer, "</think>\\boxed{7.4}")[1]
    text = Sample(id="t", prompt="p", answer="Tuesday", kind="free-form", scoring={"answer_type": "text"})
    assert grade(text, "</think>\\boxed{\\text{tuesday}}")[1] and not grade(text, "</think>\\boxed{Monday}")[1]


def test_mathvista_pictures_from_the_image_column_under_the_data_folder(tmp_path):
    rows = mathvista_rows()
    (tmp_path / "images").mkdir()
    for row in rows:
        (tmp_path / row["image"]).write_bytes(row["decoded_image"]["bytes"])
        row["decoded_image"] = None
    write_jsonl(tmp_path / "testmini.jsonl", rows)
    samples = load_vendor_suite("mathvista", tmp_path)
    assert [s.images[0].getpixel((0, 0)) for s in samples] == [(255, 0, 0), (0, 0, 255)]


# ---------------------------------------------------------------- MATH-500, AIME, GPQA


def test_math500_from_jsonl_and_a_seeded_limit(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", MATH500)
    samples = load_vendor_suite("math-500", path)
    assert [s.id for s in samples] == [r["unique_id"] for r in MATH500]
    assert samples[0].prompt == f"{MATH500[0]['problem']}\n{BOXED_INSTRUCTION}" and samples[0].kind == "math"
    assert samples[1].subject == "Algebra"
    two = load_vendor_suite("math-500", path, n=2, seed=3)
    assert len(two) == 2 and [s.id for s in two] == [s.id for s in load_vendor_suite("math-500", path, n=2, seed=3)]


def test_aime_from_parquet(tmp_path):
    rows = [{"id": 60 + i, "problem": f"Find N for case {i}.", "solution": "...", "answer": str(100 + i),
             "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems", "year": "2024"}
            for i in range(3)]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples = load_vendor_suite("aime-2024", tmp_path)
    assert [s.id for s in samples] == ["aime-60", "aime-61", "aime-62"] and samples[2].answer == "102"
    assert grade(samples[0], "</think>So $N = \\boxed{100}$.")[1]
    assert not grade(samples[0], "</think>\\boxed{101}")[1]


def test_gpqa_choices_are_shuffled_with_a_fixed_seed_and_scored_by_letter(tmp_path):
    path = gpqa_csv(tmp_path / "gpqa_diamond.csv")
    samples = load_vendor_suite("gpqa-diamond", path)
    assert samples == load_vendor_suite("gpqa-diamond", path, seed=5)  # --seed does not move the answers
    letters = [s.answer for s in samples]
    for s in samples:
        assert sorted(s.options) == sorted([f"right {s.id}"] + [f"wrong {s.id}{c}" for c in "abc"])
        assert s.options["ABCD".index(s.answer)].startswith("right") and s.subject == "Physics"
    assert gpqa_options({"Correct Answer": "x", "Incorrect Answer 1": "y", "Incorrect Answer 2": "z",
                         "Incorrect Answer 3": "w"}, "rec0")[1] == letters[0]
    wrong = "ABCD"[("ABCD".index(letters[0]) + 1) % 4]
    assert grade(samples[0], f"</think>\\boxed{{{letters[0]}}}")[1] and grade(samples[0], f"</think>{letters[0]}")[1]
    assert not grade(samples[0], f"</think>\\boxed{{{wrong}}}")[1]


def test_gpqa_is_posed_in_the_simple_evals_form_and_read_from_its_answer_line(tmp_path):
    (sample,) = load_vendor_suite("gpqa-diamond", gpqa_csv(tmp_path / "gpqa_diamond.csv", n=1))
    o = sample.options
    assert sample.prompt == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering."
        f"\n\nWhich value is right in case rec0?\n\nA) {o[0]}\nB) {o[1]}\nC) {o[2]}\nD) {o[3]}")
    assert sample.prompt == GPQA_TEMPLATE.format(question="Which value is right in case rec0?", **dict(zip("ABCD", o)))
    right, wrong = sample.answer, "ABCD"[("ABCD".index(sample.answer) + 1) % 4]
    assert grade(sample, f"</think>Both fit.\nAnswer: {right}") == (right, True)
    assert grade(sample, f"</think>Answer: {wrong}")[1] is False
    # the answer line the template asks for wins over a box and over letters mentioned earlier
    assert grade(sample, f"</think>Maybe \\boxed{{{wrong}}} or {wrong}.\n\nAnswer: {right}")[1]
    assert grade(sample, f"</think>Answer: {wrong}\nOn reflection:\n**Answer:** ${right}$")[1]
    assert grade(sample, f"<think>Answer: {right}</think>\\boxed{{{right}}}")[1]  # the box still counts
    assert grade(sample, f"<think>Answer: {right}", think_opened=True) == (None, False)  # never finished
    # "Answer: After ..." names no option
    assert grade(sample, "</think>Answer: After some thought it is unclear.")[0] is None


def test_gpqa_from_the_four_csv_folder_reads_the_diamond_file_only(tmp_path):
    folder, diamond = gpqa_folder(tmp_path / "gpqa")
    samples = load_vendor_suite("gpqa-diamond", folder)
    assert [s.id for s in samples] == diamond
    assert all(s.prompt.count("Which value is right") == 1 and len(set(s.options)) == 4 for s in samples)
    (folder / "gpqa_diamond.csv").unlink()
    with pytest.raises(UserError, match="no file under .* belongs to the gpqa_diamond configuration"):
        load_vendor_suite("gpqa-diamond", folder)


def test_the_eval_suite_from_the_four_csv_folder_has_the_198_diamond_questions(tmp_path):
    from r1v_quant.evals.settings import EvalSettings
    from r1v_quant.evals.suites import load_suite

    folder, diamond = gpqa_folder(tmp_path / "gpqa", diamond=198, main_extra=250, extended_extra=98)
    suite = load_suite(EvalSettings(suite="gpqa-diamond", data_path=folder))
    assert (suite.name, len(suite.samples)) == ("gpqa-diamond", 198)
    assert [s.id for s in suite.samples] == diamond


def test_the_configuration_folder_of_a_parquet_conversion_counts_too(tmp_path):
    for config, ids in (("gpqa_diamond", ["d0", "d1"]), ("gpqa_main", ["d0", "d1", "m0"])):
        (tmp_path / config).mkdir()
        pq.write_table(pa.Table.from_pylist([gpqa_row(r) for r in ids]), tmp_path / config / "train-00000-of-00001.parquet")
    assert [s.id for s in load_vendor_suite("gpqa-diamond", tmp_path)] == ["d0", "d1"]


def test_every_files_columns_are_checked_not_the_first_row(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", MATH500)
    write_jsonl(tmp_path / "test_more.jsonl", [{"question": "What is 1+1?", "answer": "2"}])
    with pytest.raises(UserError, match="test_more.jsonl is not in HuggingFaceH4/MATH-500's schema"):
        load_vendor_suite("math-500", tmp_path)
    # a row may leave out a column another row of its file has, as JSON lines do
    other = tmp_path / "other"
    other.mkdir()
    path = write_jsonl(other / "test.jsonl", [MATH500[0], {k: v for k, v in MATH500[1].items() if k != "level"}])
    assert len(load_vendor_suite("math-500", path)) == 2


def test_the_hubs_converted_parquet_layout_loads_only_the_scored_split(tmp_path):
    rows = mathvista_rows()
    for split, chosen in (("testmini", rows), ("test", [{**r, "pid": f"t{r['pid']}", "answer": ""} for r in rows])):
        (tmp_path / "default" / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(chosen), tmp_path / "default" / split / "0000.parquet")
    assert [s.id for s in load_vendor_suite("mathvista", tmp_path)] == ["1", "2"]
    shutil.rmtree(tmp_path / "default" / "testmini")
    with pytest.raises(UserError, match="holds the test split\\(s\\) but no testmini files"):
        load_vendor_suite("mathvista", tmp_path)


def test_mmmu_in_the_converted_layout_reads_validation_and_hidden_answers_are_refused(tmp_path):
    from helpers.mmmu_fixture import fixture_row, mmmu_schema
    from r1v_quant.calib.mmmu import load_mmmu
    from r1v_quant.evals.settings import EvalSettings
    from r1v_quant.evals.suites import load_suite

    for split in ("validation", "dev", "test"):
        rows = [{**fixture_row("Art", k), "id": f"{split}_Art_{k}"} for k in (1, 2)]
        if split == "test":
            rows = [{**r, "answer": "?"} for r in rows]  # MMMU's test answers are hidden
        (tmp_path / "Art" / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=mmmu_schema()), tmp_path / "Art" / split / "0000.parquet")
    samples = load_mmmu(tmp_path, n=100)
    assert [s.id for s in samples] == ["validation_Art_1", "validation_Art_2"]
    assert {s.subject for s in samples} == {"Art"}
    with pytest.raises(UserError, match="question test_Art_1 has no gold answer .* hidden"):
        load_suite(EvalSettings(suite=str(tmp_path / "Art" / "test" / "0000.parquet")))


def test_aime_zero_padded_answers_equal_their_numbers_strictly_and_with_the_fallback(tmp_path):
    # as in HuggingFaceH4/aime_2024: answers are text, some zero-padded to three digits
    answers = ["025", "080", "204", "009", "510", "033", "104"]
    rows = [{"id": 60 + i, "problem": f"Find N for case {i}.", "solution": "...", "answer": a,
             "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems", "year": "2024"}
            for i, a in enumerate(answers)]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples = load_vendor_suite("aime-2024", tmp_path)
    assert [s.answer for s in samples] == answers
    first, ninth = samples[0], samples[3]
    assert grade(first, "</think>\\boxed{25}") == ("25", True) and grade(ninth, "</think>\\boxed{9}")[1]
    assert grade(samples[2], "</think>\\boxed{204}")[1] and not grade(first, "</think>\\boxed{250}")[1]
    # no box: strict gives no answer, the fallback reads the last number or expression
    assert grade(first, "</think>So N is 25.") == (None, False)
    assert grade_with_fallback(first, "</think>So N is 25.") == ("25", True)
    assert grade_with_fallback(ninth, "</think>Hence $N = \\frac{18}{2}$.")[1]
    assert grade_with_fallback(first, "</think>First 25, then N = 24.")[1] is False  # the last one counts
    assert grade_with_fallback(first, "</think>\\boxed{24} though 25 is close")[1] is False  # a box stays strict
    assert grade_with_fallback(first, "<think>N is 25", think_opened=True) == (None, False)


def test_mathvista_options_listed_twice_are_one_answer(tmp_path):
    # testmini pid 781 lists its answer twice
    row = {**mathvista_rows()[0], "pid": "781", "choices": ["9", "12", "18", "18"], "answer": "18",
           "query": "Hint: ...\nQuestion: How many?\nChoices:\n(A) 9\n(B) 12\n(C) 18\n(D) 18"}
    path = tmp_path / "testmini-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    (sample,) = load_vendor_suite("mathvista", path)
    assert (sample.answer, sample.options) == ("C", ["9", "12", "18", "18"])
    for reply in ("\\boxed{18}", "\\boxed{C}", "\\boxed{D}", "D", "The answer is (D) 18.", "C or D, both 18"):
        assert grade(sample, f"</think>{reply}") == ("C", True), reply
    assert not grade(sample, "</think>\\boxed{12}")[1] and not grade(sample, "</think>\\boxed{A}")[1]


def test_wrong_schema_and_missing_gated_data_are_one_sentence(tmp_path, monkeypatch):
    from r1v_quant.calib import hub

    bad = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(UserError, match="not in HuggingFaceH4/MATH-500's schema: it lacks the column\\(s\\) problem"):
        load_vendor_suite("math-500", bad)

    def unavailable(*a, **k):
        raise hub.HubUnavailable("x")

    monkeypatch.setattr(hub, "load_hub_dataset", unavailable)
    with pytest.raises(UserError, match="gated .* accept its terms .* log in .* local CSV or parquet copy"):
        load_vendor_suite("gpqa-diamond")
    with pytest.raises(UserError, match="AI4Math/MathVista \\(testmini\\) is not available offline"):
        load_vendor_suite("mathvista")


def test_every_suite_names_its_public_source():
    assert {n: (s.repo, s.config, s.split) for n, s in VENDOR_SUITES.items()} == {
        "mathvista": ("AI4Math/MathVista", None, "testmini"), "math-500": ("HuggingFaceH4/MATH-500", None, "test"),
        "aime-2024": ("HuggingFaceH4/aime_2024", None, "train"),
        "gpqa-diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train")}


# ---------------------------------------------------------------- pass@1 over k samples


def test_pass_at_1_interval_accounts_for_the_k_draws_per_question():
    samples = pass_at_k.replicate([Sample(id=f"q{i}", prompt="p", answer="1") for i in range(20)], 4)
    clusters = [pass_at_k.question_of(s.id) for s in samples]
    assert len(samples) == 80 and clusters[:5] == ["q0"] * 4 + ["q1"]
    # each question is all right or all wrong: 80 replies carry only 20 questions' information
    correct = [i % 2 == 0 for i in range(20) for _ in range(4)]
    est = pass_at_k.pass_at_1(correct, clusters)
    naive = pass_at_k.pass_at_1(correct, [str(i) for i in range(80)])
    assert est.value == naive.value == 50.0
    assert (est.hi - est.lo) > 1.6 * (naive.hi - naive.lo)  # about twice as wide, as sqrt(4) says
    diff = pass_at_k.paired_pass_at_1(correct, [True] * 80, clusters)
    assert diff.value == 50.0 and diff.lo < 50.0 < diff.hi
    with pytest.raises(UserError, match="at least 1"):
        pass_at_k.replicate(samples, 0)


# ---------------------------------------------------------------- published figures


def test_published_figures_for_known_references(tmp_path):
    assert published.identify("Skywork/Skywork-R1V-38B", None) == "Skywork-R1V-38B"
    assert published.identify("Skywork/Skywork-R1V3-38B", None) == "Skywork-R1V3-38B"
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Skywork/Skywork-R1V2-38B"}))
    assert published.identify(str(folder), folder) == "Skywork-R1V2-38B"
    assert published.identify("tiny", None) is None and published.lookup(None, "math-500") is None
    found = published.lookup("Skywork-R1V-38B", "math-500")
    assert (found.bf16, found.vendor_awq) == (94.0, 86.0) and "own harness" in found.to_dict()["source"]
    assert published.lookup("Skywork-R1V3-38B", "mathvista-testmini").vendor_awq == 70.5
    assert published.lookup("Skywork-R1V3-38B", "aime-2024").bf16 is None


def test_without_a_path_the_suite_comes_from_the_datasets_cache_or_hub(monkeypatch):
    import datasets

    from r1v_quant.calib import hub

    asked = []

    def load(path, name, split, online=None):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(MATH500)

    monkeypatch.setattr(hub, "load_hub_dataset", load)
    samples = load_vendor_suite("math-500", n=2, seed=1)
    assert asked == [("HuggingFaceH4/MATH-500", None, "test")]
    assert len(samples) == 2 and {s.id for s in samples} <= {r["unique_id"] for r in MATH500}


def test_eval_results_with_k_samples_use_the_cluster_intervals():
    from r1v_quant.evals import run as evrun
    from r1v_quant.evals.stats import accuracy_interval

    k, questions = 3, [Sample(id=f"q{i}", prompt="p", answer=str(i), kind="math") for i in range(8)]
    suite = evrun.Suite("math-500", "math-500", "qa", pass_at_k.replicate(questions, k), k)

    def items(right):
        return [evrun.ItemResult(s.id, evrun.Reply([1], f"</think>\\boxed{{{s.answer if right(i) else 'x'}}}", True))
                for i, s in enumerate(suite.samples)]

    ref_right = [i // k < 6 for i in range(24)]             # whole questions right or wrong
    cand_right = [i // k < 5 or i % k == 0 for i in range(24)]
    runs = {"ref": ("reference", items(lambda i: ref_right[i])), "cand": ("candidate", items(lambda i: cand_right[i]))}
    models, (comparison,) = evrun.qa_results(suite, runs, None)
    clusters = [i // k for i in range(24)]
    ref = pass_at_k.pass_at_1(ref_right, clusters)
    assert (models[0].accuracy, models[0].accuracy_lo, models[0].accuracy_hi) == tuple(ref)
    assert models[0].accuracy_lo != accuracy_interval(ref_right).lo
    diff = pass_at_k.paired_pass_at_1(ref_right, cand_right, clusters)
    assert (comparison.diff, comparison.diff_lo, comparison.diff_hi) == tuple(diff)
    assert comparison.diff == pytest.approx(100 * (sum(cand_right) - sum(ref_right)) / 24)
