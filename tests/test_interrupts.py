"""Real SIGINT, SIGTERM and SIGKILL sent to a real `r1v-quant awq` process, and a process killed inside a
layer commit: the export is absent, the work folder resumable (or removed, saying so), and --resume
gives the bytes of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_cli

FLAGS = ["--samples", "2", "--max-tokens", "768", "--seq-len", "384", "--grid", "4"]


def awq_cmd(model, out, *extra):
    return [sys.executable, "-m", "r1v_quant.cli.main", "awq", "--model", str(model), "--out", str(out), *FLAGS, *extra]


def done_layers(work: Path) -> int:
    try:
        return json.loads((work / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref"
    code, _, _ = run_cli(["awq", "--model", tiny_dir, "--out", out, *FLAGS, "--no-kl-check"])
    assert code == 0
    return out


def same_export(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.slow
def test_sigint_says_after_which_layer_it_stopped_and_resume_continues(tiny_dir, tmp_path, reference):
    out, work = tmp_path / "out", tmp_path / ".out.awq-work"
    proc = subprocess.Popen(awq_cmd(tiny_dir, out, "--no-kl-check"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: done_layers(work) >= 0, proc), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = " ".join(err.split())
    assert proc.returncode == 130, err
    done = done_layers(work)
    assert "SIGINT" in err and f"layers 0-{done} are kept" in err and f"from layer {done + 1}" in err, err
    assert "--resume" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    code, _, _ = run_cli(["awq", "--model", tiny_dir, "--out", out, *FLAGS, "--no-kl-check", "--resume"])
    assert code == 0
    same_export(reference, out)


@pytest.mark.slow
def test_sigterm_during_the_kl_check_cleans_up(tiny_dir, tmp_path):
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(awq_cmd(tiny_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    # config.json lands in the staging folder right before the KL check starts.
    assert wait_for(lambda: any((p / "config.json").is_file() for p in tmp_path.glob(".out.partial-*")), proc), \
        proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = " ".join(err.split())
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "all 4 layers are kept" in err and "--resume" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*")) and list(scratch.iterdir()) == []
    code, _, _ = run_cli(["awq", "--model", tiny_dir, "--out", out, *FLAGS, "--no-kl-check", "--resume"])
    assert code == 0 and (out / "config.json").is_file()


@pytest.mark.slow
def test_sigint_before_any_layer_removes_the_work_folder_and_says_so(tiny_dir, tmp_path):
    out, work = tmp_path / "out", tmp_path / ".out.awq-work"
    proc = subprocess.Popen(awq_cmd(tiny_dir, out, "--no-kl-check"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (work / "state.json").is_file() and done_layers(work) == -1, proc), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = " ".join(err.split())
    if done_layers(work) >= 0:
        pytest.fail(f"layer 0 finished before the signal arrived: {err}")
    assert proc.returncode == 130 and "no layer had finished" in err and "removed" in err, err
    assert not work.exists() and not out.exists()


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tiny_dir, tmp_path, reference):
    out, work = tmp_path / "out", tmp_path / ".out.awq-work"
    proc = subprocess.Popen(awq_cmd(tiny_dir, out, "--no-kl-check"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: done_layers(work) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    code, _, _ = run_cli(["awq", "--model", tiny_dir, "--out", out, *FLAGS, "--no-kl-check", "--resume"])
    assert code == 0
    same_export(reference, out)


DIE_AT = textwrap.dedent("""
    import os, signal, sys
    import r1v_quant.quant.workdir as wd
    point, nth = sys.argv[1], int(sys.argv[2])
    seen = []
    def crash(name):
        if name == point:
            seen.append(name)
            if len(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    wd._crash_point = crash
    from r1v_quant.cli.main import main
    main(sys.argv[3:])
""")


# one commit point in the quick run; the other two with the slow tests
@pytest.mark.parametrize("point", [pytest.param("layer-files-written", marks=pytest.mark.slow),
                                   pytest.param("acts-written", marks=pytest.mark.slow), "state-written"])
def test_a_kill_inside_a_layer_commit_resumes_to_the_same_export(tiny_dir, tmp_path, reference, point):
    """The window of the old layout: the activations replaced, the state not yet updated."""
    out, work = tmp_path / "out", tmp_path / ".out.awq-work"
    args = ["awq", "--model", str(tiny_dir), "--out", str(out), *FLAGS, "--no-kl-check"]
    done = subprocess.run([sys.executable, "-c", DIE_AT, point, "2", *args], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done_layers(work) == (1 if point == "state-written" else 0)
    code, _, _ = run_cli(args + ["--resume"])
    assert code == 0
    same_export(reference, out)


def test_resume_refuses_a_work_file_that_changed(tiny_dir, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["awq", "--model", tiny_dir, "--out", out, *FLAGS, "--no-kl-check", "--work-dir", work]
    done = subprocess.run([sys.executable, "-c", DIE_AT, "state-written", "1", *map(str, args)], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    layer = work / "layer-0000.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 2 and "layer-0000.safetensors" in err and "checksum" in err, err
    assert not out.exists()
