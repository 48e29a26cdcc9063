"""Measured peaks and times of `awq` beside what the memory model predicts for the same settings.

Two ways to measure: in this process, layer by layer (CUDA: the allocator's peak allocated and
reserved bytes, reset at each layer; CPU: the process's peak RSS so far), or the `awq` command in
a child process whose peak RSS and CPU time come from `os.wait4`, so that nothing this process
holds is counted. Either way the prediction is asked with the settings the run used: the encoded
token count, the device budget, the compute dtype's width, --seq-len, the group size and the
spill threshold.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1v_quant.int4.format import DEFAULT_GROUP_SIZE
from r1v_quant.quant.memory_model import Prediction, predict

GiB = 1024**3


@dataclass(frozen=True)
class RunSettings:
    """The `awq` settings a check runs with, and the ones the memory model is told."""

    device: str = "cuda"
    samples: int = 128
    seq_len: int = 2048
    max_tokens: int = 65536
    grid: int = 20
    group_size: int = DEFAULT_GROUP_SIZE
    budget: int = 0                   # --max-device-memory in bytes
    spill_above: int = 8 * GiB        # --offload-above in bytes
    compute_dtype: str = "float32"
    rounding: str = "nearest"         # awq --rounding

    def __post_init__(self):
        # The command line takes MiB: both sides of the comparison see the same rounded figures.
        object.__setattr__(self, "budget", self.budget // 2**20 * 2**20)
        object.__setattr__(self, "spill_above", self.spill_above // 2**20 * 2**20)

    @property
    def act_bytes(self) -> int:
        return 2 if self.compute_dtype in ("bfloat16", "bf16") else 4

    def cli_args(self) -> list[str]:
        return ["--device", self.device, "--samples", str(self.samples), "--seq-len", str(self.seq_len),
                "--max-tokens", str(self.max_tokens), "--grid", str(self.grid), "--group-size", str(self.group_size),
                "--max-device-memory", f"{self.budget // 2**20}MiB",
                "--offload-above", f"{self.spill_above // 2**20}MiB", "--compute-dtype", self.compute_dtype,
                "--rounding", self.rounding]


def prediction(model: Path, tokens: int, s: RunSettings) -> Prediction:
    from r1v_quant.model.config import load_config

    return predict(load_config(model), tokens, s.budget, device=s.device, act_bytes=s.act_bytes,
                   seq_len=s.seq_len, group_size=s.group_size, spill_above=s.spill_above, gptq=s.rounding == "gptq")


def layer_device_bytes(p: Prediction) -> int:
    """The predicted device peak of one decoder layer's pass (the front phase left out): the
    searches', or GPTQ's rounding after them when larger."""
    search = sum(v for k, v in p.device_parts.items() if not k.startswith(("front", "gptq")))
    return max(search, sum(v for k, v in p.device_parts.items() if k.startswith("gptq")))


def working_set(peak: int, p: Prediction) -> int:
    """The measured peak less the stored activations the model predicts: flat in calibration size if the model holds."""
    return peak - p.stored_activations


@dataclass
class LayerMeasure:
    index: int
    seconds: float
    peak: int                         # CUDA: peak allocated during the layer; CPU: peak RSS so far
    reserved: int | None = None       # CUDA: peak reserved by the caching allocator during the layer


@dataclass
class InProcessRun:
    out: Path
    tokens: int
    seconds: float
    layers: list[LayerMeasure] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def awq_in_process(model: Path, out: Path, s: RunSettings, on_layer=None) -> InProcessRun:
    """`awq` on `model` in this process with the builtin calibration set; per-layer seconds and peaks."""
    from r1v_quant.quant.recipe import AWQSettings, CalibrationRecipe
    from r1v_quant.quant.run import quantize_checkpoint

    dev = torch.device(s.device)
    layers: list[LayerMeasure] = []

    def progress(i, _total, report):
        if report is None:
            return
        if dev.type == "cuda":
            m = LayerMeasure(i, report.seconds, torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev))
        else:
            m = LayerMeasure(i, report.seconds, peak_rss_bytes())
        layers.append(m)
        if on_layer is not None:
            on_layer(m)

    start = time.perf_counter()
    result = quantize_checkpoint(str(model), out, AWQSettings(group_size=s.group_size, grid=s.grid,
                                                                             rounding=s.rounding),
                                 CalibrationRecipe("builtin", samples=s.samples, seq_len=s.seq_len,
                                                   max_tokens=s.max_tokens),
                                 force=True, device=s.device, offload_above=s.spill_above, progress=progress,
                                 max_device_memory=s.budget, compute_dtype=s.compute_dtype)
    return InProcessRun(result.out, result.tokens, time.perf_counter() - start, layers, dict(result.extra))


@dataclass(frozen=True)
class ChildRun:
    tokens: int
    wall: float
    cpu: float
    peak_rss: int
    layers: list[dict]


def awq_child(model: Path, out: Path, s: RunSettings, log: Path, threads: int | None = None) -> ChildRun:
    """The `awq` command in a fresh process: its peak RSS, wall and CPU time, and its JSON report."""
    report = out.with_name(out.name + ".json")
    cmd = [sys.executable, "-m", "r1v_quant.cli.main", "awq", "--model", str(model), "--out", str(out), "--force",
           "--no-kl-check", "--max-shard-size", "2GiB", "--json", str(report), *s.cli_args()]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"awq failed on {model} (see {log}): " + " | ".join(tail))
    data = json.loads(report.read_text())
    tokens = int(str(data["summary"]["calibration tokens"]).replace(",", ""))
    return ChildRun(tokens, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, data["layers"])
