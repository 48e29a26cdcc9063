"""`awq` end to end on a small checkpoint: the export's format, accuracy, determinism, resume and bad inputs."""

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import Checkpoint
from r1v_quant.model.layout import is_quant_linear
from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
from r1v_quant.quant.run import quantize_checkpoint

SMALL = AWQSettings(grid=5)
SMALL_CALIB = CalibrationRecipe("builtin", samples=2, seq_len=384, max_tokens=768)


def independent_dequant(qweight, qzeros, scales, group):
    """AutoAWQ GEMM, from the format description: nibble i of column c is output 8c + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(packed):
        rows, cols = packed.shape
        out = torch.zeros(rows, cols * 8, dtype=torch.int64)
        p = packed.to(torch.int64) & 0xFFFFFFFF
        for i in range(8):
            out[:, [8 * c + order[i] for c in range(cols)]] = (p >> (4 * i)) & 0xF
        return out

    q = unpack(qweight)                       # [in, out]
    z = unpack(qzeros).repeat_interleave(group, 0)
    s = scales.float().repeat_interleave(group, 0)
    return ((q - z).float() * s).T            # [out, in]


def test_export_layout_and_untouched_tensors(tiny_dir, tiny_export):
    cfg = json.loads((tiny_export / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["vision_model", "mlp1"],
    }
    assert "quantization_config" not in cfg["llm_config"]
    src, out = Checkpoint(tiny_dir), Checkpoint(tiny_export)
    for name in src.names():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and is_quant_linear(module):
            assert name not in out.shard_of
            assert out.get(module + ".qweight").dtype == torch.int32 and out.get(module + ".scales").dtype == torch.float16
            continue
        if name.startswith(("vision_model.", "mlp1.", "language_model.model.embed_tokens.", "language_model.lm_head.")):
            a, b = src.get(name), out.get(name)
            assert a.dtype == b.dtype and a.view(torch.uint8).equal(b.view(torch.uint8)), name
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
              "configuration_skywork_chat.py", "README.md"):
        assert (tiny_export / f).is_file(), f
    card = (tiny_export / "README.md").read_text()
    assert "builtin" in card and "vllm serve" in card


def test_runtime_reads_the_export_as_the_format_says(tiny_export):
    from r1v_quant.int4.linear import AWQLinear
    from r1v_quant.model.r1v import load_model

    loaded = load_model(tiny_export, device="cpu", dtype="fp32")
    ckpt = Checkpoint(tiny_export)
    name = "language_model.model.layers.2.mlp.down_proj"
    module = loaded.model.get_submodule(name)
    assert isinstance(module, AWQLinear)
    ref = independent_dequant(ckpt.get(name + ".qweight"), ckpt.get(name + ".qzeros"), ckpt.get(name + ".scales"), 128)
    assert torch.equal(module.dequantized_weight(torch.float32), ref)
    x = torch.randn(3, module.in_features)
    assert torch.allclose(module(x), x @ ref.T, atol=1e-5)


@pytest.mark.slow
def test_export_is_closer_to_the_source_than_round_to_nearest(tiny_dir, tiny_export):
    """Held-out prompts of the calibration's kind (with images): AWQ's KL to the source beats round-to-nearest's.

    Text-only prompts are held to a bound only: this calibration is over 90% image tokens, and a
    text-heavy target is what `--calib A+text:PATH` mixtures and `--traces self` are for.
    """
    from r1v_quant.evals.quick import heldout_prompts, prompt_kl
    from r1v_quant.model.r1v import load_model
    from r1v_quant.quant.baselines import build_rtn

    src = load_model(tiny_dir, device="cpu")
    awq = load_model(tiny_export, device="cpu")
    rtn = build_rtn(tiny_dir, 128, "cpu", "bf16")
    with_images, text_only = heldout_prompts(src, 4)
    kl_awq, kl_rtn = prompt_kl(src.model, awq.model, with_images), prompt_kl(src.model, rtn.model, with_images)
    # 0.0306 measured since image stubs are no longer calibrated on (they were a few text tokens each)
    assert 0 < kl_awq < 0.035
    assert kl_awq < 0.5 * kl_rtn
    assert 0 < prompt_kl(src.model, awq.model, text_only) < 0.1


def test_chat_on_export(tiny_export, capsys):
    code, out, err = run_cli(["chat", "--model", tiny_export, "--prompt", "How many bars?", "--greedy",
                              "--max-new-tokens", "8"], capsys)
    assert code == 0, err and out.strip()


@pytest.mark.slow
def test_resume_gives_a_byte_identical_export(tiny_dir, tmp_path):
    full = tmp_path / "full"
    quantize_checkpoint(str(tiny_dir), full, SMALL, SMALL_CALIB, device="cpu")
    resumed, work = tmp_path / "resumed", tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(str(tiny_dir), resumed, SMALL, SMALL_CALIB, device="cpu",
                            work_dir=work, stop_after=1)
    assert not resumed.exists()
    assert json.loads((work / "state.json").read_text())["done"] == 1
    # The resumed half also spills every activation to disk: neither may change a byte.
    quantize_checkpoint(str(tiny_dir), resumed, SMALL, SMALL_CALIB, device="cpu", work_dir=work, resume=True,
                        offload_dir=tmp_path / "spill", offload_above=0)
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for n in names:
        assert (full / n).read_bytes() == (resumed / n).read_bytes(), n
    assert not work.exists()


def test_bad_inputs(tiny_dir, tmp_path, capsys, monkeypatch):
    base = ["awq", "--model", tiny_dir, "--samples", "2", "--max-tokens", "512", "--grid", "4", "--no-kl-check"]
    code, _, err = run_cli(base + ["--out", tmp_path / "g", "--group-size", "96"], capsys)
    assert code == 2 and "96" in err and not (tmp_path / "g").exists()

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(base + ["--out", tmp_path / "e", "--calib", f"text:{empty}"], capsys)
    assert code == 2 and "no" in err.lower() and not (tmp_path / "e").exists()

    code, _, err = run_cli(base + ["--out", Path(tiny_dir) / "awq"], capsys)
    assert code == 2 and "inside the source" in " ".join(err.split())

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, _, err = run_cli(base + ["--out", occupied], capsys)
    assert code == 2 and "--force" in err and (occupied / "keep.txt").read_text() == "mine"

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code, _, err = run_cli(base + ["--out", tmp_path / "full"], capsys)
    assert code == 2 and "free but this run writes" in err and not (tmp_path / "full").exists()
    monkeypatch.undo()

    # The disk fills up while shards are written: nothing half-written is left behind.
    import safetensors.torch

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    code, _, err = run_cli(base + ["--out", tmp_path / "nospace"], capsys)
    assert code == 2 and "full" in err
    assert not (tmp_path / "nospace").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nospace.partial")]


def test_already_quantized_source_is_refused(tiny_export, tmp_path):
    with pytest.raises(UserError, match="already quantised"):
        quantize_checkpoint(str(tiny_export), tmp_path / "x", SMALL, SMALL_CALIB, device="cpu")


def test_plan_predicts_the_export_bytes_exactly_and_inspect_passes(tiny_export):
    from safetensors import safe_open

    from r1v_quant.deploy.inspect_export import inspect
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.model.config import load_config

    real = 0
    for shard in tiny_export.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                real += n * {"BF16": 2, "F16": 2, "I32": 4, "F32": 4}[t.get_dtype()]
    plan = make_plan(load_config(tiny_export), source=str(tiny_export))
    assert sum(c.export_bytes for c in plan.components) == real
    report = inspect(tiny_export)
    assert report.ok, [c for c in report.checks if not c.ok]


def test_mmmu_without_data_says_how_to_provide_it(tiny_dir, tmp_path, capsys, monkeypatch):
    from r1v_quant.calib import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    code, _, err = run_cli(["awq", "--model", tiny_dir, "--calib", "mmmu-sample", "--out", tmp_path / "x",
                            "--no-kl-check"], capsys)
    assert code == 2 and "--calib-path" in err and not (tmp_path / "x").exists()


def test_activations_spill_to_disk_and_read_back(tmp_path):
    from r1v_quant.quant.activations import ActivationStore

    store = ActivationStore(tmp_path / "spill", threshold_bytes=1000)
    xs = [torch.randn(1, n, 16) for n in (5, 40, 50)]
    for x in xs:
        store.append(x)
    assert sum(isinstance(i, Path) for i in store.items) == 2  # all but the first exceed the RAM budget
    assert all(torch.equal(a, b) for a, b in zip(store, xs))
    store.clear()
    assert not list((tmp_path / "spill").iterdir())
