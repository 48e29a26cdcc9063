import json

import pytest
from PIL import Image
from rich.console import Console

from r1v_quant.evals.report import (
    EvalResults,
    comparison,
    model_result,
    plot_per_subject,
    print_report,
    render_table,
    to_json,
    to_markdown,
)

SUBJECTS = ["Art", "Basic_Medical_Science", "Physics", "Math"] * 5  # 20 questions


@pytest.fixture
def results() -> EvalResults:
    ref = [True] * 15 + [False] * 5  # 75 %
    cand = [True] * 14 + [False] * 6  # 70 %
    vendor = [True] * 10 + [False] * 10  # 50 %
    ref_answers = ["A"] * 20
    cand_answers = ["A"] * 14 + ["B"] * 6
    models = [
        model_result("r1v-38b", "reference", ref, SUBJECTS, reasoning_lengths=[100, 200, 300], unfinished=[False] * 20),
        model_result("r1v-38b-awq", "candidate", cand, SUBJECTS, reasoning_lengths=[120, 220], perplexity=5.4321,
                     unfinished=[True] + [False] * 19),
        model_result("vendor-awq", "baseline", vendor, SUBJECTS),
    ]
    comparisons = [
        comparison("r1v-38b-awq", ref, cand, ref_answers=ref_answers, cand_answers=cand_answers,
                   mean_kl=0.01234, top1_agreement=0.987),
        comparison("vendor-awq", ref, vendor),
    ]
    return EvalResults(
        suite="mmmu-val", reference="r1v-38b", candidate="r1v-38b-awq", baselines=["vendor-awq"],
        models=models, comparisons=comparisons, settings={"temperature": 0.6, "seed": 0},
    )


def test_model_result_summaries(results):
    cand = results.model("r1v-38b-awq")
    assert (cand.n, cand.accuracy) == (20, 70.0)
    assert cand.accuracy_lo < 70.0 < cand.accuracy_hi
    assert cand.reasoning_tokens_mean == 170.0 and cand.reasoning_tokens_median == 170.0
    assert cand.runaway_share == 5.0
    # Questions 0..13 right; subjects cycle every 4, so Art holds questions 0,4,8,12,16.
    assert cand.per_subject["Art"] == 80.0
    assert results.model("vendor-awq").runaway_share is None


def test_comparison_numbers(results):
    c = results.comparison("r1v-38b-awq")
    assert c.diff == pytest.approx(-5.0)
    assert c.diff_lo <= -5.0 <= c.diff_hi
    assert c.mcnemar_p == 1.0  # one discordant question
    assert c.answer_agreement == 70.0
    assert c.top1_agreement == pytest.approx(98.7)
    assert results.comparison("vendor-awq").answer_agreement is None


def test_markdown_contains_the_numbers(results):
    md = to_markdown(results)
    assert "## mmmu-val: r1v-38b-awq vs r1v-38b" in md
    assert "75.0 [" in md and "70.0 [" in md and "50.0 [" in md
    assert "-5.0 [" in md and "-25.0 [" in md
    assert "0.01234" in md and "98.7%" in md and "5.432" in md and "70.0%" in md
    assert "5.0%" in md  # runaway share
    assert "| Basic_Medical_Science |" in md and "80.0" in md
    header, rule = md.splitlines()[2:4]
    assert header.count("|") == rule.count("|")


def test_json_round_trip(results, tmp_path):
    (tmp_path / "out").mkdir()  # report paths are checked before the work: the folder exists by then
    path = to_json(results, tmp_path / "out" / "report.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["models"][1]["accuracy"] == 70.0
    assert data == results.to_dict()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_rich_table(results):
    table = render_table(results)
    assert table.row_count == 3
    console = Console(record=True, width=250)
    print_report(results, console)
    text = console.export_text()
    assert "r1v-38b-awq" in text and "-5.0" in text and "Physics" in text


def test_png_is_written_and_valid(results, tmp_path):
    path = plot_per_subject(results, tmp_path / "subjects.png")
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 200
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    # one bar colour per model
    assert {(0x00, 0x72, 0xB2), (0xD5, 0x5E, 0x00), (0x00, 0x9E, 0x73)} <= colours


def _printed(results, width, **kwargs):
    console = Console(record=True, width=width)
    print_report(results, console, **kwargs)
    return console.export_text()


def test_default_table_fits_80_columns_with_every_header_whole(results):
    text = _printed(results, 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    header = next(line for line in lines if "model" in line and "agree" in line)
    for name in ("model", "n", "acc % [95% CI]", "Δ [CI]", "KL", "agree"):
        assert name in header
    row = next(line for line in lines if line.strip().startswith("r1v-38b-awq"))
    assert "70.0 [" in row and "-5.0 [" in row and "0.01234" in row and "70.0%" in row
    assert "McNemar" not in text and "runaway" not in text


def test_wide_table_shows_every_column_and_files_keep_every_field(results):
    text = _printed(results, 250, wide=True)
    for name in ("role", "McNemar p", "same answer", "top-1 agree", "perplexity", "reasoning tokens", "runaway"):
        assert name in text
    assert "98.7%" in text and "5.432" in text
    md = to_markdown(results)
    assert "McNemar p" in md and "runaway" in md and "98.7%" in md


def test_published_figures_print_beside_the_measured_ones(results):
    results.settings["published"] = {"model": "Skywork-R1V-38B", "suite": "mmmu-val", "bf16": 69.0,
                                     "vendor_awq": 60.1, "source": "published by the vendor, measured with its own harness"}
    text = _printed(results, 80)
    flat = " ".join(text.split())  # lines wrap at 80 columns
    assert "Skywork-R1V-38B on mmmu-val" in flat and "bf16 69.0, vendor AWQ 60.1" in flat
    assert "own harness" in flat and max(len(line) for line in text.splitlines()) <= 80
    assert "bf16 69.0, vendor AWQ 60.1" in to_markdown(results)
    results.settings["published"] = {**results.settings["published"], "bf16": None, "vendor_awq": None}
    assert "published no mmmu-val score" in " ".join(_printed(results, 80).split())
