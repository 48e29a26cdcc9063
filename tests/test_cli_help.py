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
