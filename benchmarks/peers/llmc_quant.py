"""llm-compressor on a standalone Qwen2 folder, calibrated on given token sequences, with one of
three recipes (`--recipe`), all W4A16 asymmetric, groups of 128, lm_head left alone:

    awq        AWQModifier (duo scaling, grid 20), then QuantizationModifier W4A16_ASYM (round to nearest)
    gptq       GPTQModifier W4A16_ASYM alone: static activation order, dampening 0.01 of mean diag(H)
    awq+gptq   AWQModifier's smoothing, then GPTQModifier as above: the composition of
               llm-compressor's W4A16 examples (the smoothed weights are what GPTQ rounds)

Run with the `.venv-llmc` interpreter (benchmarks/peers-env.sh makes it); benchmarks/peers.py
calls it and measures the process. Uses llm-compressor's public API (`oneshot`, the modifiers,
`save_pretrained(save_compressed=True)`) and compressed-tensors' public unpacking helpers.

    .venv-llmc/bin/python benchmarks/peers/llmc_quant.py --model LLM_DIR --tokens tokens.json --out OUT

Writes OUT (the compressed-tensors checkpoint as llm-compressor saves it) and, read back from
those files with compressed-tensors' own `unpack_from_int32`, OUT/codes.safetensors: for every
quantised linear the unsigned 4-bit codes [out, in], zero points [out, in/g] and scales
[out, in/g] (compressed-tensors stores signed int4 with an offset of 8: w = (q - z) * s either
way), plus OUT/check.safetensors, compressed-tensors' own `dequantize` of one linear.

One CPU adjustment: `IntermediatesCache.pin_memory` is made a no-op (pinning needs an
accelerator; on a CPU-only machine it fails).
The last line printed is `RESULT {json}` with the in-process timings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from driver import parse_args, print_result, read_sequences

DAMPENING = 0.01  # llm-compressor's default, as a fraction of the mean of diag(H)


def main() -> None:
    a = parse_args(__doc__, recipes=("awq", "gptq", "awq+gptq"))
    if a.group_size != 128:
        raise SystemExit("the W4A16_ASYM preset uses groups of 128")

    t0 = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import __version__, oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    sequences, seq_len = read_sequences(a.tokens)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    tok = AutoTokenizer.from_pretrained(a.model)
    dataset = Dataset.from_dict({"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]})
    t2 = time.perf_counter()
    awq = AWQModifier(duo_scaling=True, n_grid=20)
    gptq = GPTQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"], actorder="static",
                        dampening_frac=DAMPENING)
    recipe = {"awq": [awq, QuantizationModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])],
              "gptq": [gptq], "awq+gptq": [awq, gptq]}[a.recipe]
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seq_len, num_calibration_samples=len(sequences),
            shuffle_calibration_samples=False)
    t3 = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    t4 = time.perf_counter()

    # Read the saved checkpoint back with compressed-tensors' own helpers.
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file, save_file

    qconfig = QuantizationConfig.model_validate(json.loads(Path(a.out, "config.json").read_text())["quantization_config"])
    weight_args = next(iter(qconfig.config_groups.values())).weights

    saved: dict[str, torch.Tensor] = {}
    for f in sorted(Path(a.out).glob("*.safetensors")):
        saved.update(load_file(str(f)))
    codes, check = {}, {}
    for name in sorted(k for k in saved if k.endswith(".weight_packed")):
        m = name[: -len(".weight_packed")]
        shape = tuple(int(x) for x in saved[f"{m}.weight_shape"].tolist())
        q = unpack_from_int32(saved[name], 4, torch.Size(shape))  # int8 in [-8, 7]
        scale = saved[f"{m}.weight_scale"]
        zp = saved[f"{m}.weight_zero_point"]
        groups = (shape[0], shape[1] // a.group_size)
        if zp.dtype == torch.int32:  # packed, along the output dimension
            zp = unpack_from_int32(zp, 4, torch.Size(groups), packed_dim=0)
        zp = zp.to(torch.int8).reshape(groups)
        if f"{m}.weight_g_idx" in saved:  # static order keeps groups contiguous; anything else has no AWQ layout
            g_idx = saved[f"{m}.weight_g_idx"].to(torch.int64)
            if not torch.equal(g_idx, torch.arange(shape[1]) // a.group_size):
                raise SystemExit(f"{m}: the saved group index is not contiguous groups of {a.group_size}")
        codes[f"{m}.codes"] = (q.to(torch.int16) + 8).to(torch.uint8).contiguous()
        codes[f"{m}.zeros"] = (zp.to(torch.int16) + 8).to(torch.uint8).contiguous()
        codes[f"{m}.scales"] = scale.float().reshape(groups).contiguous()
        if m == a.check_layer:
            check["weight"] = dequantize(q, scale.float(), zp, args=weight_args, dtype=torch.float32).contiguous()
    save_file(codes, f"{a.out}/codes.safetensors")
    save_file(check, f"{a.out}/check.safetensors", metadata={"module": a.check_layer})

    import compressed_tensors

    print_result({
        "tool": f"llm-compressor {__version__}", "compressed_tensors": compressed_tensors.__version__,
        "import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2, "save_s": t4 - t3,
        "samples": len(sequences), "seq_len": seq_len, "dtype": a.dtype,
        "linears": len(codes) // 3, "weight_args": weight_args.model_dump(mode="json"),
        "settings": {"recipe": a.recipe, "scheme": "W4A16_ASYM", "group_size": 128,
                     **({"duo_scaling": True, "n_grid": 20, "clip search": "none (llm-compressor's AWQ has none)"}
                        if "awq" in a.recipe else {}),
                     **({"actorder": "static", "dampening_frac": DAMPENING} if "gptq" in a.recipe else {})},
    })


if __name__ == "__main__":
    main()
