"""`r1v-quant eval` end to end on the vendor's suites, from tiny files in their public
schemas: registration, posing, pass@1 over k samples, the published figures beside the
measured ones, and a table that reads in 80 columns."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_vendor_suites import MATH500, gpqa_folder, mathvista_rows, write_jsonl
from typer.testing import CliRunner

GEN = 4  # new tokens per reply: exercises generation, cheap on a CPU


def _app():
    from r1v_quant.cli import eval as eval_cli
    from r1v_quant.cli import main as cli

    if not any(c.name == "eval" for c in cli.app.registered_commands):
        cli.app.command("eval")(eval_cli.command)
    return cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny

    sizes = TinySizes(llm_layers=2, vision_layers=1, max_dynamic_patch=1)
    return make_tiny(tmp_path_factory.mktemp("ref") / "tiny", seed=0, sizes=sizes)


@pytest.fixture(scope="module")
def vendor_named(tiny, tmp_path_factory):
    """The tiny checkpoint in a folder named like the vendor's model."""
    return shutil.copytree(tiny, tmp_path_factory.mktemp("named") / "Skywork-R1V-38B")


def run(args, columns=80):
    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(_app().app, ["eval", *args])
    return result.exit_code, result.output


def refused(args, capsys):
    """A run the CLI refuses as a user sees it: (exit status, everything printed)."""
    with pytest.raises(SystemExit) as stop:
        _app().main(["eval", *args])
    printed = capsys.readouterr()
    return stop.value.code, printed.out + printed.err


def test_math500_with_k_samples_and_the_published_figures(vendor_named, tiny, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", MATH500)
    out = tmp_path / "r.json"
    code, text = run(["--reference", str(vendor_named), "--candidate", str(tiny), "--suite", "math-500",
                      "--data-path", str(data), "--max-new-tokens", str(GEN), "--sample", "--samples-per-question",
                      "2", "--no-cache", "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert code == 0, text
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "math-500: tiny vs Skywork-R1V-38B" in text
    flat = " ".join(text.split())  # lines wrap at 80 columns
    assert "bf16 94.0, vendor AWQ 86.0" in flat and "own harness" in flat
    report = json.loads(out.read_text())
    assert report["suite"] == "math-500" and report["settings"]["samples_per_question"] == 2
    assert report["settings"]["published"]["bf16"] == 94.0
    assert [m["n"] for m in report["models"]] == [6, 6]  # 3 questions, 2 replies each
    assert "vendor AWQ 86.0" in (tmp_path / "r.md").read_text()
    # both scores of a math suite, and how it was posed, read and scored by the vendor
    assert all(m["fallback_accuracy"] is not None and m["fallback_lo"] <= m["fallback_hi"] for m in report["models"])
    note = report["settings"]["suite_note"]
    assert "Please reason step by step" in note["prompt"] and "last \\boxed{}" in note["extraction"]
    assert "fallback" in note["extraction"] and "no scoring code" in note["vendor"]
    assert "With the fallback of lighteval and open-r1" in flat and "Prompt: the problem, then" in flat
    assert "Vendor's scoring: the vendor published no scoring code" in flat


def test_mathvista_with_pictures_runs_and_the_twin_agrees_exactly(tiny, tmp_path):
    path = tmp_path / "testmini-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(mathvista_rows()), path)
    twin = shutil.copytree(tiny, tmp_path / "tiny-copy")
    out = tmp_path / "r.json"
    code, text = run(["--reference", str(tiny), "--candidate", str(twin), "--suite", "mathvista",
                      "--data-path", str(path), "--max-new-tokens", str(GEN), "--no-cache", "--json", str(out)])
    assert code == 0, text
    assert "mathvista-testmini: tiny-copy vs tiny" in text and "published" not in text
    report = json.loads(out.read_text())
    (c,) = report["comparisons"]
    assert (c["mean_kl"], c["top1_agreement"], c["diff"]) == (0.0, 100.0, 0.0)
    assert report["models"][0]["n"] == 2
    assert set(report["models"][0]["per_subject"]) == {"geometry problem solving", "figure question answering"}


def test_k_samples_need_sampling_and_a_missing_suite_file_fails_first(tiny, tmp_path, capsys, monkeypatch):
    from r1v_quant.model import r1v

    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, text = refused(["--reference", str(tiny), "--candidate", str(tiny), "--suite", "aime-2024",
                      "--data-path", str(tmp_path / "missing.parquet"), "--samples-per-question", "4"], capsys)
    assert code == 2 and "--samples-per-question needs --sample" in text
    code, text = refused(["--reference", str(tiny), "--candidate", str(tiny), "--suite", "aime-2024",
                          "--data-path", str(tmp_path / "missing.parquet")], capsys)
    assert code == 2 and "does not exist" in text


@pytest.mark.slow
def test_gpqa_from_the_four_csv_folder_evaluates_the_198_diamond_questions(tiny, tmp_path):
    folder, diamond = gpqa_folder(tmp_path / "gpqa", diamond=198, main_extra=250, extended_extra=98)
    out = tmp_path / "r.json"
    code, text = run(["--reference", str(tiny), "--candidate", str(tiny), "--suite", "gpqa-diamond", "--data-path",
                      str(folder), "--max-new-tokens", "1", "--batch-size", "32", "--no-cache", "--json", str(out)])
    assert code == 0, text
    report = json.loads(out.read_text())
    assert [m["n"] for m in report["models"]] == [198, 198]
    assert [q["id"] for q in report["questions"]] == diamond
    assert "Answer the following multiple choice question" in report["settings"]["suite_note"]["prompt"]
    assert "simple-evals" in " ".join(text.split())


def test_an_mmmu_question_with_interleaved_pictures_is_one_prompt_for_both_engines(tiny):
    """The torch engine's ids against what vLLM is sent, with each `<image>` expanded as vLLM's
    processor for R1V does (the image's `<img><IMG_CONTEXT>...</img>` block in place of the marker)."""
    from types import SimpleNamespace

    from test_calib_mmmu import png

    from r1v_quant.calib.mmmu import mmmu_sample
    from r1v_quant.evals.forcing import encode
    from r1v_quant.evals.vllm_pass import prompt_request
    from r1v_quant.model.config import load_config
    from r1v_quant.model.generate import encode_prompt
    from r1v_quant.model.prompt import IMAGE_PLACEHOLDER, image_block
    from r1v_quant.model.r1v import load_tokenizer

    row = {"id": "validation_Physics_9", "answer": "B", "question_type": "multiple-choice",
           "question": "Compare <image 2> with <image 1>: which ball is faster?",
           "options": "['<image 1>', '<image 2>', 'The same']",
           "image_1": png((255, 0, 0), (60, 30)), "image_2": png((0, 0, 255), (30, 90)), "image_3": png((0, 255, 0))}
    sample = mmmu_sample(row)
    assert sample.prompt == ("<image>\n<image>\n<image>\n<image>\nQuestion: Compare \n with \n: which ball is faster?"
                             "\nOptions:\nA. \n\nB. \n\nC. The same\nPlease select the correct answer from the options above. \n")
    assert [im.getpixel((0, 0)) for im in sample.images] == [(0, 0, 255), (255, 0, 0), (255, 0, 0), (0, 0, 255)]

    tok, cfg = load_tokenizer(tiny), load_config(tiny)
    torch_ids = encode(SimpleNamespace(tokenizer=tok, config=cfg), sample, 0).ids[0].tolist()
    _, _, tiles = encode_prompt(cfg, tok, sample.prompt, sample.images)
    request = prompt_request(tok, sample, 0)
    assert request["multi_modal_data"]["image"] == sample.images
    marker = tok(IMAGE_PLACEHOLDER, add_special_tokens=False).input_ids
    sent, expanded, i = request["prompt_token_ids"], [], 0
    blocks = iter(tiles)
    while i < len(sent):
        if sent[i:i + len(marker)] == marker:
            expanded += tok(image_block(next(blocks), cfg.num_image_token), add_special_tokens=False).input_ids
            i += len(marker)
        else:
            expanded.append(sent[i])
            i += 1
    assert next(blocks, None) is None and expanded == torch_ids
