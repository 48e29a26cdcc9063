"""`--text-share`: the calibration set reaches the asked share of text tokens within the token cap,
the recipe records it (report, fingerprint, model card), and a share outside [0, 1] is one sentence."""

import json

import pytest
from conftest import run_cli

from r1v_quant.calib.builtin import builtin_samples
from r1v_quant.calib.encode import encode_samples
from r1v_quant.calib.text_share import MIN_FILL_TOKENS, encode_with_text_share, fill_source, text_tokens
from r1v_quant.errors import UserError
from r1v_quant.model.config import load_config
from r1v_quant.model.prompt import IMG_CONTEXT
from r1v_quant.model.r1v import load_tokenizer
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe, read_recipe

SEQ, CAP = 2048, 3072


@pytest.fixture(scope="module")
def tiny_codec(tiny_dir):
    return load_config(tiny_dir), load_tokenizer(tiny_dir)


def _encode(tiny_codec, spec_samples, share, spec="builtin", n=8, cap=CAP):
    cfg, tok = tiny_codec
    fill = fill_source(spec, 0, n, None, {s.id for s in spec_samples})
    return encode_with_text_share(spec_samples, fill, cfg, tok, SEQ, cap, share)


def _share(encoded, tok):
    total, text = text_tokens(encoded, tok.convert_tokens_to_ids(IMG_CONTEXT))
    return total, text / total


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_the_builtin_set_reaches_the_asked_text_share_within_the_cap(tiny_codec, share):
    cfg, tok = tiny_codec
    samples = builtin_samples(8, seed=0)
    before, _ = encode_samples(samples, cfg, tok, SEQ, CAP)
    assert _share(before, tok)[1] < 0.1  # the set as encoded is mostly image tokens
    encoded, _, note = _encode(tiny_codec, samples, share)
    total, reached = _share(encoded, tok)
    # At least the asked share, over by less than the shortest fill piece, and never over the cap.
    assert share <= reached < share + MIN_FILL_TOKENS / total and total <= CAP
    assert note.asked == share and note.reached == reached and note.fill_samples > 0
    fills = [e for e in encoded if e.sample_id.startswith("builtin-text-")]
    assert len(fills) == note.fill_samples and all(e.pixel_values is None for e in fills)
    assert sum(len(e.ids) for e in fills) == note.fill_tokens
    # The fill comes after the set's own items, so no question is calibrated on twice.
    assert min(int(e.sample_id.rsplit("-", 1)[1]) for e in fills) == 8
    assert f"{reached:.1%} (asked {share:.1%}; {note.fill_samples} text-only samples" in note.line()


def test_share_zero_keeps_the_tokens_exactly_as_encoded(tiny_codec):
    cfg, tok = tiny_codec
    samples = builtin_samples(8, seed=0)
    plain, plain_skipped = encode_samples(samples, cfg, tok, SEQ, CAP)
    encoded, skipped, note = _encode(tiny_codec, samples, 0.0)
    assert [e.ids for e in encoded] == [e.ids for e in plain] and skipped == plain_skipped
    assert note.fill_samples == 0 and "no floor asked" in note.line()


def test_share_one_is_text_only_up_to_the_cap(tiny_codec):
    encoded, _, note = _encode(tiny_codec, builtin_samples(4, seed=0), 1.0, n=4, cap=600)
    assert all(e.pixel_values is None for e in encoded) and note.reached == 1.0
    assert 600 - 16 < sum(len(e.ids) for e in encoded) <= 600


def test_a_mixture_fills_from_its_own_text_part_and_says_when_it_runs_out(tiny_codec, tmp_path):
    from r1v_quant.calib.sets import load_calibration

    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Paragraph {i} is about the scales of groups of {8 * i} channels." for i in range(6)))
    spec = f"builtin+text:{notes}"
    samples = load_calibration(spec, n=6, mix=[2, 1])  # 4 pictures, 2 of the 6 paragraphs
    encoded, _, note = _encode(tiny_codec, samples, 0.9, spec=spec, n=6)
    ids = [e.sample_id for e in encoded]
    assert len(ids) == len(set(ids)) and note.fill_samples == 4  # the 4 paragraphs not drawn, each once
    assert all(i.startswith("text:notes.txt:") for i in ids[-4:])
    assert note.reached < 0.9 and "not reached: the text to fill with ran out" in note.line()


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.3"])
def test_a_share_outside_zero_to_one_is_refused_when_the_recipe_is_built(bad):
    with pytest.raises(UserError, match=r"must be a number from 0 to 1"):
        CalibrationRecipe("builtin", text_share=bad)


def test_the_share_changes_the_fingerprint_and_is_saved_only_when_set():
    off, on = CalibrationRecipe("builtin"), CalibrationRecipe("builtin", text_share=0.25)
    assert off.fingerprint_data() != on.fingerprint_data()
    assert "text_share" not in off.to_json() and on.to_json()["text_share"] == 0.25
    assert CalibrationRecipe.from_json(json.loads(json.dumps(on.to_json()))) == on
    assert CalibrationRecipe.from_json(off.to_json()).text_share == 0.0  # a report from before the option
    assert on.display()["least text-token share"] == "25%" and "least text-token share" not in off.display()


@pytest.mark.slow
def test_awq_records_the_share_in_the_report_and_prints_what_it_reached(tiny_dir, tmp_path, capsys):
    from r1v_quant.quant.run import quantize_checkpoint

    recipe = CalibrationRecipe("builtin", samples=2, seq_len=384, max_tokens=768, text_share=0.5)
    out = tmp_path / "export"
    result = quantize_checkpoint(str(tiny_dir), out, AWQSettings(grid=2, clip=False), recipe, device="cpu")
    assert read_recipe(out) == recipe
    assert json.loads((out / "r1v_quant_report.json").read_text())["calibration"]["text_share"] == 0.5
    assert result.extra["calibration text share"].startswith("5")  # 50.x% reached
    assert "(asked 50.0%" in result.extra["calibration text share"]
    assert "least text-token share | 50%" in (out / "README.md").read_text()


def test_a_bad_share_on_the_command_line_is_one_sentence_and_exit_2(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(["awq", "--model", tiny_dir, "--out", tmp_path / "x", "--text-share", "1.5",
                            "--no-kl-check", "--device", "cpu"], capsys)
    assert code == 2 and not (tmp_path / "x").exists()
    assert err.strip() == ("error: --text-share 1.5 must be a number from 0 to 1 (the least share of text tokens "
                           "in the calibration set, e.g. 0.25).")
