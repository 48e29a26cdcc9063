"""Disk full, read-only, permission denied and --out below a file: one sentence naming the folder and
what it needs, no half-written export, finished layers kept for --resume.

The filesystems are real size-limited (or read-only) tmpfs mounts where the machine allows it (root);
elsewhere the same cases run on an injected error of the same kind, as each test says.
"""

import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import run_cli

AWQ = ["awq", "--samples", "2", "--max-tokens", "768", "--seq-len", "384", "--grid", "4", "--no-kl-check"]


def _mount(tmp_path: Path, size: int, readonly: bool = False) -> Path | None:
    folder = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
    return folder if done.returncode == 0 else None


@pytest.fixture
def small_fs(tmp_path):
    mounted = []

    def make(size: int, readonly: bool = False) -> Path | None:
        folder = _mount(tmp_path, size, readonly)
        if folder is not None:
            mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _needs(tiny_dir, out, work, offload=None):
    from r1v_quant.model.config import load_config
    from r1v_quant.quant.space import run_needs

    return {n.label: n.bytes for n in run_needs(load_config(tiny_dir), 128, out, work, offload, 0, 768, False)}


def test_the_up_front_check_counts_the_work_folder(tiny_dir, small_fs, capsys, monkeypatch, tmp_path):
    needs = _needs(tiny_dir, tmp_path / "o", tmp_path / "w")
    size = int(needs["export"] * 1.2)  # room for the export alone, not for the work folder beside it
    fs = small_fs(size)
    if fs is None:  # no mount allowed: pretend the disk has that much free
        fs = tmp_path / "disk"
        fs.mkdir()
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size))
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", fs / "out"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "work folder" in err and "free" in err, err
    assert list(fs.iterdir()) == []


def test_the_up_front_check_counts_the_offload_folder(tiny_dir, small_fs, capsys, tmp_path):
    needs = _needs(tiny_dir, tmp_path / "o", tmp_path / "w", tmp_path / "spill")
    fs = small_fs(needs["offloaded activations"] // 2)
    if fs is None:
        pytest.skip("mounting a small tmpfs is not allowed here")  # covered by the work-folder case's fallback
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", tmp_path / "out", "--offload-dir", fs / "spill",
                                  "--offload-above", "0"], capsys)
    assert code == 2 and "offloaded activations" in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_disk_full_during_the_run_keeps_finished_layers_for_resume(tiny_dir, small_fs, tmp_path, monkeypatch):
    """The disk fills up after layer 0: one sentence, no export, no partial file, layer 0 kept; after freeing
    space --resume finishes the export."""
    from r1v_quant.errors import UserError
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint

    settings = AWQSettings(grid=4)
    recipe = CalibrationRecipe("builtin", samples=2, seq_len=384, max_tokens=768)
    needs = _needs(tiny_dir, tmp_path / "o", tmp_path / "w")
    fs = small_fs(int(sum(needs.values()) * 1.3))
    injected = fs is None
    if injected:  # no mount allowed: the second layer's save fails as a full disk would make it
        fs = tmp_path / "disk"
        fs.mkdir()
    filler = fs / "filler.bin"

    def fill(i, total, report):
        if i == 0:
            if injected:
                from safetensors import SafetensorError

                import r1v_quant.quant.workdir as wd

                def full(*a, **k):
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                monkeypatch.setattr(wd, "save_file", full)
            else:
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                    except OSError as e:
                        assert e.errno == errno.ENOSPC

    out = fs / "out"
    with pytest.raises(UserError) as caught:
        quantize_checkpoint(str(tiny_dir), out, settings, recipe, device="cpu", progress=fill)
    text = str(caught.value)
    assert "disk is full" in text and "layers 0-0 are kept" in text and "--resume" in text, text
    work = fs / ".out.awq-work"
    assert json.loads((work / "state.json").read_text())["done"] == 0
    named = json.loads((work / "state.json").read_text())["files"]
    assert sorted(p.name for p in work.iterdir()) == sorted([*named, "state.json", ".r1v-quant-work"])
    assert not out.exists() and not [p for p in fs.iterdir() if ".partial-" in p.name]
    filler.unlink(missing_ok=True)
    monkeypatch.undo()
    quantize_checkpoint(str(tiny_dir), out, settings, recipe, device="cpu", resume=True)
    assert (out / "config.json").is_file() and not work.exists()


def test_read_only_filesystem_is_one_sentence(tiny_dir, small_fs, capsys, tmp_path, monkeypatch):
    fs = small_fs(1 << 20, readonly=True)
    if fs is None:  # no mount allowed: every write fails as on a read-only filesystem
        fs = tmp_path / "ro"
        fs.mkdir()
        import os

        real = os.open

        def ro(path, flags, *a, **k):
            if str(path).startswith(str(fs)) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, flags, *a, **k)
        monkeypatch.setattr(os, "open", ro)
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", fs / "out"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "read-only" in err and str(fs) in err and "Traceback" not in err, err


def test_permission_denied_is_one_sentence(tiny_dir, tmp_path, capsys, monkeypatch):
    """Root ignores mode bits, so permission is an injected PermissionError on the work folder's creation."""
    import r1v_quant.quant.workdir as wd

    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if self.name.endswith(".awq-work"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(wd.Path, "mkdir", denied)
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", tmp_path / "out"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "permission was denied" in err and "make it writable" in err, err
    assert not (tmp_path / "out").exists()


def test_out_below_a_regular_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", tmp_path / "afile" / "out"], capsys)
    assert code == 2 and "is a file, not a folder" in " ".join(err.split()), err
    assert (tmp_path / "afile").read_text() == "x"


def test_work_dir_below_a_regular_file_names_that_flag_and_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", tmp_path / "out", "--work-dir", tmp_path / "afile" / "w"],
                           capsys)
    err = " ".join(err.split())
    assert code == 2 and f"--work-dir {tmp_path / 'afile' / 'w'} lies below {tmp_path / 'afile'}, which is a file" in err, err
    assert (tmp_path / "afile").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_full_disk_at_the_start_leaves_no_empty_lock(tiny_dir, small_fs, tmp_path, capsys, monkeypatch):
    """The lock file's creation needs no data block, its PID does: a full disk must not keep the empty file."""
    import os

    fs = small_fs(64 * 1024)
    if fs is not None:
        with open(fs / "filler", "wb", buffering=0) as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
    else:  # no mount allowed: the PID's write fails as on a full disk
        fs = tmp_path / "disk"
        fs.mkdir()
        (fs / "filler").write_text("x")
        real = os.write

        def full(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)
        monkeypatch.setattr(os, "write", full)
    code, _, err = run_cli(AWQ + ["--model", tiny_dir, "--out", fs / "out"], capsys)
    err = " ".join(err.split())
    assert code == 2 and "the disk is full" in err, err
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]
