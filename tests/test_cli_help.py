"""`--help` reads cleanly: on/off flags carry no value placeholder, and vLLM's flags keep vLLM's names."""

import pytest
from conftest import run_cli

COMMANDS = ["awq", "eval", "chat", "plan", "inspect", "serve", "make-tiny"]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_no_bool_placeholder(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli([name, "--help"], capsys)
    assert code == 0
    assert "--help" in out and "<bool>" not in out


def test_plan_names_the_flags_as_vllm_does(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = run_cli(["plan", "--help"], capsys)
    assert "--kv-cache-dtype" in out and "--gpu-memory-utilization" in out and "--max-num-batched-tokens" in out
    assert "--kv-dtype " not in out
    code, _, err = run_cli(["plan", "--model", "r1v-38b", "--kv-dtype", "fp8"], capsys)
    assert code == 2 and "No such option" in err


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_is_whole_at_80_columns(name, capsys, monkeypatch):
    """No option name or word is cut ("--quantize-lm-h…"), and no line is wider than the terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli([name, "--help"] if name else ["--help"], capsys)
    assert code == 0
    assert "…" not in out and "..." not in out.replace("[ARGS]...", ""), out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    if name is None:
        assert all(c in out for c in COMMANDS)
        return
    from r1v_quant.cli.main import command

    cmd = command().commands[name]
    for param in cmd.params:
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if opt.startswith("--"):
                assert opt in out.split() or f"{opt}," in out or f"{opt} " in out, (name, opt)
