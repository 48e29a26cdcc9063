"""`r1v-quant eval` end to end on small checkpoints, offline: the table, the files, the
reference cache, --max-drop, the RTN baseline, and the pieces the numbers rest on."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import r1v_quant.model.r1v as r1v
from r1v_quant.evals import run as evrun
from r1v_quant.evals.metrics import token_kl
from r1v_quant.evals.run import EvalSettings, RefDist, coarse_kl, evaluate, summarize

GEN = 6  # new tokens per reply: enough to exercise generation, cheap on a CPU


def call(args):
    """The CLI as a user runs it: (exit status, printed text)."""
    from typer.testing import CliRunner

    from r1v_quant.cli import eval as eval_cli
    from r1v_quant.cli.main import app

    if not any(c.name == "eval" for c in app.registered_commands):
        app.command("eval")(eval_cli.command)
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    return result.exit_code, result.output, result.exception


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    from r1v_quant.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ref") / "tiny", seed=0)


@pytest.fixture(scope="module")
def twin(ref, tmp_path_factory):
    """A byte-identical copy of the reference under another name."""
    out = tmp_path_factory.mktemp("twin") / "tiny-copy"
    shutil.copytree(ref, out)
    return out


@pytest.fixture(scope="module")
def damaged(ref, tmp_path_factory):
    """The reference with every quantised LLM linear rounded to 2 bits, saved as bf16 under
    the same names: a candidate that must fail any sensible accuracy gate."""
    from r1v_quant.layout import is_quant_linear
    from r1v_quant.quant.primitives import fake_quantize

    out = tmp_path_factory.mktemp("damaged") / "tiny-2bit"
    shutil.copytree(ref, out)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(".weight") and is_quant_linear(name.removesuffix(".weight")):
                tensors[name] = fake_quantize(t, 64, bits=2).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def awq_export(ref, tmp_path_factory):
    from r1v_quant.quant.pipeline import AWQSettings
    from r1v_quant.quant.run import CalibChoice, quantize_checkpoint

    out = tmp_path_factory.mktemp("awq") / "tiny-awq"
    quantize_checkpoint(str(ref), out, AWQSettings(samples=8, seq_len=512, max_tokens=4096), CalibChoice("builtin"))
    return out


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# ---------------------------------------------------------------- the KL arithmetic


def _logps(seed, vocab=50, rows=6, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g) * 3
    b = a + torch.randn(rows, vocab, generator=g) * noise
    return a, b


def test_coarse_kl_is_exact_when_k_covers_the_vocabulary():
    a, b = _logps(0)
    ref = summarize(torch.log_softmax(a, -1), torch.zeros(6, dtype=torch.long), k=50)
    assert torch.isneginf(ref.tail).all()
    assert torch.allclose(coarse_kl(ref, torch.log_softmax(b, -1)), token_kl(a, b), atol=1e-6)


def test_coarse_kl_is_a_lower_bound_and_zero_for_the_reference_itself():
    a, b = _logps(1)
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    ref = summarize(lp, torch.zeros(6, dtype=torch.long), k=8)
    coarse = coarse_kl(ref, lq)
    assert (coarse <= token_kl(a, b) + 1e-6).all() and (coarse > 0).all()
    assert torch.equal(coarse_kl(ref, lp), torch.zeros(6))


def test_batches_group_similar_lengths_and_cover_every_index():
    groups = evrun.batches([30, 5, 31, 6, 50], 2)
    assert groups == [[1, 3], [0, 2], [4]]


def test_reference_cache_round_trip(tmp_path):
    cache = evrun.ReferenceCache.open(tmp_path, {"model": {"path": "/x/m"}, "format": 1})
    a, _ = _logps(2)
    dist = summarize(torch.log_softmax(a, -1), torch.arange(6), k=4)
    item = evrun.RefItem("q1", [1, 2, 3], evrun.Reply([7, 8, 2], "</think>B", True), True, dist)
    cache.save(0, item)
    back = cache.load(0, "q1")
    assert back.reply == item.reply and back.prompt_ids == [1, 2, 3] and back.think_opened
    for f in ("logp", "ids", "tail", "top1", "nll"):
        assert torch.equal(getattr(back.dist, f), getattr(dist, f))
    assert cache.load(0, "another question") is None  # a different question is never served
    assert cache.load(1, "q1") is None


# ---------------------------------------------------------------- suites


def test_unknown_suite_is_one_clear_error():
    from r1v_quant.errors import UserError

    with pytest.raises(UserError, match="unknown suite 'nope'"):
        evrun.suite_loader("nope", None)


def test_builtin_suite_is_held_out_from_calibration():
    from r1v_quant.calib.sets import load_calibration

    suite = evrun.load_suite(EvalSettings(limit=4))
    calib = {s.id for s in load_calibration("builtin", n=16, seed=0)}
    assert suite.kind == "qa" and len(suite.samples) == 4
    assert not calib & {s.id for s in suite.samples}


# ---------------------------------------------------------------- end to end


def test_eval_prints_the_table_and_writes_json_and_markdown(ref, twin, cache, tmp_path):
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    code, text, exc = call(["eval", "--reference", str(ref), "--candidate", str(twin), "--suite", "builtin",
                            "--limit", "3", "--max-new-tokens", str(GEN), "--cache-dir", str(cache),
                            "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert code == 0, (text, exc)
    assert "builtin: tiny-copy vs tiny" in text and "accuracy per subject" in text and "greedy" in text
    data = json.loads(out_json.read_text())
    assert [m["role"] for m in data["models"]] == ["reference", "candidate"]
    (c,) = data["comparisons"]
    # the same weights give the same numbers: exactly no KL, full agreement
    assert c["mean_kl"] == 0.0 and c["top1_agreement"] == 100.0 and c["diff"] == 0.0
    assert data["models"][0]["runaway_share"] is not None
    assert "| tiny-copy | candidate | 3 |" in out_md.read_text()
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_second_run_reads_the_reference_from_the_cache(ref, twin, cache, monkeypatch):
    settings = EvalSettings(limit=2, max_new_tokens=GEN, cache_dir=cache)
    first = evaluate(str(ref), str(twin), settings)
    assert (first.reference_reused, first.reference_generated) == (0, 2)

    loads = []
    real = r1v.load_model
    monkeypatch.setattr(r1v, "load_model", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    second = evaluate(str(ref), str(twin), settings)
    assert (second.reference_reused, second.reference_generated) == (2, 0)
    assert loads == [str(twin)]  # only the candidate was loaded
    assert second.results.to_dict()["models"] == first.results.to_dict()["models"]

    changed = evaluate(str(ref), str(twin), EvalSettings(limit=2, max_new_tokens=GEN + 1, cache_dir=cache))
    assert changed.reference_generated == 2  # other settings, other cache entry


def test_no_cache_leaves_nothing_behind(ref, twin, tmp_path, monkeypatch):
    monkeypatch.setenv("R1V_QUANT_CACHE", str(tmp_path / "env-cache"))
    run = evaluate(str(ref), str(twin), EvalSettings(limit=1, max_new_tokens=GEN, use_cache=False))
    assert run.cache_dir is None and not (tmp_path / "env-cache").exists()


def test_max_drop_fails_a_damaged_candidate(ref, damaged, cache, tmp_path):
    suite = self_answer_suite(ref, tmp_path)
    args = ["eval", "--reference", str(ref), "--candidate", str(damaged), "--suite", str(suite),
            "--max-new-tokens", str(GEN), "--cache-dir", str(cache)]
    code, text, exc = call([*args, "--max-drop", "5"])
    assert code == 1, (text, exc)
    assert "exceeds --max-drop 5" in text
    code, text, exc = call([*args, "--max-drop", "100"])
    assert code == 0, (text, exc)


def test_rtn_baseline_is_no_closer_than_awq(ref, awq_export, cache):
    run = evaluate(str(ref), str(awq_export), EvalSettings(limit=2, max_new_tokens=GEN, cache_dir=cache), ["rtn"])
    awq = run.results.comparison(run.results.candidate)
    (rtn_name,) = run.results.baselines
    rtn = run.results.comparison(rtn_name)
    assert rtn_name == "RTN w4 g128"
    assert rtn.mean_kl >= awq.mean_kl > 0


def test_text_suite_reports_perplexity_and_overlap(ref, twin, tmp_path, cache):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i} about weights, scales and groups of {i * 8} channels." for i in range(6)))
    (twin / "r1v_quant_report.json").write_text(json.dumps(
        {"recipe": {"calibration set": f"text:{text}", "samples / tokens": "3 / 90", "seed": 0}}))
    try:
        code, out, exc = call(["eval", "--reference", str(ref), "--candidate", str(twin), "--suite", f"text:{text}",
                               "--limit", "6", "--cache-dir", str(cache)])
    finally:
        (twin / "r1v_quant_report.json").unlink()
    assert code == 0, (out, exc)
    assert "perplexity" in out and "3 of 6 eval questions were also calibration questions" in out


def test_nf4_without_bitsandbytes_says_how_to_install(ref, twin, cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    code, out, exc = call(["eval", "--reference", str(ref), "--candidate", str(twin), "--limit", "1",
                           "--max-new-tokens", "2", "--cache-dir", str(cache), "--baseline", "nf4"])
    assert "pip install 'r1v-quant[nf4]'" in str(exc)


def test_bad_options_fail_before_any_work(ref, twin):
    from r1v_quant.errors import UserError

    with pytest.raises(UserError, match="--baseline gptq"):
        evaluate(str(ref), str(twin), EvalSettings(limit=1), ["gptq"])
    code, _, exc = call(["eval", "--reference", str(ref), "--candidate", str(twin), "--suite", "text:x.txt",
                         "--max-drop", "1"])
    assert isinstance(exc, UserError) and "--max-drop needs a suite with answers" in str(exc)
