"""`r1v-quant serve` and `chat --engine vllm`: the vllm argv, the user's flags winning, the checks
before launching, and vLLM's Python API driven through a stand-in module (no vLLM needed)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image
from test_inspect import build, quant_config, small_config
from typer.testing import CliRunner

from r1v_quant.deploy import serve as serve_mod
from r1v_quant.deploy.plan import make_plan
from r1v_quant.deploy.serve import build_serve, find_vllm
from r1v_quant.deploy.vllm_args import VLLM_MISSING, flag_name, images_from_limit, user_flags
from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import DATA_DIR, resolve_config
from r1v_quant.model.config import parse_config
from r1v_quant.model.generate import Sampling
from r1v_quant.units import GiB, human_int


def plan_len(cfg, gpu_bytes, **kw) -> int:
    return make_plan(cfg, gpu_mems=[("x", gpu_bytes)], **kw).cards[0].max_model_len


def value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, args
    return args[args.index(flag) + 1]


def r1v_38b():
    return resolve_config("r1v-38b")[0]


# ---------------------------------------------------------------------------------------------
# The argv


def test_small_config_argv_is_exact():
    cfg = parse_config(small_config())
    args = build_serve("/exports/tiny", cfg, 24 * GiB, ["--port", "8001"]).args
    n = plan_len(cfg, 24 * GiB)
    assert n == 4096        # the KV cache would hold more; capped at max_position_embeddings
    assert args == ["serve", "/exports/tiny", "--trust-remote-code", "--dtype", "bfloat16", "--max-model-len", str(n),
                    "--limit-mm-per-prompt", '{"image": 4}', "--gpu-memory-utilization", "0.9", "--port", "8001"]
    assert json.loads(value(args, "--limit-mm-per-prompt")) == {"image": 4}


@pytest.mark.parametrize("card_gib", [80, 48])
def test_38b_max_model_len_is_the_plans(card_gib):
    cfg = r1v_38b()
    cmd = build_serve("r1v-38b-awq", cfg, card_gib * GiB, images_per_prompt=2)
    expected = plan_len(cfg, card_gib * GiB)
    assert int(value(cmd.args, "--max-model-len")) == expected == cmd.max_model_len == cmd.card.max_model_len
    assert value(cmd.args, "--limit-mm-per-prompt") == '{"image": 2}'
    assert value(cmd.args, "--dtype") == "bfloat16" and "--trust-remote-code" in cmd.args
    if card_gib == 80:
        assert expected == 131072                  # max_position_embeddings
    else:
        assert 32768 <= expected < 131072 and expected % 16 == 0
        assert any("from the plan" in n for n in cmd.notes)


def test_text_only_plans_without_vision_activations():
    cfg = r1v_38b()
    with_images = build_serve("d", cfg, 48 * GiB).max_model_len
    text_only = build_serve("d", cfg, 48 * GiB, images_per_prompt=0)
    assert value(text_only.args, "--limit-mm-per-prompt") == '{"image": 0}'
    assert text_only.max_model_len == plan_len(cfg, 48 * GiB, images=False) > with_images


def test_util_changes_the_plan_and_the_flag():
    cfg = r1v_38b()
    cmd = build_serve("d", cfg, 48 * GiB, util=0.95)
    assert value(cmd.args, "--gpu-memory-utilization") == "0.95"
    assert cmd.max_model_len == plan_len(cfg, 48 * GiB, util=0.95) > plan_len(cfg, 48 * GiB)


def test_no_gpu_plans_for_the_48gb_default_and_says_so():
    cmd = build_serve("d", r1v_38b(), None)
    assert cmd.max_model_len == plan_len(r1v_38b(), 48 * GiB) == int(value(cmd.args, "--max-model-len"))
    assert any("no CUDA GPU found and no --gpu-mem given: planned for the plan's 48 GB default card" in n
               for n in cmd.notes)


def test_a_card_too_small_is_one_sentence_unless_the_user_sets_the_length():
    cfg = r1v_38b()
    # 16 GiB: even the vision encoder in host memory leaves 18.0 GiB of weights on the card
    with pytest.raises(UserError, match=r"does not fit the 16 GiB card .* even as .*vision encoder in host memory"):
        build_serve("d", cfg, 16 * GiB, gpu_label="16 GiB card")
    with pytest.raises(UserError, match=r"does not fit the 24 GiB card at --gpu-memory-utilization 0.9 even as as exported"):
        build_serve("d", cfg, 24 * GiB, gpu_label="24 GiB card", recipe=["none"])
    args = build_serve("d", cfg, 16 * GiB, ["--max-model-len", "2048", "--cpu-offload-gb", "10"]).args
    assert value(args, "--max-model-len") == "2048"


def test_cpu_offload_counts_toward_the_budget():
    cfg = r1v_38b()
    # The user's own --cpu-offload-gb (vLLM's GiB) replaces the tower offload: 24 GiB plus 16 GiB offloaded.
    cmd = build_serve("d", cfg, 24 * GiB, ["--cpu-offload-gb", "16"])
    # 28.48 GiB of weights less 16 GiB, 3.95 GiB reserve: 95% of the card leaves 26k bf16 tokens, short of
    # 32k; an fp8 KV cache at 90% reaches it (5.16 GiB at 128 KiB a token)
    assert (int(24 * GiB * 0.95) - (30_585_369_344 - 16 * GiB) - 4_242_833_664) // 262_144 == 26_065
    room = int(24 * GiB * 0.9) - (30_585_369_344 - 16 * GiB) - 4_242_833_664
    assert cmd.recipe.levers == ("fp8-kv",) and cmd.max_model_len == room // 131_072 // 16 * 16 == 42_288
    assert value(cmd.args, "--kv-cache-dtype") == "fp8"
    assert value(cmd.args, "--cpu-offload-gb") == "16"
    assert "--cpu-offload-params" not in cmd.args and "--offload-backend" not in cmd.args


# ---------------------------------------------------------------------------------------------
# The user's flags win


@pytest.mark.parametrize("extra, ours_dropped", [
    (["--max-model-len", "8192"], "--max-model-len"),
    (["--max_model_len=8k"], "--max-model-len"),
    (["--dtype=float16"], "--dtype"),
    (["--dtype", "auto"], "--dtype"),
    (["--gpu_memory_utilization", "0.8"], "--gpu-memory-utilization"),
    (["--limit-mm-per-prompt", '{"image": 1}'], "--limit-mm-per-prompt"),
    (["--limit-mm-per-prompt={\"image\": {\"count\": 3}}"], "--limit-mm-per-prompt"),
    (["--no-trust-remote-code"], "--trust-remote-code"),
])
def test_user_flags_replace_ours(extra, ours_dropped):
    args = build_serve("d", r1v_38b(), 80 * GiB, extra).args
    ours = args[:-len(extra)]
    assert args[-len(extra):] == extra          # the user's flags, unchanged, last
    assert ours_dropped not in ours and not any(a.startswith(ours_dropped + "=") for a in ours)
    names = [flag_name(a) for a in args if flag_name(a)]
    assert len(names) == len(set(names)), args  # no flag twice


def test_user_values_are_what_the_plan_uses():
    cfg = r1v_38b()
    cmd = build_serve("d", cfg, 48 * GiB, ["--gpu-memory-utilization", "0.95", "--kv-cache-dtype", "fp8",
                                           "--max-num-batched-tokens", "8K", "--limit-mm-per-prompt", '{"image": 0}'])
    assert cmd.max_model_len == plan_len(cfg, 48 * GiB, util=0.95, kv_dtype="fp8", max_batched_tokens=8192, images=False)
    assert "--gpu-memory-utilization" in cmd.args and cmd.args.count("--gpu-memory-utilization") == 1


def test_parallel_servers_get_no_single_gpu_length():
    cmd = build_serve("d", r1v_38b(), 48 * GiB, ["-tp", "2"])
    assert "--max-model-len" not in cmd.args and any("several" in n for n in cmd.notes)


def test_flag_parsing_helpers():
    assert flag_name("--max_model_len=8") == "max-model-len" and flag_name("8192") is None and flag_name("--") is None
    assert user_flags(["--no-enforce-eager", "--port", "80"]) >= {"no-enforce-eager", "enforce-eager", "port"}
    assert human_int("8k") == 8000 and human_int("8K") == 8192 and human_int("2048") == 2048
    assert images_from_limit('{"image": 2, "video": 0}') == 2
    with pytest.raises(UserError, match="old key=value form"):
        images_from_limit("image=2")
    with pytest.raises(UserError, match="is not JSON"):
        images_from_limit("two")
    with pytest.raises(UserError, match="not a number"):
        build_serve("d", r1v_38b(), 48 * GiB, ["--gpu-memory-utilization", "most"])
    with pytest.raises(UserError, match="old key=value form"):
        build_serve("d", r1v_38b(), 48 * GiB, ["--limit-mm-per-prompt", "image=2"])


# ---------------------------------------------------------------------------------------------
# Finding vLLM


def test_find_vllm_prefers_path_then_module(monkeypatch, tmp_path):
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_vllm() == [str(exe)]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(serve_mod.importlib.util, "find_spec", lambda name: object() if name == "vllm" else None)
    assert find_vllm() == [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    monkeypatch.setattr(serve_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as e:
        find_vllm()
    assert str(e.value) == VLLM_MISSING
    assert find_vllm(required=False) is None


# ---------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def cli(monkeypatch):
    """`r1v-quant` with `serve` registered as the lead registers it (added here if not yet)."""
    from r1v_quant.cli import main as main_mod
    from r1v_quant.cli import serve as serve_cli

    app = main_mod.app
    added = None
    if not any(c.name == "serve" for c in app.registered_commands):
        app.command("serve", context_settings=serve_cli.CONTEXT_SETTINGS)(serve_cli.command)
        added = app.registered_commands[-1]
    monkeypatch.setattr(serve_mod, "gpu_memory", lambda: None)      # the same on machines with a GPU
    monkeypatch.setattr(serve_mod, "installed_vllm", lambda: None)  # and with vLLM installed
    yield main_mod
    if added is not None:
        app.registered_commands.remove(added)


@pytest.fixture
def no_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(serve_mod.importlib.util, "find_spec", lambda name: None)


@pytest.fixture
def fake_vllm_exe(monkeypatch, tmp_path):
    exe = tmp_path / "bin" / "vllm"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(exe.parent))
    return exe


def test_dry_run_prints_the_command(cli, fake_vllm_exe, tmp_path):
    folder = build(tmp_path / "export")
    result = CliRunner().invoke(cli.app, ["serve", str(folder), "--dry-run", "--gpu-mem", "80GiB", "--images", "2",
                                          "--port", "8001", "--served-model-name", "r1v"])
    assert result.exit_code == 0, result.output + result.stderr
    argv = shlex.split(result.stdout.strip())
    cfg = parse_config(small_config())
    assert argv == [str(fake_vllm_exe), "serve", str(folder), "--trust-remote-code", "--dtype", "bfloat16",
                    "--max-model-len", str(plan_len(cfg, 80 * GiB)), "--limit-mm-per-prompt", '{"image": 2}',
                    "--gpu-memory-utilization", "0.9", "--port", "8001", "--served-model-name", "r1v"]
    assert "from the plan" in result.stderr


def test_dry_run_after_double_dash_and_user_overrides(cli, fake_vllm_exe, tmp_path):
    folder = build(tmp_path / "export")
    result = CliRunner().invoke(cli.app, ["serve", str(folder), "--dry-run", "--util", "0.8", "--",
                                          "--max-model-len", "1024", "--dtype", "half"])
    assert result.exit_code == 0, result.output + result.stderr
    argv = shlex.split(result.stdout.strip())
    assert value(argv, "--max-model-len") == "1024" and value(argv, "--dtype") == "half"
    assert value(argv, "--gpu-memory-utilization") == "0.8"
    assert "overflow" in result.stderr


def test_dry_run_without_vllm_still_prints(cli, no_vllm, tmp_path):
    folder = build(tmp_path / "export")
    result = CliRunner().invoke(cli.app, ["serve", str(folder), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert shlex.split(result.stdout)[:3] == ["vllm", "serve", str(folder)]
    # no GPU here and no --gpu-mem: planned for 48 GB, and it says so
    assert value(shlex.split(result.stdout), "--max-model-len") == str(plan_len(parse_config(small_config()), 48 * GiB))
    err = " ".join(result.stderr.split())
    assert "not installed here" in err and "no CUDA GPU found" in err and "48 GB default" in err


def test_missing_vllm_exits_2_with_the_sentence(cli, no_vllm, tmp_path, capsys):
    folder = build(tmp_path / "export")
    with pytest.raises(UserError) as raised:
        cli.app(["serve", str(folder), "--gpu-mem", "80GiB"], standalone_mode=False)
    assert str(raised.value) == VLLM_MISSING
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", str(folder), "--gpu-mem", "80GiB"])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: vLLM is not installed; pip install" in err and "scripts/vllm-env.sh for CPU checks." in err


def test_error_output_keeps_square_brackets(cli, no_vllm, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", str(build(tmp_path / "export")), "--gpu-mem", "80GiB"])
    assert VLLM_MISSING in " ".join(capsys.readouterr().err.split())


def test_failing_export_is_refused_naming_the_check(cli, fake_vllm_exe, tmp_path, capsys):
    qc = {k: v for k, v in quant_config().items() if k != "modules_to_not_convert"}
    folder = build(tmp_path / "bad", qc=qc)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", str(folder), "--dry-run"])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "fails the vLLM check 'modules_to_not_convert'" in err and "r1v-quant inspect" in err

    folder = build(tmp_path / "unquantised", qc=None)
    with pytest.raises(SystemExit):
        cli.main(["serve", str(folder), "--dry-run"])
    assert "fails the vLLM check 'quantization_config'" in " ".join(capsys.readouterr().err.split())


def test_a_truncated_export_is_refused_for_its_truncation(cli, fake_vllm_exe, tmp_path, capsys):
    """A cut-off download is the cause, not a missing quantisation the cut hides."""
    folder = build(tmp_path / "export", shards=1)
    shard = next(folder.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", str(folder), "--dry-run"])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2
    assert "fails the vLLM check 'safetensors index' (and" in err and f"{shard.name} is not a readable safetensors" in err, err
    assert err.index("safetensors index") < err.index("r1v-quant inspect") and "not a 4-bit export" not in err, err


def test_serve_execs_vllm(cli, fake_vllm_exe, tmp_path, monkeypatch):
    folder = build(tmp_path / "export")
    calls = []
    monkeypatch.setattr(serve_mod.os, "execvp", lambda file, argv: calls.append((file, argv)))
    result = CliRunner().invoke(cli.app, ["serve", str(folder), "--gpu-mem", "48GiB", "--port", "9000"])
    assert result.exit_code == 0, result.output
    (file, argv), = calls
    assert file == str(fake_vllm_exe) and argv[:3] == [str(fake_vllm_exe), "serve", str(folder)]
    assert argv[-2:] == ["--port", "9000"] and "running:" in result.stderr


def test_gpu_found_is_planned_for(cli, fake_vllm_exe, tmp_path, monkeypatch):
    folder = build(tmp_path / "export")
    monkeypatch.setattr(serve_mod, "gpu_memory", lambda: (int(23.5 * GiB), "NVIDIA L4"))
    result = CliRunner().invoke(cli.app, ["serve", str(folder), "--dry-run"])
    assert result.exit_code == 0, result.output
    cfg = parse_config(small_config())
    assert value(shlex.split(result.stdout), "--max-model-len") == str(plan_len(cfg, int(23.5 * GiB)))
    assert "NVIDIA L4" in result.stderr


# ---------------------------------------------------------------------------------------------
# chat --engine vllm, through a stand-in `vllm` module


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.requests = None
        FakeLLM.instances.append(self)

    def generate(self, requests, params, use_tqdm=True):
        self.requests, self.params = requests, params
        if "too long" in requests[0]["prompt"]:
            raise ValueError("The decoder prompt (length 9000) is longer than the maximum model length of 4096. Make sure")
        done = types.SimpleNamespace(text="thinking</think>answer")
        return [types.SimpleNamespace(outputs=[done])]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances.clear()
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(serve_mod, "gpu_memory", lambda: None)
    return mod


def tokenizer_folder(folder: Path) -> Path:
    """A word-level tokenizer with a DeepSeek-R1-like chat template, saved into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>", "hello"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
                          "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    fast.save_pretrained(str(folder))
    for src in DATA_DIR.glob("configuration_*.py"):     # the real config classes, as exports carry them
        shutil.copyfile(src, folder / src.name)
    return folder


def images(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB" if i else "L", (64 + i, 48), 128).save(p)
        paths.append(p)
    return paths


def test_chat_once_renders_the_template_with_one_placeholder_per_image(fake_vllm, tmp_path):
    from r1v_quant.deploy.vllm_engine import chat_once

    folder = tokenizer_folder(build(tmp_path / "export"))
    out = chat_once(str(folder), "What differs?", images(tmp_path, 2), Sampling(max_new_tokens=77, seed=5),
                    system="Be brief.")
    assert out == "thinking</think>answer"
    llm, = FakeLLM.instances
    assert llm.kwargs == {"model": str(folder), "trust_remote_code": True, "dtype": "bfloat16",
                          "limit_mm_per_prompt": {"image": 2}, "gpu_memory_utilization": 0.9}
    req, = llm.requests
    assert req["prompt"] == "<s>Be brief.<|user|><image>\n<image>\nWhat differs?<|assistant|><think>\n"
    ims = req["multi_modal_data"]["image"]
    assert len(ims) == 2 and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in ims)
    assert llm.params.kwargs == {"max_tokens": 77, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.05,
                                 "seed": 5}


def test_chat_once_greedy_text_only_and_planned_length(fake_vllm, tmp_path):
    from r1v_quant.deploy.vllm_engine import chat_once

    folder = tokenizer_folder(build(tmp_path / "export"))
    chat_once(str(folder), "hello", [], Sampling(greedy=True, max_new_tokens=8), gpu_bytes=24 * GiB)
    llm, = FakeLLM.instances
    assert "multi_modal_data" not in llm.requests[0] and llm.requests[0]["prompt"] == "<s><|user|>hello<|assistant|><think>\n"
    assert llm.kwargs["limit_mm_per_prompt"] == {"image": 0}
    assert llm.kwargs["max_model_len"] == plan_len(parse_config(small_config()), 24 * GiB, images=False)
    assert llm.params.kwargs == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}


def test_chat_once_placeholders_where_the_user_put_them(fake_vllm, tmp_path):
    from r1v_quant.deploy.vllm_engine import chat_once, with_placeholders

    assert with_placeholders("a <image> b <image>", 2) == "a <image> b <image>"
    with pytest.raises(UserError, match="1 <image> markers but 2 images"):
        with_placeholders("a <image> b", 2)
    folder = tokenizer_folder(build(tmp_path / "export"))
    chat_once(str(folder), "left <image> right <image>", images(tmp_path, 2), Sampling())
    assert "<|user|>left <image> right <image><|assistant|>" in FakeLLM.instances[0].requests[0]["prompt"]


def test_chat_once_errors_are_one_sentence(fake_vllm, tmp_path):
    from r1v_quant.deploy.vllm_engine import chat_once

    folder = tokenizer_folder(build(tmp_path / "export"))
    with pytest.raises(UserError, match=r"image .*nope.png does not exist"):
        chat_once(str(folder), "hi", [tmp_path / "nope.png"], Sampling())
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="could not be read"):
        chat_once(str(folder), "hi", [tmp_path / "bad.png"], Sampling())
    with pytest.raises(UserError, match=r"^vLLM rejected the request: The decoder prompt \(length 9000\) is longer"):
        chat_once(str(folder), "too long", [], Sampling())
    bare = build(tmp_path / "no-template")
    tokenizer_folder(bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="no chat template"):
        chat_once(str(bare), "hi", [], Sampling())


def test_chat_once_without_vllm_is_the_sentence(monkeypatch):
    from r1v_quant.deploy.vllm_engine import chat_once

    monkeypatch.setitem(sys.modules, "vllm", None)      # import vllm -> ModuleNotFoundError
    with pytest.raises(UserError) as e:
        chat_once("anything", "hi", [], Sampling())
    assert str(e.value) == VLLM_MISSING


def test_text_only_plan_drops_image_suggestions():
    cfg = r1v_38b()
    card = make_plan(cfg, gpu_mems=[("x", 24 * GiB)], images=False).cards[0]
    titles = {s.title for s in card.suggestions}
    assert "text only" not in titles and "at most 6 tiles per image" not in titles and "fp8 KV cache" in titles
    assert "vision encoder in host memory" not in titles
    assert card.weights_bytes == 30_585_369_344 - 11_256_564_480       # no tower is built
