"""Helpers several commands share: placing images in a prompt, writing a file whole, the vLLM settings."""

import json

import pytest

from r1v_quant.deploy.serve import build_serve
from r1v_quant.deploy.vllm_args import serve_flags, vllm_settings
from r1v_quant.deploy.vllm_engine import engine_kwargs, with_placeholders
from r1v_quant.model.generate import user_turn
from r1v_quant.model.prompt import with_image_placeholders
from r1v_quant.output import write_atomic, write_text_atomic


def test_images_go_first_unless_the_text_places_them():
    assert with_image_placeholders("What is it?", 2) == "<image>\n<image>\nWhat is it?"
    assert with_image_placeholders("Compare <image> and <image>.", 2) == "Compare <image> and <image>."
    assert with_image_placeholders("No pictures.", 0) == "No pictures."
    # chat, calibration and the vLLM engine pose a question the same way
    assert user_turn("What is it?", [object()]).turns[0].text == with_placeholders("What is it?", 1)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with pytest.raises(FileNotFoundError):
        write_text_atomic(path, "old")  # a missing folder is not made up
    path.parent.mkdir()
    write_text_atomic(path, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_serve_and_engine_share_one_set_of_vllm_settings():
    from test_serve import r1v_38b

    engine = engine_kwargs("d", 2, max_model_len=8192, util=0.85).kwargs
    assert engine == {"model": "d", **vllm_settings(2, 0.85, 8192)}
    flags = serve_flags(vllm_settings(2, 0.85, 8192))
    assert flags == ["--trust-remote-code", "--dtype", "bfloat16", "--max-model-len", "8192",
                     "--limit-mm-per-prompt", json.dumps({"image": 2}), "--gpu-memory-utilization", "0.85"]
    cmd = build_serve("d", r1v_38b(), None, util=0.85, images_per_prompt=2)
    assert cmd.args == ["serve", "d", *serve_flags(vllm_settings(2, 0.85, cmd.max_model_len))]
    assert serve_flags(vllm_settings(2, 0.85), {"dtype"})[:2] == ["--trust-remote-code", "--limit-mm-per-prompt"]
