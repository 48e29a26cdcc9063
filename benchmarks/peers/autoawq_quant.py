"""AutoAWQ 0.2.9 on a standalone Qwen2 folder, calibrated on given token sequences.

Run with the `.venv-autoawq` interpreter (benchmarks/peers-env.sh makes it); benchmarks/peers.py
calls it and measures the process. Uses only AutoAWQ's public API:
`AutoAWQForCausalLM.from_pretrained`, `.quantize`, `.save_quantized`.

    .venv-autoawq/bin/python benchmarks/peers/autoawq_quant.py --model LLM_DIR --tokens tokens.json --out OUT

`tokens.json` holds {"sequences": [[id, ...], ...]}, every sequence of the same length L.
AutoAWQ takes a list of token-id lists as calibration data, drops sequences longer than
`max_calib_seq_len`, concatenates the rest and cuts blocks of that length, so with every
sequence exactly L long and `max_calib_seq_len=L` its blocks are exactly the given sequences.
The last line printed is `RESULT {json}` with the in-process timings.
"""

from __future__ import annotations

import time

import torch
from driver import parse_args, print_result, read_sequences


def main() -> None:
    a = parse_args(__doc__)

    t0 = time.perf_counter()
    from awq import AutoAWQForCausalLM, __version__
    from transformers import AutoTokenizer

    sequences, seq_len = read_sequences(a.tokens)
    t1 = time.perf_counter()
    model = AutoAWQForCausalLM.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype), low_cpu_mem_usage=True,
                                               use_cache=False)
    tok = AutoTokenizer.from_pretrained(a.model)
    t2 = time.perf_counter()
    quant_config = {"zero_point": True, "q_group_size": a.group_size, "w_bit": 4, "version": "GEMM"}
    model.quantize(tok, quant_config=quant_config, calib_data=sequences, max_calib_samples=len(sequences),
                   max_calib_seq_len=seq_len)
    t3 = time.perf_counter()
    model.save_quantized(a.out)
    tok.save_pretrained(a.out)
    t4 = time.perf_counter()

    # AutoAWQ's own reading of one packed linear, for the converter to check its unpacking against.
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import save_file

    layer = model.model.get_submodule(a.check_layer)
    dense = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales.float(), 4, a.group_size)  # [in, out], float32
    save_file({"weight": dense.t().float().contiguous()}, f"{a.out}/check.safetensors", metadata={"module": a.check_layer})

    print_result({
        "tool": f"AutoAWQ {__version__}",
        "import_s": t1 - t0, "load_s": t2 - t1, "quantize_s": t3 - t2, "save_s": t4 - t3,
        "samples": len(sequences), "seq_len": seq_len, "dtype": a.dtype,
        "settings": {**quant_config, "duo_scaling": True, "apply_clip": True, "n_grid": 20},
    })


if __name__ == "__main__":
    main()
