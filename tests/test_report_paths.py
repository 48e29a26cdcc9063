"""Report paths (--json, --markdown, --plot) are checked before any work, reports are written whole, and a
report that cannot be written at the end is saved elsewhere in one sentence; `eval`'s gate and its
refusals of a candidate come before the reference pass."""

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from r1v_quant.errors import UserError
from r1v_quant.output import check_report_path, write_text_report


def one_line(err: str) -> str:
    return " ".join(err.split())


def forbid_work(monkeypatch) -> None:
    """Any model load or layer fails the test: the refusal must come first."""
    from r1v_quant.model import r1v
    from r1v_quant.quant import pipeline

    monkeypatch.setattr(r1v, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(pipeline, "run_awq", lambda *a, **k: pytest.fail("a layer ran"))


@pytest.fixture
def no_model(monkeypatch):
    forbid_work(monkeypatch)


def test_bad_report_paths_are_refused_before_the_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {afile / "x.json": "which is a file", tmp_path / "missing" / "r.json": "does not exist",
             tmp_path: "is a folder"}
    for path, says in cases.items():
        with pytest.raises(UserError, match=says):
            check_report_path(path, "--json")
    assert not (tmp_path / "missing").exists()
    check_report_path(tmp_path / "r.json", "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the write probe left nothing


def test_a_report_that_cannot_be_written_at_the_end_is_saved_elsewhere(tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    check_report_path(folder / "r.json", "--json")
    shutil.rmtree(folder)  # the folder went away during the run
    with pytest.raises(UserError) as caught:
        write_text_report(folder / "r.json", '{"kl": 0.1}\n', "--json")
    message = str(caught.value)
    assert "could not be written" in message and "saved to" in message and "\n" not in message
    spare = Path(message.rsplit("saved to ", 1)[1].removesuffix(" instead."))
    try:
        assert json.loads(spare.read_text()) == {"kl": 0.1}
    finally:
        spare.unlink()


def test_awq_refuses_a_json_path_in_a_missing_folder_before_any_work(tiny_dir, tmp_path, capsys, no_model):
    missing = tmp_path / "nonexistent" / "dir" / "r.json"
    code, _, err = run_cli(["awq", "--model", tiny_dir, "--out", tmp_path / "out", "--json", missing], capsys)
    assert code == 2 and "does not exist" in one_line(err), err
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "out").exists()


def test_plan_and_inspect_refuse_a_json_path_below_a_file(tiny_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (["plan", "--model", tiny_dir], ["inspect", tiny_dir]):
        code, _, err = run_cli([*args, "--json", afile / "r.json"], capsys)
        assert code == 2 and "which is a file" in one_line(err), (args, err)
    assert afile.read_text() == "x"


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_eval_max_drop_must_be_a_finite_number_of_points(tiny_dir, value, capsys, no_model):
    code, _, err = run_cli(["eval", "--reference", tiny_dir, "--candidate", tiny_dir, "--max-drop", value], capsys)
    assert code == 2 and "--max-drop" in err and "Traceback" not in err, err
    assert math.isnan(float(value)) or "0 or more" in one_line(err)


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_eval_refuses_a_report_path_below_a_file_before_the_reference_pass(tiny_dir, tmp_path, option, capsys,
                                                                           no_model):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_cli(["eval", "--reference", tiny_dir, "--candidate", tiny_dir, option, afile / "r"], capsys)
    assert code == 2 and option in err and "which is a file" in one_line(err), err


def test_eval_refuses_a_candidate_whose_group_size_disagrees_with_its_tensors(tiny_dir, tiny_export, tmp_path,
                                                                              capsys, monkeypatch):
    forbid_work(monkeypatch)  # after the shared export is built
    cand = tmp_path / "cand"
    shutil.copytree(tiny_export, cand)
    config = json.loads((cand / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == 128
    config["quantization_config"]["group_size"] = 64
    (cand / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["eval", "--reference", tiny_dir, "--candidate", cand, "--limit", "1"], capsys)
    err = one_line(err)
    assert code == 2 and "group size 64 does not match the weights" in err and "fits group size 128" in err, err
