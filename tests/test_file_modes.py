"""Every file an export or `make-tiny` writes gets the mode the user's umask gives a new file (0644 under
umask 022, 0600 under 077), safetensors shards included: a vLLM container running as another user, or a
shared model folder, must be able to read what a 022 user exports, and a 077 user's files stay private."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

UMASKS = [0o022, 0o077]


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(Path(folder).iterdir())}


def current_umask() -> int:
    value = os.umask(0)
    os.umask(value)
    return value


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_shard_writer_files_get_the_umask_mode(tmp_path, mask):
    from r1v_quant.model.checkpoint import ShardWriter

    with umask(mask):
        writer = ShardWriter(tmp_path, max_shard_bytes=1024)
        for i in range(3):
            writer.add(f"t{i}", torch.zeros(200))
        writer.close()
    got = modes(tmp_path)
    assert len(got) == 4 and set(got.values()) == {0o666 & ~mask}, {k: oct(v) for k, v in got.items()}


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_make_tiny_files_get_the_umask_mode(tmp_path, mask):
    from conftest import run_cli

    with umask(mask):
        code, _, _ = run_cli(["make-tiny", tmp_path / "tiny", "--llm-layers", "1"])
    assert code == 0
    got = modes(tmp_path / "tiny")
    assert any(n.endswith(".safetensors") for n in got)
    assert set(got.values()) == {0o666 & ~mask}, {k: oct(v) for k, v in got.items()}
    assert stat.S_IMODE((tmp_path / "tiny").stat().st_mode) == 0o777 & ~mask


def test_the_shared_export_has_the_umask_mode(tiny_export):
    got = modes(tiny_export)
    assert set(got.values()) == {0o666 & ~current_umask()}, {k: oct(v) for k, v in got.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_every_export_file_gets_the_umask_mode(tiny_dir, tmp_path, mask):
    """The whole `awq` path at its smallest settings, under each umask."""
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "export"
    with umask(mask):
        quantize_checkpoint(str(tiny_dir), out, AWQSettings(grid=2, clip=False),
                            CalibrationRecipe(f"text:{text}", samples=1, seq_len=64, max_tokens=64, text_share=0),
                            device="cpu")
    got = modes(out)
    assert {"README.md", "config.json", "r1v_quant_report.json", "model.safetensors.index.json"} <= set(got)
    assert any(n.endswith(".safetensors") for n in got)
    assert set(got.values()) == {0o666 & ~mask}, {k: oct(v) for k, v in got.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
