"""Decode speed of the r1v-quant runtime: a bf16 checkpoint against its 4-bit AWQ export, in one run.

    python benchmarks/decode.py --reference DIR --candidate EXPORT_DIR [--tokens 64] [--device cpu|cuda]
    python benchmarks/decode.py --synthetic DIR [--width 1024 --intermediate 2816 --layers 8] [--tokens 64]

Both models are loaded with `r1v_quant.model.r1v.load_model` (exports get AWQLinear layers) and
decode the same random prompt greedily through transformers' `generate` on the language model,
exactly `N` new tokens each (end-of-sequence suppressed). A streamer timestamps every new token,
so prefill is reported apart and decode tokens/s counts only the tokens after the first.
The two models alternate repeat by repeat so that both see the same machine load; with
`--one-at-a-time` each is loaded, measured and freed in turn (for GPUs that cannot hold both).
On a CPU shared with other work, pass `--threads` at most the number of idle cores: torch's
threads wait for each other at every op, so one descheduled thread stalls them all.

`--synthetic DIR` first writes a wider random model (DIR/bf16, via `r1v_quant.synthetic.checkpoint.make_tiny`)
and its export (DIR/awq, via `r1v-quant awq --samples 4 --no-kl-check`), reusing them if present,
and benchmarks that pair: the default tiny model is too narrow for the linears to dominate.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer


class _TokenClock(BaseStreamer):
    """Records when each generated token arrives (transformers hands the prompt over first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prompt_seen = False
        self.times: list[float] = []
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        # generate() has already moved the token to the CPU, which waits for the device.
        self.times.append(time.perf_counter())
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the modules hold (parameters, buffers, AWQ packed codes)."""
    seen: dict[tuple, int] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[(obj.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for module in model.modules():
        walk({k: v for k, v in vars(module).items() if k != "_modules"})
    return sum(seen.values())


class Runner:
    """One loaded model and the prompt it decodes from."""

    def __init__(self, label: str, path: str, device: str | None, prompt_tokens: int, seed: int):
        from r1v_quant.int4.linear import AWQLinear, prepare_awq
        from r1v_quant.model.r1v import load_model

        start = time.perf_counter()
        self.loaded = load_model(path, device=device, dtype="bf16", with_tokenizer=False)
        self.label, self.path = label, path
        self.device = self.loaded.device
        lm = self.loaded.model.language_model
        self.lm = lm
        awq = [m for m in lm.modules() if isinstance(m, AWQLinear)]
        # Pack for the int4 kernel now, so that neither timing nor the first token pays for it.
        self.kernel_layers = prepare_awq(lm)
        self.awq_layers = len(awq)
        self.load_s = time.perf_counter() - start
        self.bytes = resident_bytes(self.loaded.model)
        vocab = lm.config.vocab_size
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, min(vocab, 32000), (1, prompt_tokens), generator=gen).to(self.device)
        self.vocab = vocab

    @torch.inference_mode()
    def decode(self, tokens: int) -> dict:
        embeds = self.loaded.model.input_embeddings(self.ids)
        clock = _TokenClock(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.lm.generate(
            input_ids=self.ids,
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(self.ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            pad_token_id=0,
            streamer=clock,
        )
        t = clock.times
        if len(t) != tokens:
            raise RuntimeError(f"{self.label}: generated {len(t)} tokens, expected {tokens}")
        gaps = [b - a for a, b in itertools.pairwise(t)]
        return {
            "prefill_s": t[0] - start,
            "decode_s": t[-1] - t[0],
            "tokens_per_s": (len(t) - 1) / (t[-1] - t[0]),
            "median_token_ms": 1000 * statistics.median(gaps),
            "ids": clock.ids,
        }

    def close(self) -> None:
        del self.loaded, self.lm
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def summarise(label: str, runner: Runner, runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {
        "model": label,
        "path": runner.path,
        "awq_layers": runner.awq_layers,
        "int4_kernel_layers": runner.kernel_layers,
        "resident_mb": round(runner.bytes / 2**20, 1),
        "load_s": round(runner.load_s, 1),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
        "tokens_per_s_best": round(best["tokens_per_s"], 2),
        "median_token_ms": round(statistics.median(r["median_token_ms"] for r in runs), 2),
        "prefill_ms_median": round(1000 * statistics.median(r["prefill_s"] for r in runs), 1),
        "repeats": len(runs),
    }


def measure(args, device: str) -> tuple[list[dict], dict]:
    specs = [("bf16", args.reference), ("awq-4bit", args.candidate)]
    runs: dict[str, list[dict]] = {label: [] for label, _ in specs}
    summaries, ids = {}, {}

    def warm(r: Runner) -> None:
        r.decode(min(args.tokens, 8))  # first call: allocator, kernels, lazy init

    if args.one_at_a_time:
        for label, path in specs:
            r = Runner(label, path, device, args.prompt_tokens, args.seed)
            print(f"loaded {label} from {path} in {r.load_s:.1f} s ({r.bytes / 2**20:.0f} MB resident)", flush=True)
            warm(r)
            for i in range(args.repeats):
                runs[label].append(r.decode(args.tokens))
                print(f"  {label} repeat {i + 1}: {runs[label][-1]['tokens_per_s']:.2f} tokens/s", flush=True)
            summaries[label], ids[label] = summarise(label, r, runs[label]), runs[label][-1]["ids"]
            r.close()
    else:
        runners = [Runner(label, path, device, args.prompt_tokens, args.seed) for label, path in specs]
        for r in runners:
            print(f"loaded {r.label} from {r.path} in {r.load_s:.1f} s ({r.bytes / 2**20:.0f} MB resident)", flush=True)
            warm(r)
        for i in range(args.repeats):
            for r in runners:
                runs[r.label].append(r.decode(args.tokens))
                print(f"  {r.label} repeat {i + 1}: {runs[r.label][-1]['tokens_per_s']:.2f} tokens/s", flush=True)
        for r in runners:
            summaries[r.label], ids[r.label] = summarise(r.label, r, runs[r.label]), runs[r.label][-1]["ids"]
    a, b = ids["bf16"], ids["awq-4bit"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    extra = {"greedy_tokens_equal_before_divergence": same}
    return [summaries[label] for label, _ in specs], extra


def build_synthetic(args) -> tuple[str, str]:
    """DIR/bf16 (random, wider than the default tiny model) and DIR/awq, made once and reused."""
    from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny

    root = Path(args.synthetic)
    ref, cand = root / "bf16", root / "awq"
    if not (ref / "config.json").exists():
        sizes = TinySizes(llm_width=args.width, intermediate=args.intermediate, llm_layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads)
        print(f"writing a synthetic model to {ref}: {sizes}", flush=True)
        make_tiny(ref, seed=args.seed, sizes=sizes, force=True, max_shard_bytes=512 * 1024**2)
    if not (cand / "config.json").exists():
        cmd = [sys.executable, "-m", "r1v_quant.cli.main", "awq", "--model", str(ref), "--out", str(cand),
               "--samples", "4", "--no-kl-check", "--force"]
        if args.device:
            cmd += ["--device", args.device]
        print("running:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return str(ref), str(cand)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="bf16 checkpoint folder (or Hugging Face id)")
    parser.add_argument("--candidate", help="4-bit AWQ export folder")
    parser.add_argument("--synthetic", metavar="DIR", help="build (or reuse) a wider random model and its export here")
    parser.add_argument("--width", type=int, default=1024, help="--synthetic: LLM hidden size")
    parser.add_argument("--intermediate", type=int, default=2816, help="--synthetic: LLM MLP width")
    parser.add_argument("--layers", type=int, default=8, help="--synthetic: LLM decoder layers")
    parser.add_argument("--heads", type=int, default=16, help="--synthetic: attention heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="--synthetic: key/value heads")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--one-at-a-time", action="store_true", help="load, measure and free each model in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (decode speed is measured between tokens)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        ref, cand = build_synthetic(args)
        args.reference, args.candidate = args.reference or ref, args.candidate or cand
    if not (args.reference and args.candidate):
        parser.error("give --reference and --candidate, or --synthetic DIR")

    from r1v_quant.model.r1v import pick_device

    device = pick_device(args.device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens,
    }
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows, extra = measure(args, str(device))
    ref, cand = rows
    ratio = cand["tokens_per_s_median"] / ref["tokens_per_s_median"]
    print("\n| model | resident MB | int4-kernel layers | prefill ms | decode tokens/s (median) | best | ms/token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['resident_mb']:.0f} | {r['int4_kernel_layers']}/{r['awq_layers']} | "
              f"{r['prefill_ms_median']:.1f} | {r['tokens_per_s_median']:.2f} | {r['tokens_per_s_best']:.2f} | "
              f"{r['median_token_ms']:.2f} |")
    print(f"\n4-bit / bf16 decode speed: {ratio:.2f}x; resident size {cand['resident_mb'] / ref['resident_mb']:.2f}x; "
          f"greedy tokens equal for the first {extra['greedy_tokens_equal_before_divergence']} of {args.tokens}")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows, "ratio": round(ratio, 3), **extra}, f, indent=2)


if __name__ == "__main__":
    main()
