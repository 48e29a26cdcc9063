"""What `awq` may delete: never a user's file. The real command runs against folders holding the user's
files and a git repository: --work-dir naming them, --force onto an earlier export made into a git
repository, and --resume after the source changed in place."""

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from helpers.rewrite import flip_tail

AWQ = ["awq", "--samples", "2", "--max-tokens", "512", "--grid", "4", "--no-kl-check", "--compute-dtype", "float32"]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), "-c", "user.name=u", "-c", "user.email=u@example.org", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout


def user_repo(folder: Path) -> Path:
    """A folder of the user's: notes, a plot folder and a git repository with one commit."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "important.txt").write_text("do not lose me\n")
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"\x89PNG fake")
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "v1")
    return folder


def one_line(err: str) -> str:
    return " ".join(err.split())


def test_a_work_dir_holding_user_files_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    mine = user_repo(tmp_path / "userwork")
    before = listing(mine)
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", tmp_path / "out1", "--work-dir", mine], capsys)
    err = one_line(err)
    assert code == 2 and "not an r1v-quant work folder" in err and "important.txt" in err, err
    assert "Traceback" not in err and listing(mine) == before
    assert not (tmp_path / "out1").exists()


def test_a_work_dir_that_is_or_holds_the_source_or_the_export_is_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    home = user_repo(tmp_path / "home")
    shutil.copytree(tiny_dir, home / "src")
    before = listing(home)
    monkeypatch.chdir(home)
    for work, says in (("src", "is the source checkpoint"), (".", "holds the export folder"),
                       ("src/..", "holds the export folder")):
        code, _, err = run_cli(AWQ + ["--model", "src", "--out", "out1", "--work-dir", work], capsys)
        assert code == 2 and says in one_line(err), (work, err)
        assert listing(home) == before, work
    # the output outside the folder: `--work-dir .` still holds the source
    code, _, err = run_cli(AWQ + ["--model", "src", "--out", tmp_path / "elsewhere", "--work-dir", "."], capsys)
    assert code == 2 and "holds the source checkpoint" in one_line(err), err
    assert listing(home) == before and not (tmp_path / "elsewhere").exists()


def test_out_and_work_dir_the_same_folder_is_refused_up_front(tiny_dir, tmp_path, capsys, monkeypatch):
    from r1v_quant.quant import pipeline

    monkeypatch.setattr(pipeline, "run_awq", lambda *a, **k: pytest.fail("a layer ran"))
    x = tmp_path / "x"
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", x, "--work-dir", x], capsys)
    assert code == 2 and "is the export folder --out" in one_line(err) and "--force" not in err, err
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", x, "--work-dir", x / "w"], capsys)
    assert code == 2 and "lies inside the export folder" in one_line(err), err
    assert not x.exists()


def test_the_work_folder_removes_only_its_own_files(tmp_path):
    from r1v_quant.errors import UserError
    from r1v_quant.quant.workdir import WorkFolder, remove_work_folder

    work = WorkFolder(tmp_path / "w", "run")
    assert work.start(resume=False) == 0
    work.save_masks([])
    (work.path / "spill").mkdir()
    (work.path / "spill" / "in-000000.safetensors").write_bytes(b"x")
    (work.path / "notes.txt").write_text("dropped in by the user during the run")
    assert remove_work_folder(work.path) is False
    assert sorted(p.name for p in work.path.iterdir()) == [".r1v-quant-work", "notes.txt"]
    with pytest.raises(UserError, match="notes.txt"):
        WorkFolder(work.path, "run").start(resume=False)
    (work.path / "notes.txt").unlink()
    assert remove_work_folder(work.path) is True and not work.path.exists()


def test_staging_replaces_only_the_earlier_folders_own_files(tmp_path):
    """The quick form of the test below: the swap itself, on a git repository."""
    from r1v_quant.output import staged_dir

    prev = user_repo(tmp_path / "prev")
    (prev / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (prev / "config.json").write_text("old")
    git(prev, "add", "-A")
    git(prev, "commit", "-q", "-m", "export v1")
    users = {k: v for k, v in listing(prev).items() if not k.startswith(("model-", "config"))}
    kept = []
    with staged_dir(prev, force=True, owned=lambda name: name.startswith("model-"), kept=kept) as tmp:
        (tmp / "model-00001-of-00001.safetensors").write_bytes(b"new shard")
        (tmp / "config.json").write_text("new")
    after = listing(prev)
    assert {k: after.get(k) for k in users} == users
    assert sorted(kept) == [".git", "important.txt", "plots"]
    assert (prev / "config.json").read_text() == "new" and not (prev / "model-00001-of-00002.safetensors").exists()
    assert git(prev, "log", "--format=%s").split() == ["export", "v1", "v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


@pytest.mark.slow
def test_force_onto_an_earlier_export_keeps_the_users_git_history_and_files(tiny_dir, tiny_export, tmp_path, capsys):
    """An export made into a Hub repository: a re-export replaces the export's files and nothing else."""
    proj = user_repo(tmp_path / "proj")
    prev = proj / "prev"
    shutil.copytree(tiny_export, prev)
    git(prev, "init", "-q")
    git(prev, "add", "-A")
    git(prev, "commit", "-q", "-m", "export v1")
    (prev / "eval-results.json").write_text("{}\n")
    (prev / "plots").mkdir()
    (prev / "plots" / "acc.png").write_bytes(b"\x89PNG acc")
    old_model = (prev / "model-00001-of-00001.safetensors").read_bytes()
    users = {k: v for k, v in listing(prev).items() if k.startswith((".git/", "eval-results", "plots/"))}
    around = {k: v for k, v in listing(proj).items() if not k.startswith("prev/")}

    work = proj / "wk"
    code, out, err = run_cli(AWQ + ["--model", tiny_dir, "--out", prev, "--force", "--work-dir", work], capsys)
    assert code == 0, err
    after = listing(prev)
    assert {k: after.get(k) for k in users} == users  # every file of the repository and the user's, byte for byte
    assert (prev / "model-00001-of-00001.safetensors").read_bytes() != old_model  # the export itself was replaced
    assert git(prev, "log", "--format=%s").split("\n")[0] == "export v1"
    assert "model-00001-of-00001.safetensors" in git(prev, "status", "--porcelain")
    assert {k: v for k, v in listing(proj).items() if not k.startswith("prev/")} == around
    assert not work.exists() and ".git" in one_line(out)  # the work folder was the run's own; the kept files named
    assert not [p for p in proj.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def test_force_refuses_a_folder_where_the_export_writes_a_file(tiny_dir, tiny_export, tmp_path, capsys):
    prev = tmp_path / "prev"
    shutil.copytree(tiny_export, prev)
    (prev / "README.md").unlink()
    (prev / "README.md").mkdir()
    (prev / "README.md" / "draft.txt").write_text("my notes")
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", prev, "--force"], capsys)
    assert code == 2 and "holds a folder README.md" in one_line(err), err
    assert (prev / "README.md" / "draft.txt").read_text() == "my notes"


DIE_AT = """
import os, signal, sys
import r1v_quant.quant.workdir as wd
def crash(name):
    if name == "state-written":
        os.kill(os.getpid(), signal.SIGKILL)
wd._crash_point = crash
from r1v_quant.cli.main import main
main(sys.argv[1:])
"""


def test_resume_refuses_a_source_shard_rewritten_in_place(tiny_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    out, work = tmp_path / "out", tmp_path / "work"
    args = [*AWQ, "--model", str(src), "--out", str(out), "--work-dir", str(work)]
    done = subprocess.run([sys.executable, "-c", DIE_AT, *args], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    shard = src / "model-00002-of-00003.safetensors"
    flip_tail(shard)  # same size, same header: only the weights' bytes change
    code, _, err = run_cli(args + ["--resume"], capsys)
    err = one_line(err)
    assert code == 2 and "model-00002-of-00003.safetensors changed" in err and "--resume" in err, err
    assert not out.exists() and (work / "state.json").is_file()


def test_the_source_identity_follows_an_in_place_rewrite(tiny_dir, tmp_path):
    import os

    from r1v_quant.model.identity import changed_file, model_identity

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    before = model_identity(src)
    shard = src / "model-00001-of-00003.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[20] = ord(" ") if data[20] != ord(" ") else ord("\t")  # inside the JSON header: same size, new header
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    assert changed_file(before, model_identity(src)) == shard.name
