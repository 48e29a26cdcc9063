"""vLLM's real loader and engine on an r1v-quant AWQ export: same greedy tokens as our runtime?

Run with the vLLM environment (made by scripts/vllm-env.sh):

    .venv-vllm/bin/python tests/vllm_check.py                 # everything, in a temporary folder
    .venv-vllm/bin/python tests/vllm_check.py --workdir /tmp/vc --json /tmp/vc/summary.json

Steps of the default `all`:
1. `prepare`, run with the project's own Python (`--project-python`, default `.venv/bin/python`):
   `r1v-quant make-tiny`, `r1v-quant awq --calib builtin`, a synthetic test image, and our
   runtime's prompt ids and greedy reply ids (`r1v_quant.model.generate.greedy_ids`) for a text
   prompt and an image prompt, written to `reference.json`;
2. `vllm`, in this process: `vllm.LLM(model=export, trust_remote_code=True, dtype="bfloat16",
   distributed_executor_backend="uni", enforce_eager=True, ...)` with the engine in-process
   (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), greedy generation on the same prompts, then our
   reply fed back to vLLM as a prompt (teacher forcing) for its log-probabilities.
   A case passes when vLLM builds the same prompt ids (chat template, `<image>` expansion,
   tiling) and every token of our greedy reply is vLLM's greedy choice too, or a bf16
   near-tie with it (<= TIE_TOL nats), with vLLM's log-probability of it within LOGPROB_TOL
   of ours; and `LLM.chat` (vLLM's own chat templating and image placement, what `vllm
   serve` runs) builds the same prompt ids. `--strict` also demands identical free-running
   replies. Exit status 0 only when every case passes. The summary also records what the engine
   built (`engine_facts`): the vision tower's parameters and lm_head's quantisation method.
   `--text-only` starts the engine with `limit_mm_per_prompt={"image": 0}` (vLLM then builds no
   vision tower) and runs the text cases only. (Measured: identical replies and log-probabilities within 0.035 nats
   with vLLM's own kernels; one 0.0625-nat bf16 tie with its AVX2 kernels; an export with one
   layer's nibbles in the wrong order misses by 3.7 nats, a mirrored image by 1.4 nats.)

The two halves can also be run apart (`prepare` with the project Python, `vllm` with this one);
`--model EXPORT` checks an existing export instead of making a tiny one. A third step, `op`,
checks `tests/helpers/vllm_cpu_op.py` alone: vLLM's own AWQ weight conversion, inverted exactly, and
its output against vLLM's native kernel where this machine's vLLM library has one.

What this process changes, and why (all of it test-only):
- `VLLM_CPU_INT4_W4A8=0`: on CPUs with AMX, vLLM by default runs 4-bit linears with int8
  activations (W4A8), a different computation from our bf16-activation runtime and from
  vLLM's GPU kernels; the check uses vLLM's W4A16 CPU kernel.
- The `_C::cpu_gemm_wna16` op: used as vLLM provides it when present. Where vLLM's library
  lacks it (the AVX2 build: CPUs without AVX-512), `tests/helpers/vllm_cpu_op.py` registers a
  PyTorch reference of it first. `--emulate-avx2` makes vLLM load its AVX2 library on any
  x86 CPU (by hiding AVX-512/AMX from the probes vLLM asks), to exercise that path here.
- AMX: on CPUs that advertise AMX, vLLM's native 4-bit kernel uses AMX tiles without asking
  Linux for permission to use them, and dies with SIGILL at the first 4-bit linear unless
  something in the process asked before; `torch.cpu._init_amx()` asks.
- `torchvision`: vLLM's Skywork-R1V model imports its InternVL image processor, which imports
  `torchvision.transforms`; the real torchvision does not import beside CPU torch here, so
  tests/vllm_stubs supplies a test-only stand-in for that one import.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEFAULT_PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
TEXT_PROMPT = "What is two plus two? Answer briefly."
IMAGE_PROMPT = "<image>\nDescribe this image in one sentence."
IMAGE_SIZE = (640, 400)  # not square: several tiles plus a thumbnail
DEFAULT_AWQ_ARGS = "--samples 16 --seq-len 512 --no-kl-check"


def _log(msg: str) -> None:
    print(f"[vllm-check] {msg}", flush=True)


# --------------------------------------------------------------------------- prepare (project env)

def write_test_image(path: Path) -> Path:
    """A deterministic RGB image with gradients and blocks (no randomness, no files needed)."""
    import numpy as np
    from PIL import Image

    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), ((x // 40 + y // 40) % 2) * 200 + 20], axis=-1)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def _cli(python: str, *args: str) -> float:
    cmd = [python, "-m", "r1v_quant.cli.main", *args]
    _log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def reference_cases(model_dir: Path, image: Path, max_new_tokens: int) -> list[dict]:
    """Our runtime's view of each case: the prompt vLLM must be given, its ids, and the greedy reply."""
    import torch

    from r1v_quant.model.generate import Conversation, encode_conversation, greedy_ids
    from r1v_quant.model.images import load_image
    from r1v_quant.model.prompt import IMAGE_PLACEHOLDER, render_chat
    from r1v_quant.model.r1v import load_model

    loaded = load_model(model_dir, device="cpu")
    cases = []
    for name, text, images in (("text", TEXT_PROMPT, []), ("image", IMAGE_PROMPT, [image])):
        conv = Conversation()
        conv.add_user(text, [load_image(p) for p in images])
        ids, pixels, tiles = encode_conversation(loaded.config, loaded.tokenizer, conv)
        # The same chat, rendered with the `<image>` markers left for vLLM's processor to expand.
        prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": conv.turns[0].text}],
                             add_generation_prompt=True)
        t0 = time.perf_counter()
        out = list(greedy_ids(model_dir, text, max_new_tokens, image_paths=[str(p) for p in images], device="cpu"))
        seconds = time.perf_counter() - t0
        # Our model's log-probabilities along its own reply (one forward pass over prompt + reply).
        full = torch.tensor([ids[0].tolist() + out])
        with torch.inference_mode():
            px = None if pixels is None else pixels.to(loaded.device, loaded.dtype)
            logp = torch.log_softmax(loaded.model(full, px).logits[0].float(), dim=-1)
        n = ids.shape[1]
        steps = [round(logp[n - 1 + i, t].item(), 4) for i, t in enumerate(out)]
        cases.append({
            "name": name,
            "prompt": prompt,
            "user_text": conv.turns[0].text,
            "prompt_pieces": [loaded.tokenizer(piece, add_special_tokens=False).input_ids
                              for piece in prompt.split(IMAGE_PLACEHOLDER)],
            "placeholder_ids": loaded.tokenizer(IMAGE_PLACEHOLDER, add_special_tokens=False).input_ids,
            "images": [str(p) for p in images],
            "tiles": list(tiles),
            "prompt_ids": ids[0].tolist(),
            "output_ids": out,
            "output_logprobs": steps,
            "seconds": round(seconds, 2),
        })
        _log(f"reference {name}: {n} prompt ids, reply {out}")
    return cases


def prepare(workdir: Path, max_new_tokens: int, awq_args: str, python: str | None = None,
            model: Path | None = None) -> Path:
    """make-tiny + awq (unless `model` names an export) + image + reference.json in `workdir`."""
    python = python or sys.executable
    workdir.mkdir(parents=True, exist_ok=True)
    src, export = (None, model.resolve()) if model else (workdir / "tiny", workdir / "tiny-awq")
    timings = {}
    if src is not None and not (src / "config.json").is_file():
        timings["make_tiny_s"] = round(_cli(python, "make-tiny", str(src)), 2)
    if src is not None and not (export / "config.json").is_file():
        timings["awq_s"] = round(_cli(python, "awq", "--model", str(src), "--calib", "builtin", "--out", str(export),
                                      *awq_args.split()), 2)
    image = write_test_image(workdir / "image.png")
    ref = {
        "source": None if src is None else str(src),
        "export": str(export),
        "max_new_tokens": max_new_tokens,
        "timings": timings,
        "cases": reference_cases(export, image, max_new_tokens),
    }
    path = workdir / "reference.json"
    path.write_text(json.dumps(ref, indent=2) + "\n")
    _log(f"wrote {path}")
    return path


# --------------------------------------------------------------------------- vllm (vLLM env)

def _hide_avx512_and_amx() -> None:
    """Make vLLM load (and plan for) its AVX2 library: the probes it asks all answer False."""
    import torch

    for probe in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
                  "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, probe):
            setattr(torch.cpu, probe, lambda: False)


def setup_vllm_process(emulate_avx2: bool) -> dict:
    """Everything that must happen before `vllm.LLM(...)`; returns what was done."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    if emulate_avx2:
        _hide_avx512_and_amx()
    sys.path.insert(0, str(TESTS))
    try:
        from vllm_stubs import scoped_torchvision
    finally:
        sys.path.remove(str(TESTS))
    scoped_torchvision.install()

    from helpers import vllm_cpu_op

    done = {"emulate_avx2": emulate_avx2, "w4a8": os.environ["VLLM_CPU_INT4_W4A8"] != "0"}
    if vllm_cpu_op.register():
        done["gemm_op"] = "reference (tests/helpers/vllm_cpu_op.py: vLLM's library here lacks _C.cpu_gemm_wna16)"
    else:
        done["gemm_op"] = "vLLM native _C.cpu_gemm_wna16"
    amx = bool(torch.cpu._is_amx_tile_supported())
    done["isa_hint"] = "amx" if amx else "vec"
    if amx:
        done["amx_permission"] = bool(torch.cpu._init_amx())
    return done


LOGPROBS = 5  # log-probabilities vLLM returns per position besides the scored token
# Criteria (nats). A greedy reply may leave ours where two tokens' bf16 logits are a rounding
# step apart (0.0625 at logits of 8 to 16), so the replies are compared two ways: as generated,
# and position by position along our reply (teacher forcing), where each of our tokens must be
# vLLM's choice or within TIE_TOL of it, and vLLM's log-probability of it within LOGPROB_TOL of
# ours. A wrong weight layout or a wrong image path fails both by whole nats.
TIE_TOL = 0.15
LOGPROB_TOL = 0.15


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _images(case: dict) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in case["images"]]


def _generate(llm, case: dict, max_new_tokens: int):
    """vLLM's own greedy reply to the rendered prompt (vLLM tokenises it and expands `<image>`)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                            max_tokens=max_new_tokens, detokenize=False)
    request: dict = {"prompt": case["prompt"]}
    if case["images"]:
        request["multi_modal_data"] = {"image": _images(case)[0]}
    # The chat template already wrote the BOS token: tokenise without adding specials again.
    return llm.generate([request], params, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})[0]


def _chat(llm, case: dict, max_new_tokens: int):
    """The same request through `LLM.chat` (vLLM applies the chat template, as `vllm serve` does)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                            max_tokens=max_new_tokens, detokenize=False)
    text = case["user_text"].replace("<image>\n", "")
    content: list[dict] = [{"type": "image_pil", "image_pil": im} for im in _images(case)]
    content.append({"type": "text", "text": text})
    return llm.chat([{"role": "user", "content": content}], params, use_tqdm=False)[0]


def _teacher_forced(llm, case: dict) -> dict:
    """vLLM's log-probabilities along our reply: prompt (with `<image>` unexpanded) + our reply as one prompt."""
    from vllm import SamplingParams

    pieces = case["prompt_pieces"]
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids += case["placeholder_ids"] + piece
    ours = case["output_ids"]
    request: dict = {"prompt_token_ids": ids + ours}
    if case["images"]:
        request["multi_modal_data"] = {"image": _images(case)[0]}
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=LOGPROBS, detokenize=False)
    out = llm.generate([request], params, use_tqdm=False)[0]
    expanded = list(out.prompt_token_ids)
    if expanded != case["prompt_ids"] + ours:
        return {"same_ids": False}
    n = len(case["prompt_ids"])
    deficit, diff, not_top = [], [], []
    for i, tok in enumerate(ours):
        step = out.prompt_logprobs[n + i]
        best = max(v.logprob for v in step.values())
        mine = step[tok].logprob
        deficit.append(round(best - mine, 4))
        diff.append(round(abs(mine - case["output_logprobs"][i]), 4))
        if step[tok].rank != 1:
            not_top.append(i)
    return {"same_ids": True, "max_deficit": max(deficit, default=0.0), "max_logprob_diff": max(diff, default=0.0),
            "steps_not_vllm_top": not_top, "deficit": deficit, "logprob_diff": diff}


def engine_facts(model) -> dict:
    """What the engine built, read off the loaded model inside the worker: the vision tower's
    parameters (none when vLLM skipped building it) and the quantisation method of lm_head."""
    tower = [(n, p) for n, p in model.named_parameters() if n.startswith(("vision_model.", "mlp1."))]
    head = model.get_language_model().lm_head
    return {"vision_params": len(tower), "vision_bytes": sum(p.numel() * p.element_size() for _, p in tower),
            "vision_model": type(model.vision_model).__name__, "mlp1": type(model.mlp1).__name__,
            "lm_head_method": type(getattr(head, "quant_method", None)).__name__,
            "lm_head_params": sorted(n for n, _ in head.named_parameters()),
            # Decoder linears vLLM built unquantised (an export's modules_to_not_convert, `awq --keep-bf16`).
            "unquantised_decoder_linears": sorted(
                n for n, m in model.named_modules() if n.startswith("language_model.") and ".layers." in n
                and type(getattr(m, "quant_method", None)).__name__ == "UnquantizedLinearMethod")}


def run_vllm(model: Path, ref: dict, emulate_avx2: bool, max_model_len: int, strict: bool = False,
             text_only: bool = False) -> dict:
    setup = setup_vllm_process(emulate_avx2)
    _log(f"set-up: {setup}")
    import vllm
    from vllm import LLM

    t0 = time.perf_counter()
    # Text only: no image per prompt, so vLLM does not build the vision tower at all.
    llm = LLM(model=str(model), trust_remote_code=True, dtype="bfloat16", distributed_executor_backend="uni",
              enforce_eager=True, max_model_len=max_model_len, seed=0,
              limit_mm_per_prompt={"image": 0 if text_only else 1})
    load_s = time.perf_counter() - t0
    facts = llm.apply_model(engine_facts)[0]
    _log(f"engine: {facts}")
    results = []
    for case in ref["cases"]:
        if text_only and case["images"]:
            continue
        t1 = time.perf_counter()
        out = _generate(llm, case, ref["max_new_tokens"])
        gen_s = time.perf_counter() - t1
        got_prompt, got = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        forced = _teacher_forced(llm, case)
        chat = _chat(llm, case, ref["max_new_tokens"])
        chat_ok = list(chat.prompt_token_ids) == case["prompt_ids"] and list(chat.outputs[0].token_ids) == got
        prompt_ok = got_prompt == case["prompt_ids"]
        exact = prompt_ok and got == case["output_ids"]
        close = (forced["same_ids"] and forced["max_deficit"] <= TIE_TOL and forced["max_logprob_diff"] <= LOGPROB_TOL)
        r = {
            "name": case["name"],
            "prompt_ids_equal": prompt_ok,
            "prompt_len": {"vllm": len(got_prompt), "reference": len(case["prompt_ids"])},
            "tiles": case["tiles"],
            "reference_output_ids": case["output_ids"],
            "vllm_output_ids": got,
            "exact": exact,
            "first_difference": _first_difference(got, case["output_ids"]),
            "teacher_forced": {k: v for k, v in forced.items() if k not in ("deficit", "logprob_diff")},
            # LLM.chat (vLLM's own chat template and image placement) must build our prompt ids
            # and so give the same reply as generate.
            "chat_same_prompt_and_reply": chat_ok,
            "ok": (exact if strict else prompt_ok) and close and chat_ok,
            "seconds": round(gen_s, 2),
        }
        results.append(r)
        if not prompt_ok:
            i = _first_difference(got_prompt, case["prompt_ids"])
            _log(f"{case['name']}: prompt ids differ at {i}: vllm {got_prompt[max(0, (i or 0) - 5):(i or 0) + 5]} "
                 f"ours {case['prompt_ids'][max(0, (i or 0) - 5):(i or 0) + 5]}")
        same = 'identical replies' if exact else 'replies differ at step ' + str(r['first_difference'])
        _log(f"{case['name']}: {'OK' if r['ok'] else 'FAIL'} ({same}); "
             f"along our reply: {r['teacher_forced']}; LLM.chat agrees: {chat_ok}")
        _log(f"{case['name']}: vllm {got}")
        _log(f"{case['name']}: ours {case['output_ids']}")
    return {
        "model": str(model),
        "vllm_version": vllm.__version__,
        "setup": setup,
        "criteria": {"strict": strict, "tie_tol_nats": TIE_TOL, "logprob_tol_nats": LOGPROB_TOL},
        "text_only": text_only,
        "engine": facts,
        "engine_load_s": round(load_s, 2),
        "cases": results,
        "ok": all(r["ok"] for r in results),
    }


# --------------------------------------------------------------------------- op (vLLM env)

OP_NATIVE_REL_TOL = 2.0**-7  # one bf16 rounding step, relative to the output's largest value
OP_SHAPES = ((256, 512, 128, 5), (768, 256, 128, 1), (128, 96, 32, 3), (512, 1536, 128, 17))  # K, N, group, M


def check_op() -> dict:
    """tests/helpers/vllm_cpu_op.py against vLLM's own weight conversion, AWQ dequantisation and (if present) its kernel.

    Each AWQ layer goes through vLLM's real `AutoAWQMarlinLinearMethod.process_weights_after_loading`
    (AWQ -> GPTQ-like -> CPU blocked layout); the reference op's output must equal, bit for bit,
    x @ dequantised AWQ weight (scales rounded to bf16, as vLLM stores them), and vLLM's native
    `_C.cpu_gemm_wna16` where this machine's vLLM library has one.
    """
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    import socket

    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig, AutoAWQMarlinLinearMethod

    from helpers import vllm_cpu_op
    from r1v_quant.quant.primitives import awq_dequantize, awq_tensors

    native = vllm_cpu_op.native_op_present()
    isas = []
    if native:
        isas.append("vec")
        if torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx():
            isas.append("amx")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    rows = []
    with set_current_vllm_config(VllmConfig()):
        # vLLM's weight parameters ask for the tensor-parallel rank: a group of one.
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        gen = torch.Generator().manual_seed(0)
        for k, n, g, m in OP_SHAPES:
            w = torch.randn(n, k, generator=gen) * 0.05
            t = awq_tensors(w, g)
            method = AutoAWQMarlinLinearMethod(AutoAWQConfig.from_config(
                {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True}))
            layer = torch.nn.Module()
            method.create_weights(layer, k, [n], k, n, torch.bfloat16, weight_loader=None)
            layer.qweight.data.copy_(t["qweight"])
            layer.qzeros.data.copy_(t["qzeros"])
            layer.scales.data.copy_(t["scales"].to(torch.bfloat16))
            method.process_weights_after_loading(layer)
            x = (torch.randn(m, k, generator=gen)).to(torch.bfloat16)
            bias = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
            ref = torch.empty(m, n, dtype=torch.bfloat16)
            vllm_cpu_op.cpu_gemm_wna16_reference(x, layer.qweight, ref, layer.scales, layer.qzeros, bias, 8, "vec")
            # The layout inversion, exactly: the weight the reference op multiplies by is the
            # AWQ checkpoint's own dequantised weight (with the bf16 scales vLLM keeps).
            dq = awq_dequantize(t["qweight"], t["qzeros"], t["scales"].to(torch.bfloat16).to(torch.float16), g)
            mine = vllm_cpu_op.dequantize(layer.qweight, layer.scales, layer.qzeros, torch.float32)
            row = {"K": k, "N": n, "group": g, "M": m, "blocked_weight": list(layer.qweight.shape),
                   "weight_equals_awq_dequant": torch.equal(mine, dq.t())}
            scale = ref.float().abs().max().item()
            for isa in isas:
                got = torch.empty(m, n, dtype=torch.bfloat16)
                torch.ops._C.cpu_gemm_wna16(x, layer.qweight, got, layer.scales, layer.qzeros, bias, 8, isa)
                # Same weights; only the float32 summation order may differ (AMX tiles), which
                # can move a bf16 result by one rounding step.
                diff = (ref.float() - got.float()).abs().max().item()
                row[f"native_{isa}_identical"] = torch.equal(ref, got)
                row[f"native_{isa}_max_rel_diff"] = round(diff / scale, 6)
            rows.append(row)
            _log(f"op {row}")
    ok = all(r["weight_equals_awq_dequant"] for r in rows) and all(
        v <= OP_NATIVE_REL_TOL for r in rows for key, v in r.items() if key.endswith("_max_rel_diff"))
    return {"native_op_present": native, "native_isas_compared": isas, "shapes": rows, "ok": ok}


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", nargs="?", default="all", choices=["all", "prepare", "vllm", "op"])
    p.add_argument("--workdir", type=Path, help="Where the tiny checkpoint, export and reference go (default: a temp folder).")
    p.add_argument("--model", type=Path, help="An existing export to check (default: a tiny one made by prepare).")
    p.add_argument("--reference", type=Path, help="vllm step: reference.json written by prepare.")
    p.add_argument("--project-python", default=str(DEFAULT_PROJECT_PYTHON),
                   help="all: the project's Python, which runs prepare (default .venv/bin/python).")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--awq-args", default=DEFAULT_AWQ_ARGS, help=f"Extra `r1v-quant awq` options (default: {DEFAULT_AWQ_ARGS!r}).")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="Make vLLM load its AVX2 library (no cpu_gemm_wna16) so the reference op is used.")
    p.add_argument("--text-only", action="store_true",
                   help='Start the engine with limit_mm_per_prompt={"image": 0} and run the text cases only.')
    p.add_argument("--strict", action="store_true",
                   help="Require identical greedy replies (default: identical, or equal up to bf16 near-ties; see TIE_TOL).")
    p.add_argument("--json", type=Path, help="Write the summary here.")
    a = p.parse_args(argv)

    if a.step == "op":
        summary = check_op()
        print(json.dumps(summary, indent=2))
        if a.json:
            a.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 0 if summary["ok"] else 1

    if a.step == "prepare":
        prepare(a.workdir or Path(tempfile.mkdtemp(prefix="r1v-vllm-")), a.max_new_tokens, a.awq_args, model=a.model)
        return 0

    if a.step == "all":
        workdir = a.workdir or Path(tempfile.mkdtemp(prefix="r1v-vllm-"))
        cmd = [a.project_python, str(Path(__file__).resolve()), "prepare", "--workdir", str(workdir),
               "--max-new-tokens", str(a.max_new_tokens), f"--awq-args={a.awq_args}"]
        if a.model:
            cmd += ["--model", str(a.model.resolve())]
        _log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True)
        a.reference = workdir / "reference.json"
    if a.reference is None:
        p.error("the vllm step needs --reference (from the prepare step)")
    ref = json.loads(a.reference.read_text())
    summary = run_vllm(a.model or Path(ref["export"]), ref, a.emulate_avx2, a.max_model_len, a.strict, a.text_only)
    summary["reference_timings"] = ref.get("timings", {})
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
