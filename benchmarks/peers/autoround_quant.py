"""Intel auto-round (signed-gradient rounding) on a standalone Qwen2 folder, calibrated on given token
sequences, exported in its AutoAWQ format (`auto_awq`).

Run with the `.venv-autoround` interpreter (benchmarks/peers-env.sh --autoround makes it);
benchmarks/peers.py calls it and measures the process. Uses auto-round's public API:
`AutoRound(model, tokenizer, ...)`, `.quantize_and_save(out, format="auto_awq")`.

    .venv-autoround/bin/python benchmarks/peers/autoround_quant.py --model LLM_DIR --tokens tokens.json --out OUT

Settings: 4 bits, asymmetric (zero point), groups of 128, auto-round's default tuning (200
iterations per decoder block, learning rate 1/iterations, its min-max range tuning on), the
given sequences as calibration data (nsamples = their number, seqlen = their length), batch 8,
torch.compile off (a CPU without a compiler toolchain cannot use it), lm_head left alone.

Writes OUT (GEMM qweight/qzeros/scales, AutoAWQ's layout) and OUT/check.safetensors: one
linear dequantised from the saved files by auto-round's own AutoAWQ reader (`dequantize_gemm`),
for the converter to check its reading against. The last line printed is `RESULT {json}`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from driver import parse_args, print_result, read_sequences

ITERS = 200  # auto-round's default


def _awq_reader():
    """auto-round's own dequantisation of AutoAWQ GEMM tensors (its location moved between releases)."""
    import importlib

    for where in ("auto_round.export.export_to_awq.utils", "auto_round.export.export_to_awq"):
        try:
            return importlib.import_module(where).dequantize_gemm
        except (ImportError, AttributeError):
            continue
    raise SystemExit("auto-round has no dequantize_gemm to check the export with")


def _flatten(out: Path) -> None:
    """auto-round saves into a subfolder named after the model and scheme; its files move up to OUT."""
    if any(out.glob("*.safetensors")):
        return
    inner = [d for d in out.iterdir() if d.is_dir() and any(d.glob("*.safetensors"))]
    if len(inner) != 1:
        raise SystemExit(f"auto-round's export is not where expected under {out}")
    for f in inner[0].iterdir():
        f.rename(out / f.name)
    inner[0].rmdir()


def main() -> None:
    a = parse_args(__doc__)
    t0 = time.perf_counter()
    from auto_round import AutoRound, __version__
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sequences, seq_len = read_sequences(a.tokens)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    tok = AutoTokenizer.from_pretrained(a.model)
    # Each calibration item is one sequence of ids: auto-round keeps items of exactly seqlen tokens.
    data = [torch.tensor([seq], dtype=torch.long) for seq in sequences]
    t2 = time.perf_counter()
    settings = {"bits": 4, "group_size": a.group_size, "sym": False, "iters": ITERS, "nsamples": len(sequences),
                "seqlen": seq_len, "batch_size": 8, "seed": 42, "enable_torch_compile": False}
    ar = AutoRound(model, tok, dataset=data, device_map="cpu", **settings)
    ar.quantize_and_save(a.out, format="auto_awq")
    t3 = time.perf_counter()
    _flatten(Path(a.out))

    from safetensors.torch import load_file, save_file

    saved: dict[str, torch.Tensor] = {}
    for f in sorted(Path(a.out).glob("*.safetensors")):
        saved.update(load_file(str(f)))
    m = a.check_layer
    dense = _awq_reader()(saved[f"{m}.qweight"], saved[f"{m}.qzeros"], saved[f"{m}.scales"].float(), 4, a.group_size)
    save_file({"weight": dense.t().float().contiguous()}, f"{a.out}/check.safetensors", metadata={"module": m})
    print_result({
        "tool": f"auto-round {__version__}", "import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2,
        "samples": len(sequences), "seq_len": seq_len, "dtype": a.dtype,
        "linears": sum(k.endswith(".qweight") for k in saved), "settings": {**settings, "format": "auto_awq"},
    })


if __name__ == "__main__":
    main()
