"""A golden export: the sha256 of every file `awq` writes for `make-tiny` (seed 0) at fixed small settings.

The rule: bytes are pinned only where the arithmetic is exact on every x86 CPU of a kernel family. The
report's per-layer errors are float sums whose last bits differ between CPUs (MKL takes other paths on
AMD than on Intel), so the report is compared by its structure (every key, string and integer, pinned
by digest) and its floats within a relative 1e-4, far below what any change of the export moves them.

It pins the export byte for byte, so a restructuring of the code that should change nothing is shown to
change nothing. The numeric files depend on the CPU's matmul kernels (AVX-512 and AVX2 builds reduce in
another order), so their digests are kept per kernel family; the other files are the same everywhere.

To record the digests for a new kernel family, or after a change that is meant to alter the export
(say which in the commit): `python tests/test_golden_export.py` prints the table to paste below.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

ARGS = ["--samples", "2", "--seq-len", "384", "--max-tokens", "768", "--grid", "5", "--no-kl-check", "--device", "cpu",
        "--compute-dtype", "float32"]

SAME_EVERYWHERE = {
    "config.json": "9d6b3b6677071fa72c6a",
    "configuration_skywork_chat.py": "9d1f3ab5d23afa3a3eb0",
    "configuration_skywork_vit.py": "d2fb56d5e1daba97fa5e",
    "generation_config.json": "be2a09d2ec65085b5ee2",
    "model.safetensors.index.json": "a97918be199d0d25373a",
    "preprocessor_config.json": "efa90772bca9eeeab548",
    "special_tokens_map.json": "1e35d955d10990602049",
    "tokenizer.json": "288128677f698cee704c",
    "tokenizer_config.json": "10bcd4fbfaae24fef56d",
    "README.md": "29381e3bb085fd334302",
}
REPORT = "r1v_quant_report.json"
REPORT_SHAPE = "19079f97cf1adb757707"
REPORT_FLOATS = [0.100226, 0.155182, 0.4, 0.4, 0.2, 0.0673899, 0.133409, 0.2, 0.4, 0.2, 0.0544013, 0.0824449, 0.4, 0.2,
                 0.2, 0.0520615, 0.0720867, 0.4, 0.2, 0.2]
BY_KERNELS = {
    "AVX512": {
        "model-00001-of-00001.safetensors": "c6d5e460a11bea09a8ad",
    },
    # Recorded on a Xeon with the dispatch forced down:
    # ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
    "AVX2": {
        "model-00001-of-00001.safetensors": "fc8792987e8aab6f6eaf",
    },
}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:20] for p in sorted(folder.iterdir())}


def report_parts(path: Path) -> tuple[str, list[float]]:
    """The report's structure with every float masked (as a digest), and its floats in order."""
    import json

    floats: list[float] = []

    def mask(x):
        if isinstance(x, float):
            floats.append(x)
            return "F"
        if isinstance(x, dict):
            return {k: mask(v) for k, v in x.items()}
        if isinstance(x, list):
            return [mask(v) for v in x]
        return x

    shape = mask(json.loads(path.read_text()))
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:20], floats


def export_tiny(workdir: Path) -> Path:
    """`r1v-quant make-tiny r1v-tiny` then `r1v-quant awq --model r1v-tiny ...`, from inside `workdir`."""
    import os

    from r1v_quant.cli.main import main

    old = os.getcwd()
    os.chdir(workdir)
    try:
        for argv in (["make-tiny", "r1v-tiny"], ["awq", "--model", "r1v-tiny", "--out", "r1v-tiny-awq", *ARGS]):
            try:
                main(argv)
            except SystemExit as e:
                assert not e.code, f"r1v-quant {' '.join(argv)} exited {e.code}"
    finally:
        os.chdir(old)
    return workdir / "r1v-tiny-awq"


def test_golden_export(tmp_path):
    import pytest

    out = export_tiny(tmp_path)
    got = digests(out)
    shape, floats = report_parts(out / REPORT)
    assert shape == REPORT_SHAPE
    assert floats == pytest.approx(REPORT_FLOATS, rel=1e-4)
    assert {k: got.get(k) for k in SAME_EVERYWHERE} == SAME_EVERYWHERE
    kernels = torch.backends.cpu.get_cpu_capability()
    expected = BY_KERNELS.get(kernels)
    assert expected is not None, (
        f"no golden digests recorded for {kernels} kernels; record them with `python {__file__}` "
        f"on the commit before a change, then compare after it: {({k: got[k] for k in BY_KERNELS['AVX512']})}")
    assert {k: got.get(k) for k in expected} == expected
    assert set(got) == set(SAME_EVERYWHERE) | set(expected) | {REPORT}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        got = digests(export_tiny(Path(d)))
    print(torch.backends.cpu.get_cpu_capability(), {k: v for k, v in got.items() if k not in SAME_EVERYWHERE})
    sys.exit(0)
