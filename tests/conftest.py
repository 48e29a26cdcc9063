"""Shared small checkpoints: built once per session, the way users build them."""

from __future__ import annotations

import pytest

from r1v_quant.synthetic.checkpoint import make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "r1v-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_dir, tmp_path_factory):
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint

    out = tmp_path_factory.mktemp("export") / "r1v-tiny-awq"
    settings = AWQSettings(group_size=128, grid=10)
    quantize_checkpoint(str(tiny_dir), out, settings, CalibrationRecipe("builtin", samples=8, seq_len=2048, max_tokens=6144),
                        device="cpu")
    return out


def run_cli(args, capsys=None):
    """Run `r1v-quant ARGS` in-process; returns (exit code, stdout, stderr)."""
    from r1v_quant.cli.main import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err
