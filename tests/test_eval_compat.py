"""`eval` refuses a candidate that cannot be a quantisation of the reference before generating anything,
and warns when the candidate's recipe names another source."""

import json
import shutil

import pytest

from r1v_quant.errors import UserError
from r1v_quant.evals.compat import check_candidate
from r1v_quant.evals.run import EvalSettings, evaluate
from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny


def _no_generation(*args):
    raise AssertionError(f"generation started: {args}")


def test_other_shapes_are_refused_before_generation(tiny_dir, tmp_path):
    two = make_tiny(tmp_path / "two-layers", seed=0, sizes=TinySizes(llm_layers=2))
    settings = EvalSettings(suite="builtin", limit=2, max_new_tokens=4, device="cpu", use_cache=False)
    with pytest.raises(UserError, match="num_hidden_layers 2, where the reference has 4"):
        evaluate(str(tiny_dir), str(two), settings, progress=_no_generation)


def test_another_tokenizer_is_refused_before_generation(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tok"
    shutil.copytree(tiny_dir, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra_token_for_test>"])
    tok.save_pretrained(str(other))
    settings = EvalSettings(suite="builtin", limit=2, max_new_tokens=4, device="cpu", use_cache=False)
    with pytest.raises(UserError, match="another tokenizer"):
        evaluate(str(tiny_dir), str(other), settings, progress=_no_generation)


def test_a_recipe_naming_another_source_warns(tiny_dir, tiny_export, tmp_path):
    assert check_candidate(tiny_dir, tiny_export, str(tiny_dir)) == []
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_export, moved)
    report = json.loads((moved / "r1v_quant_report.json").read_text())
    report["source"] = "OpenGVLab/InternVL2-1B"
    (moved / "r1v_quant_report.json").write_text(json.dumps(report))
    warnings = check_candidate(tiny_dir, moved, str(tiny_dir))
    assert len(warnings) == 1 and "OpenGVLab/InternVL2-1B" in warnings[0]
