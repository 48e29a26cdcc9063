"""The calibration recipe: validated when built, fingerprinted whole for --resume, read back by eval from JSON."""

import json

import pytest

from r1v_quant.errors import UserError
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe, read_recipe
from r1v_quant.quant.run import quantize_checkpoint

TINY_AWQ = AWQSettings(grid=2, clip=False)


def _paragraphs(path, tag, n):
    path.write_text("\n\n".join(f"{tag} paragraph {i} talks about scales and groups of {8 * i} channels."
                                for i in range(n)))
    return path


def test_a_library_caller_with_an_unknown_propagate_gets_one_sentence():
    # "quantised" once meant float propagation without a word.
    with pytest.raises(UserError, match="--propagate quantised is not one of quantized, float"):
        AWQSettings(propagate="quantised")
    assert AWQSettings(propagate="float").propagate == "float"


@pytest.mark.parametrize("kwargs, words", [
    (dict(traces="mine"), "--traces mine"),
    (dict(samples=0), "--samples 0"),
    (dict(spec="builtin+builtin", mix=(1.0,)), "1 weight(s) but the calibration set has 2"),
    (dict(spec="builtin+builtin", mix=(0.0, 0.0)), "positive sum"),
    (dict(spec="nonsense+"), "empty part"),
])
def test_recipe_is_checked_when_built(kwargs, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        CalibrationRecipe(**kwargs)


def test_recipe_round_trips_through_json():
    recipe = CalibrationRecipe("builtin+builtin", path="data", mix=[1, 3], traces="self", trace_tokens=64,
                               samples=5, seq_len=256, max_tokens=900, seed=7)
    assert CalibrationRecipe.from_json(json.loads(json.dumps(recipe.to_json()))) == recipe


def test_resume_refuses_a_work_folder_made_with_another_mix(tiny_dir, tmp_path):
    first = CalibrationRecipe("builtin+builtin", mix=(1.0, 3.0), samples=2, seq_len=384, max_tokens=768)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(str(tiny_dir), tmp_path / "a", TINY_AWQ, first, device="cpu", work_dir=work, stop_after=0)
    other = CalibrationRecipe("builtin+builtin", mix=(3.0, 1.0), samples=2, seq_len=384, max_tokens=768)
    with pytest.raises(UserError, match="holds a run with other settings"):
        quantize_checkpoint(str(tiny_dir), tmp_path / "a", TINY_AWQ, other, device="cpu", work_dir=work, resume=True)
    assert not (tmp_path / "a").exists()


def test_eval_overlap_check_recomputes_the_calibration_set_with_its_mix(tiny_dir, tmp_path):
    from r1v_quant.calib.text import load_text
    from r1v_quant.evals.run import Suite, calibration_overlap

    a = _paragraphs(tmp_path / "a.txt", "Alpha", 4)
    b = _paragraphs(tmp_path / "b.txt", "Beta", 4)
    # All four calibration samples come from b: none of a's paragraphs was calibrated on.
    recipe = CalibrationRecipe(f"text:{a}+text:{b}", mix=(0.0, 1.0), samples=4, seq_len=128, max_tokens=512)
    out = tmp_path / "export"
    quantize_checkpoint(str(tiny_dir), out, TINY_AWQ, recipe, device="cpu")
    assert read_recipe(out) == recipe
    saved = json.loads((out / "r1v_quant_report.json").read_text())
    assert saved["calibration"]["mix"] == [0.0, 1.0] and saved["awq"]["grid"] == 2

    on_a = Suite(f"text:{a}", "a", "text", load_text(str(a), n=4, seed=0))
    on_b = Suite(f"text:{b}", "b", "text", load_text(str(b), n=4, seed=0))
    assert calibration_overlap(out, on_a, None) is None
    assert "4 of 4 eval questions were also calibration questions" in calibration_overlap(out, on_b, None)


def test_eval_overlap_check_says_when_the_saved_recipe_is_unreadable(tmp_path):
    from r1v_quant.evals.run import Suite, calibration_overlap

    (tmp_path / "r1v_quant_report.json").write_text(json.dumps({"calibration": {"spec": "builtin", "samples": -1}}))
    warning = calibration_overlap(tmp_path, Suite("builtin", "b", "qa", []), None)
    assert "unreadable" in warning and "not checked" in warning
