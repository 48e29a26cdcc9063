"""What `--force` may delete, and two runs on the same --out: refused at once, naming the holder."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_cli

from r1v_quant.errors import UserError
from r1v_quant.locks import FolderLock, lock_path

AWQ = ["awq", "--samples", "2", "--max-tokens", "512", "--grid", "4", "--no-kl-check"]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_out_dot_in_the_folder_holding_the_source_deletes_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_dir, home / "model")
    (home / "notes.txt").write_text("mine")
    before = listing(home)
    monkeypatch.chdir(home)
    code, _, err = run_cli(AWQ + ["--model", "model", "--out", ".", "--force"], capsys)
    assert code == 2 and "contains the source checkpoint" in " ".join(err.split()), err
    assert listing(home) == before


def test_force_never_deletes_the_calibration_data_or_another_runs_work(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    text = out / "calib.txt"
    text.write_text("One paragraph of calibration text.\n\nAnother one.")
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", out, "--force", "--calib", f"text:{text}"], capsys)
    assert code == 2 and "calibration data" in err and text.is_file(), err

    other = tmp_path / "out2"
    (other / ".x.awq-work").mkdir(parents=True)
    (other / ".x.awq-work" / "state.json").write_text("{}")
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", other, "--force"], capsys)
    assert code == 2 and "work folder" in err and (other / ".x.awq-work" / "state.json").is_file(), err


def test_force_replaces_only_an_export_or_an_empty_folder(tiny_dir, tiny_export, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"\xff\xd8")
    (mine / "b.jpg").write_bytes(b"\xff\xd8")
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", mine, "--force"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "not an r1v-quant export" in err and "a.jpg" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["a.jpg", "b.jpg"]

    from r1v_quant.replace_guard import check_replaceable

    earlier = tmp_path / "earlier"
    shutil.copytree(tiny_export, earlier)
    check_replaceable(earlier, {"source checkpoint": tiny_dir})  # an earlier export may go
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", {"source checkpoint": tiny_dir})


HOLDER = textwrap.dedent("""
    import sys, time
    from r1v_quant.locks import FolderLock
    lock = FolderLock(sys.argv[1], "export folder")
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_refuses_at_once_naming_the_holder_and_takes_over_a_dead_lock(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold(out)
    try:
        code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", out], capsys)
        err = " ".join(err.split())
        assert code == 2 and f"PID {holder.pid}" in err, err
        assert not out.exists() and not (tmp_path / ".out.awq-work").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).is_file()  # left behind by the killed holder
    with FolderLock(out, "export folder"):
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_the_work_folder_is_locked_on_its_own(tmp_path):
    work = tmp_path / "work"
    holder = hold(work)
    try:
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            with FolderLock(work, "work folder"):
                pass
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_real_runs_on_one_out(tiny_dir, tmp_path):
    """Seeds 0 and 1 at once on the same --out: one runs, the other refuses in one sentence, nothing mixes."""
    cmd = [sys.executable, "-m", "r1v_quant.cli.main", *AWQ, "--model", str(tiny_dir), "--out", str(tmp_path / "out")]
    first = subprocess.Popen(cmd + ["--seed", "0"], stderr=subprocess.PIPE, text=True)
    work = tmp_path / ".out.awq-work"
    while not lock_path(work).exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(cmd + ["--seed", "1"], stderr=subprocess.PIPE, text=True, timeout=120)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2 and f"PID {first.pid}" in " ".join(second.stderr.split()), second.stderr
    import json

    report = json.loads((tmp_path / "out" / "r1v_quant_report.json").read_text())
    assert report["calibration"]["seed"] == 0
