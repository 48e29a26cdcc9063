"""`r1v-quant eval` end to end on small checkpoints, offline: the table, the files, the
reference cache, --max-drop, the RTN baseline, text suites, and the KL arithmetic."""

import json
import os
import shutil
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

import r1v_quant.model.r1v as r1v
from helpers.rewrite import flip_tail
from r1v_quant.errors import UserError
from r1v_quant.evals import run as evrun
from r1v_quant.evals.metrics import token_kl
from r1v_quant.evals.run import EvalSettings, coarse_kl, evaluate, summarize

GEN = 6  # new tokens per reply: enough to exercise generation, cheap on a CPU


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the table's 12 columns, unwrapped


def _app():
    """The application, with `eval` registered where cli/main.py does not do it yet."""
    from r1v_quant.cli import eval as eval_cli
    from r1v_quant.cli import main as cli

    if not any(c.name == "eval" for c in cli.app.registered_commands):
        cli.app.command("eval")(eval_cli.command)
    return cli


def call(args, capsys):
    """The CLI as a user runs it: (exit status, everything printed)."""
    with pytest.raises(SystemExit) as stop:
        _app().main(args)
    printed = capsys.readouterr()
    return stop.value.code, printed.out + printed.err


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Two decoder layers, one vision layer and one tile per picture keep each question
    well under a second on a CPU; the salient channels that make AWQ matter stay."""
    from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny

    sizes = TinySizes(llm_layers=2, vision_layers=1, max_dynamic_patch=1)
    return make_tiny(tmp_path_factory.mktemp("ref") / "tiny", seed=0, sizes=sizes)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def twin(ref, tmp_path_factory):
    """A byte-identical copy of the reference under another name."""
    return _copy(ref, tmp_path_factory.mktemp("twin") / "tiny-copy")


@pytest.fixture(scope="module")
def no_think(ref, tmp_path_factory):
    """The reference with a chat template that closes the reasoning block itself (thinking
    off), so even an untrained model's short reply counts as its answer."""
    out = _copy(ref, tmp_path_factory.mktemp("nothink") / "tiny-nothink")
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    opened = "'<｜Assistant｜><think>\\n'"
    assert opened in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace(opened, "'<｜Assistant｜><think>\\n\\n</think>\\n\\n'")
    path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def damaged(no_think, tmp_path_factory):
    """``no_think`` with every quantised LLM linear rounded to 2 bits, saved as bf16 under
    the same names: a candidate that must fail any sensible accuracy gate."""
    from r1v_quant.model.layout import is_quant_linear
    from r1v_quant.quant.primitives import fake_quantize

    out = _copy(no_think, tmp_path_factory.mktemp("damaged") / "tiny-2bit")
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(".weight") and is_quant_linear(name.removesuffix(".weight")):
                tensors[name] = fake_quantize(t, 64, bits=2).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def awq_export(ref, tmp_path_factory):
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint

    out = tmp_path_factory.mktemp("awq") / "tiny-awq"
    settings = AWQSettings(grid=3, clip=False, duo=False)
    quantize_checkpoint(str(ref), out, settings, CalibrationRecipe("builtin", samples=4, seq_len=512, max_tokens=1024))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


# ---------------------------------------------------------------- the KL arithmetic


def _logits(seed, vocab=50, rows=6, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g) * 3
    return a, a + torch.randn(rows, vocab, generator=g) * noise


def test_coarse_kl_is_exact_when_k_covers_the_vocabulary():
    a, b = _logits(0)
    ref = summarize(torch.log_softmax(a, -1), torch.zeros(6, dtype=torch.long), k=50)
    assert torch.isneginf(ref.tail).all()
    assert torch.allclose(coarse_kl(ref, torch.log_softmax(b, -1)), token_kl(a, b), atol=1e-6)


def test_coarse_kl_is_a_lower_bound_and_exactly_zero_for_the_reference_itself():
    a, b = _logits(1)
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    ref = summarize(lp, torch.zeros(6, dtype=torch.long), k=8)
    coarse = coarse_kl(ref, lq)
    assert (coarse <= token_kl(a, b) + 1e-6).all() and (coarse > 0).all()
    assert torch.equal(coarse_kl(ref, lp), torch.zeros(6))


def test_batches_group_similar_lengths_and_cover_every_index():
    assert evrun.batches([30, 5, 31, 6, 50], 2) == [[1, 3], [0, 2], [4]]


def test_reference_cache_round_trip(tmp_path):
    cache = evrun.ReferenceCache.open(tmp_path, {"model": {"path": "/x/m"}, "format": 1})
    a, _ = _logits(2)
    dist = summarize(torch.log_softmax(a, -1), torch.arange(6), k=4)
    item = evrun.RefItem("q1", [1, 2, 3], evrun.Reply([7, 8, 2], "</think>B", True), True, dist)
    cache.save(0, item)
    back = cache.load(0, "q1")
    assert back.reply == item.reply and back.prompt_ids == [1, 2, 3] and back.think_opened
    for name in ("logp", "ids", "tail", "top1", "nll"):
        assert torch.equal(getattr(back.dist, name), getattr(dist, name))
    assert cache.load(0, "another question") is None  # never served for a different question
    assert cache.load(1, "q1") is None


def test_cache_key_follows_what_the_reference_outputs_depend_on():
    suite = evrun.load_suite(EvalSettings(limit=2))
    identity = {"path": "/m", "config": "c"}
    key = evrun.cache_key(identity, suite, EvalSettings(limit=2))
    assert key == evrun.cache_key(identity, suite, EvalSettings(limit=2, batch_size=4))
    assert key != evrun.cache_key(identity, suite, EvalSettings(limit=2, max_new_tokens=7))
    assert key != evrun.cache_key(identity, suite, EvalSettings(limit=2, greedy=False))
    assert key != evrun.cache_key({**identity, "config": "other"}, suite, EvalSettings(limit=2))


# ---------------------------------------------------------------- suites


def test_unknown_suite_is_one_clear_error():
    with pytest.raises(UserError, match="unknown suite 'nope'"):
        evrun.suite_loader("nope", None)


def test_builtin_suite_is_held_out_from_calibration():
    from r1v_quant.calib.sets import load_calibration

    suite = evrun.load_suite(EvalSettings(limit=4))
    assert suite.kind == "qa" and len(suite.samples) == 4
    assert not {s.id for s in load_calibration("builtin", n=16, seed=0)} & {s.id for s in suite.samples}


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def first_run(ref, twin, cache, tmp_path_factory):
    """One CLI run on the built-in suite, shared: (exit status, output, output folder)."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("report")
    result = CliRunner(env={"COLUMNS": "250"}).invoke(_app().app, [
        "eval", "--reference", str(ref), "--candidate", str(twin), "--suite", "builtin", "--limit", "3",
        "--max-new-tokens", str(GEN), "--cache-dir", str(cache), "--max-drop", "0",
        "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--plot", str(out / "r.png")])
    return result.exit_code, result.output, out


def test_eval_prints_the_table_and_writes_json_markdown_and_png(first_run):
    code, text, out = first_run
    assert code == 0, text
    assert "builtin: tiny-copy vs tiny" in text and "accuracy per subject" in text
    assert "greedy" in text and "0 cached, 3 new" in text and "within --max-drop 0" in text
    data = json.loads((out / "r.json").read_text())
    assert [m["role"] for m in data["models"]] == ["reference", "candidate"]
    assert all(m["n"] == 3 and m["runaway_share"] is not None for m in data["models"])
    (c,) = data["comparisons"]
    # the same weights give the same numbers: exactly no KL, full agreement
    assert (c["mean_kl"], c["top1_agreement"], c["diff"]) == (0.0, 100.0, 0.0)
    assert "| tiny-copy | candidate | 3 |" in (out / "r.md").read_text()
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"
    # every question: its id, the right answer, each model's answer and whether it was right
    questions = data["questions"]
    assert [q["id"] for q in questions] == [s.id for s in evrun.load_suite(EvalSettings(limit=3)).samples]
    for q in questions:
        assert q["gold"] and set(q["reference"]) == set(q["candidate"]) == {"answer", "correct"}
        assert q["candidate"] == q["reference"]  # the same weights answer alike
    assert sum(q["reference"]["correct"] for q in questions) == round(data["models"][0]["accuracy"] * 3 / 100)
    # the reports get the mode of any file the user creates
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE((out / n).stat().st_mode) for n in ("r.json", "r.md", "r.png")} == {0o666 & ~umask}


def test_second_run_reads_the_reference_from_the_cache(first_run, ref, twin, cache, monkeypatch):
    loads = []
    real = r1v.load_model
    monkeypatch.setattr(r1v, "load_model", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    again = evaluate(str(ref), str(twin), EvalSettings(limit=3, max_new_tokens=GEN, cache_dir=cache))
    assert (again.reference_reused, again.reference_generated) == (3, 0)
    assert loads == [str(twin)]  # only the candidate was loaded
    first = json.loads((first_run[2] / "r.json").read_text())
    assert again.results.to_dict()["models"] == first["models"]


def _open_questions(path, answers):
    rows = [{"id": f"validation_Math_{i}", "question": f"What is {i} plus {i + 3}?", "options": "[]",
             "answer": answer, "question_type": "open"} for i, answer in enumerate(answers)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_max_drop_fails_a_damaged_candidate(no_think, damaged, cache, tmp_path, capsys):
    """Gold answers are the reference's own, so it scores 100% and any damage is a drop."""
    from r1v_quant.evals.scoring import extract_answer

    # any placeholder but "?", which in MMMU's schema marks a hidden answer and is refused
    suite = _open_questions(tmp_path / "questions.parquet", ["unknown"] * 4)
    settings = EvalSettings(suite=str(suite), max_new_tokens=2, cache_dir=cache)
    probe = evaluate(str(no_think), str(damaged), settings)
    gold = [extract_answer(i.reply.text, "open", think_opened=i.think_opened) for i in probe.items["tiny-nothink"]]
    assert all(gold) and gold != [
        extract_answer(i.reply.text, "open", think_opened=i.think_opened) for i in probe.items["tiny-2bit"]]
    _open_questions(suite, gold)

    args = ["eval", "--reference", str(no_think), "--candidate", str(damaged), "--suite", str(suite),
            "--max-new-tokens", "2", "--cache-dir", str(cache)]
    code, text = call([*args, "--max-drop", "5"], capsys)
    assert code == 1, text
    assert "exceeds --max-drop 5" in text and "4 cached, 0 new" in text


@pytest.mark.slow
def test_rtn_baseline_is_no_closer_than_awq(ref, awq_export, cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, text = call(["eval", "--reference", str(ref), "--candidate", str(awq_export), "--baseline", "rtn",
                       "--limit", "2", "--max-new-tokens", str(GEN), "--cache-dir", str(cache), "--json", str(out)],
                      capsys)
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["baselines"] == ["RTN w4 g128"] and "RTN w4 g128" in text
    kl = {c["model"]: c["mean_kl"] for c in data["comparisons"]}
    assert kl["RTN w4 g128"] >= kl["tiny-awq"] > 0


def test_text_suite_reports_perplexity_and_warns_about_calibration_overlap(ref, tmp_path, cache, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i} is about weights, scales and groups of {8 * i} channels."
                                for i in range(6)))
    calibrated = _copy(ref, tmp_path / "calibrated")
    from r1v_quant.quant.recipe import CalibrationRecipe

    (calibrated / "r1v_quant_report.json").write_text(json.dumps(
        {"calibration": CalibrationRecipe(f"text:{text}", samples=3).to_json()}))
    out = tmp_path / "r.json"
    code, printed = call(["eval", "--reference", str(ref), "--candidate", str(calibrated), "--suite", f"text:{text}",
                          "--cache-dir", str(cache), "--json", str(out), "--markdown", str(tmp_path / "r.md")], capsys)
    assert code == 0, printed
    assert "perplexity" in printed and "3 of 6 eval questions were also calibration questions" in printed
    models = json.loads(out.read_text())["models"]
    assert models[0]["perplexity"] == models[1]["perplexity"] > 1 and models[0]["accuracy"] is None
    assert "| calibrated | candidate | 6 |" in (tmp_path / "r.md").read_text()


def test_quick_kl_for_the_model_card_caches_nothing(ref, twin, tmp_path, monkeypatch):
    from r1v_quant.evals.quick import quick_kl

    monkeypatch.setenv("R1V_QUANT_CACHE", str(tmp_path / "env-cache"))
    entries = quick_kl(ref, twin, n=1, max_new_tokens=4)
    assert entries["KL(source ‖ export), nats per token"] == "0.0000"
    assert entries["top-1 token agreement"] == "100.0%"
    # the card names the definition eval uses, and its own questions and positions
    assert "1 built-in eval questions" in entries["KL measured on"]
    assert "top-64 coarse-grained KL(reference ‖ model)" in entries["KL measured on"]
    assert "`r1v-quant eval`'s KL, which by default measures the first 1024 reply tokens" in entries["KL measured on"]
    assert all(isinstance(v, str) for v in entries.values())
    assert not (tmp_path / "env-cache").exists()


def test_nf4_without_bitsandbytes_says_how_to_install(ref, twin, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    code, text = call(["eval", "--reference", str(ref), "--candidate", str(twin), "--baseline", "nf4"], capsys)
    assert code == 2 and "pip install 'r1v-quant[nf4]'" in text


def test_bad_options_fail_before_any_work(ref, twin, capsys, monkeypatch):
    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match="--baseline gptq"):
        evaluate(str(ref), str(twin), EvalSettings(limit=1), ["gptq"])
    code, text = call(["eval", "--reference", str(ref), "--candidate", str(twin), "--suite", "text:x.txt",
                       "--max-drop", "1"], capsys)
    assert code == 2 and "--max-drop needs a suite with answers" in text


# ---------------------------------------------------------------- cache integrity


def test_a_reference_entry_that_fails_its_digest_is_not_used(tmp_path):
    from safetensors import safe_open

    cache = evrun.ReferenceCache.open(tmp_path, {"model": {"path": "/x/m"}, "format": 2})
    a, _ = _logits(3)
    dist = summarize(torch.log_softmax(a, -1), torch.arange(6), k=4)
    for i in range(2):
        cache.save(i, evrun.RefItem(f"q{i}", [1, 2, 3], evrun.Reply([7, 8, 2], "</think>B", True), True, dist))
    flip_tail(cache.path(0))  # changed log-probabilities
    with safe_open(str(cache.path(1)), framework="pt") as f:  # scrambled reply ids under an intact header
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["reply_ids"] = torch.tensor([90000, 8, 2])
    save_file(tensors, str(cache.path(1)), metadata=meta)
    assert cache.load(0, "q0") is None and cache.load(1, "q1") is None
    assert cache.damaged == ["00000.safetensors", "00001.safetensors"]


def test_the_reference_cache_key_follows_a_shard_rewritten_in_place(ref, tmp_path):
    from r1v_quant.model.identity import model_identity

    own = _copy(ref, tmp_path / "tiny")
    suite = evrun.load_suite(EvalSettings(limit=2))
    before = evrun.cache_key(model_identity(own), suite, EvalSettings(limit=2))
    flip_tail(sorted(own.glob("*.safetensors"))[0])
    assert evrun.cache_key(model_identity(own), suite, EvalSettings(limit=2)) != before


@pytest.mark.slow
def test_eval_recomputes_a_damaged_entry_and_a_rewritten_reference(ref, tmp_path):
    own = _copy(ref, tmp_path / "tiny")
    settings = EvalSettings(limit=2, max_new_tokens=GEN, cache_dir=tmp_path / "cache")
    first = evaluate(str(own), str(own), settings)
    assert (first.reference_reused, first.reference_generated) == (0, 2)
    flip_tail(first.cache_dir / "00000.safetensors")
    heard = []
    second = evaluate(str(own), str(own), settings, on_warning=heard.append)
    assert (second.reference_reused, second.reference_generated) == (1, 1)
    assert any("failed their checksum" in w and "00000.safetensors" in w for w in heard), heard
    assert second.results.to_dict()["models"] == first.results.to_dict()["models"]
    flip_tail(sorted(own.glob("*.safetensors"))[0])
    third = evaluate(str(own), str(own), settings)
    assert (third.reference_reused, third.reference_generated) == (0, 2) and third.cache_dir != first.cache_dir
