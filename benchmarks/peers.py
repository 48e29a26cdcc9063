"""Quality and calibration cost of r1v-quant's AWQ against the tools users would otherwise pick.

    benchmarks/peers-env.sh --autoawq --llmc --nf4  # once: the peers' environments
    python benchmarks/peers.py                      # the trained small model (models/r1v-mini), a few minutes on 2 cores
    python benchmarks/peers.py --quick              # smoke run on a random tiny checkpoint, ~5 min
    python benchmarks/peers.py --model DIR --json out.json --markdown out.md
    python benchmarks/peers.py --cost-only --samples 64 --repeats 3   # calibration cost only, medians of 3
    python benchmarks/peers.py --model models/r1v-outliers --suite r1v-outliers --questions 400 \
        --seeds 0,1,2 --only llmc-awq-gptq,llmc-gptq,autoround,ours-text,rtn \
        --ours-variant gptq="--rounding gptq"   # over calibration seeds (below)

Run it with the project's environment; the peers run in their own (`benchmarks/peers-env.sh`
makes `.venv-autoawq`, `.venv-llmc`, `.venv-autoround` and, with --nf4, the bitsandbytes folder
`.venv-nf4`).
A peer whose environment is missing or whose run fails is reported as such, with the reason.

What it does, in one process:
1. Writes the language model of the R1V checkpoint as a standalone transformers Qwen2
   folder (the `language_model.` prefix dropped, config from `llm_config`, tokenizer copied):
   the peers know Qwen2, not InternVL/Skywork-R1V.
2. Builds one text calibration set: N sequences of exactly L tokens (the built-in calibration
   questions as chat text without their pictures, each followed by its reference reasoning
   reply, concatenated). The token ids go to AutoAWQ and llm-compressor as ids; r1v-quant
   gets the same texts with `--calib text:FILE`, and the script checks that its encoder gives
   exactly the same ids.
3. Quantises, each in its own measured process (wall time, CPU time and peak RSS from
   `os.wait4`, so one tool's memory never mixes with another's): r1v-quant on the text set;
   AutoAWQ 0.2.9 and llm-compressor's AWQModifier on the same tokens; and r1v-quant on its
   multimodal built-in set and on that set with the model's own reasoning traces
   (`--traces self`), with the same cap on calibration tokens.
4. Converts the peers' outputs into the R1V layout: AutoAWQ already writes GEMM
   qweight/qzeros/scales, which are renamed; llm-compressor's compressed-tensors int4
   codes, zero points and scales are turned into the same GEMM tensors losslessly (no
   dequantise-requantise). The vision encoder, `mlp1`, embeddings, final norm and `lm_head`
   come from the source byte for byte; the decoder norms come from each tool (AWQ folds
   its scales into them).
5. Evaluates every variant against the full-precision reference with the project's eval
   library on held-out built-in questions (they never appear in any calibration set):
   coarse-grained top-64 KL and top-1 agreement on the reference's own replies, accuracy
   with Wilson intervals, and the paired bootstrap interval of the change; plus RTN (same
   bits and groups, no scaling) and NF4 (bitsandbytes) baselines.

With --seeds, every calibrated variant runs once per calibration seed instead: r1v-quant with
`awq --seed K` on the text tokens of seed K (or on the built-in set of seed K, for variants with
traces), each peer on the same text tokens of seed K (the seed picks which built-in questions make
up the text). Variants: ours-text, ours-builtin, ours-traces and ours-NAME (`--ours-variant
NAME="AWQ ARGS"`), the peers autoawq, llmc (AWQModifier), llmc-gptq (GPTQModifier alone, static
order), llmc-awq-gptq (AWQModifier, then GPTQModifier) and autoround (auto-round, exported as
`auto_awq`), and rtn (no calibration, measured once). Each is evaluated as soon as it is quantised,
against one reference whose replies are cached and shared, on the same questions (`--eval-seed`,
the same for all). Every (variant, seed) leaves a record in WORK/seeds/, from which the table is
rebuilt after each one (so a partial run has a partial table, and --reuse resumes). Per variant the
table gives Δ's mean and range over the seeds, and Δ pooled over the seeds with a paired bootstrap
interval: each question's change is its mean over the seeds of (the variant's answer under that
seed minus the reference's), and the questions are resampled, each with all its seeds, so the
interval counts 400 questions, not 1200, and still carries the spread between seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = Path(__file__).resolve().parent / "peers"
AUTOAWQ_PY = ROOT / ".venv-autoawq" / "bin" / "python"
LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
AUTOROUND_PY = ROOT / ".venv-autoround" / "bin" / "python"
NF4_DIR = ROOT / ".venv-nf4"
GROUP = 128
LLM = "language_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Peer:
    tool: str                # as the tables name it
    python: Path             # the peer's own interpreter
    driver: str              # in benchmarks/peers/
    args: tuple[str, ...]    # extra driver arguments
    layout: str              # what it writes: "gemm" (AutoAWQ's GEMM tensors) or "compressed-tensors"


PEERS = {
    "autoawq": Peer("AutoAWQ 0.2.9", AUTOAWQ_PY, "autoawq_quant.py", (), "gemm"),
    "llmc": Peer("llm-compressor 0.14.0.1 AWQModifier", LLMC_PY, "llmc_quant.py", ("--recipe", "awq"),
                 "compressed-tensors"),
    "llmc-gptq": Peer("llm-compressor 0.14.0.1 GPTQModifier (static order)", LLMC_PY, "llmc_quant.py",
                      ("--recipe", "gptq"), "compressed-tensors"),
    "llmc-awq-gptq": Peer("llm-compressor 0.14.0.1 AWQModifier, then GPTQModifier", LLMC_PY, "llmc_quant.py",
                          ("--recipe", "awq+gptq"), "compressed-tensors"),
    "autoround": Peer("auto-round 0.16.1 (auto_awq export)", AUTOROUND_PY, "autoround_quant.py", (), "gemm"),
}


@dataclass
class Settings:
    model: Path
    work: Path
    samples: int = 16                # calibration sequences
    seq_len: int = 512               # tokens per text sequence (AutoAWQ's default length)
    questions: int = 240             # held-out questions evaluated
    suite: str = "r1v-mini"          # r1v-quant eval suite the questions come from
    max_new_tokens: int = 128        # per reply (r1v-mini answers in well under 100 tokens)
    trace_tokens: int = 128          # longest self-generated trace
    batch_size: int = 8
    threads: int = 2
    seed: int = 0
    skip: tuple[str, ...] = ()
    reuse: bool = False              # keep quantised outputs already in the work folder
    peer_dtype: str = "bfloat16"     # what AutoAWQ and llm-compressor load and compute in
    cost_only: bool = False          # only the three text-calibrated runs, no evaluation
    repeats: int = 1                 # runs of each text-calibrated tool, order rotated; medians reported

    @property
    def calib_tokens(self) -> int:
        return self.samples * self.seq_len


QUICK = {"samples": 8, "seq_len": 128, "questions": 8, "suite": "builtin", "max_new_tokens": 48, "trace_tokens": 48,
         "batch_size": 8}


# ---------------------------------------------------------------- models and machine


def default_model() -> Path | None:
    """The trained small model, when the source tree has it."""
    mini = ROOT / "models" / "r1v-mini"
    return mini if (mini / "config.json").is_file() else None


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"),
                                   ("AMX", "amx_tile")) if flag in flags]
    return {"cpu": cpu, "isa": isa, "cores": len(os.sched_getaffinity(0)), "memory_gib": mem, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__}


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def say(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


# ---------------------------------------------------------------- 1. the language model alone


def extract_llm(src: Path, dst: Path) -> Path:
    """`src`'s language model as a transformers Qwen2ForCausalLM folder (tensors renamed, nothing else changed)."""
    from safetensors.torch import save_file

    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.config import load_config

    stamp = dst / "source.json"
    ident = {"source": str(src.resolve()), "mtime": max(p.stat().st_mtime for p in src.glob("*.safetensors"))}
    if stamp.is_file() and json.loads(stamp.read_text()) == ident:
        return dst
    cfg, ckpt = load_config(src), Checkpoint(src)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    qcfg = cfg.qwen2_config()
    qcfg.architectures = ["Qwen2ForCausalLM"]
    qcfg.dtype = cfg.llm.get("torch_dtype", "bfloat16")
    qcfg.use_cache = False
    qcfg.save_pretrained(tmp)
    tensors = {name[len(LLM):]: ckpt.get(name).contiguous() for name in ckpt.names() if name.startswith(LLM)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    stamp_tmp = tmp / "source.json"
    stamp_tmp.write_text(json.dumps(ident))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


# ---------------------------------------------------------------- 2. one set of calibration tokens


def calibration_text(src: Path, n: int, seq_len: int, seed: int, out: Path) -> dict:
    """N texts whose r1v-quant encoding is exactly seq_len tokens; writes text.jsonl and tokens.json."""
    from r1v_quant.calib.builtin import builtin_item, reference_response, sample_id
    from r1v_quant.calib.encode import encode_sample
    from r1v_quant.calib.mmmu import pose_question
    from r1v_quant.calib.sample import Sample
    from r1v_quant.model.config import load_config
    from r1v_quant.model.prompt import IMAGE_PLACEHOLDER, THINK_START, render_chat
    from r1v_quant.model.r1v import load_tokenizer

    tok, cfg = load_tokenizer(src), load_config(src)
    bos = tok.bos_token or ""
    index = 0

    def piece() -> str:
        nonlocal index
        item = builtin_item("calib", seed, index)
        sample = Sample(id=sample_id("calib", seed, index), prompt="", answer=item.answer)
        index += 1
        question = pose_question(item.question, item.options)
        question = question.replace(IMAGE_PLACEHOLDER + " ", "").replace(IMAGE_PLACEHOLDER, "").strip()
        prompt, reply = render_chat(tok, [{"role": "user", "content": question}]), reference_response(sample)
        if prompt.rstrip().endswith(THINK_START) and reply.startswith(THINK_START):
            reply = reply[len(THINK_START):].lstrip("\n")  # the template already opened the reasoning block
        return prompt + reply + tok.eos_token

    texts, sequences = [], []
    for _ in range(n):
        text = piece()
        if bos and text.startswith(bos):
            text = text[len(bos):]  # the text encoder adds the BOS itself
        while len(tok(text, add_special_tokens=True).input_ids) < seq_len + 8:
            text += piece()
        # r1v-quant's own encoder, as `awq --calib text:FILE --seq-len L` runs it: it cuts to L tokens.
        ids = encode_sample(Sample(id="t", prompt=text, kind="text"), cfg, tok, seq_len).ids
        if len(ids) != seq_len:
            raise SystemExit(f"calibration text encoded to {len(ids)} tokens, not {seq_len}")
        texts.append(text)
        sequences.append(ids)
    out.mkdir(parents=True, exist_ok=True)
    # Written whole and renamed: another run on the same work folder may be reading the same seed's set.
    tmp = out / f"text.jsonl.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "text.jsonl")
    tmp = out / f"tokens.json.{os.getpid()}"
    tmp.write_text(json.dumps({"sequences": sequences}))
    os.replace(tmp, out / "tokens.json")
    # The check that makes the comparison fair: what `--calib text:FILE` will read back.
    from r1v_quant.calib.sets import load_calibration

    again = [encode_sample(s, cfg, tok, seq_len).ids
             for s in load_calibration(f"text:{out / 'text.jsonl'}", n=n, seed=seed)]
    if again != sequences:
        raise SystemExit("r1v-quant's text loader does not give back the calibration tokens written")
    return {"sequences": n, "seq_len": seq_len, "tokens": n * seq_len, "questions_used": index,
            "text": str(out / "text.jsonl"), "token_ids": str(out / "tokens.json")}


# ---------------------------------------------------------------- 3. measured runs


@dataclass
class Run:
    name: str
    tool: str
    calibration: str
    out: Path
    command: list[str] = field(default_factory=list)
    status: str = "not run"          # ok | failed | skipped | reused
    reason: str = ""
    wall_s: float | None = None      # the whole process
    cpu_s: float | None = None       # user + system time of the process and its children
    peak_rss_mb: float | None = None
    quantize_s: float | None = None  # the tool's own quantisation call, as it reports it
    tokens: int | None = None
    load: list[float] = field(default_factory=list)  # 1-minute load average before and after the run
    extra: dict = field(default_factory=dict)


def measured(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float, float]:
    """(exit status, wall s, CPU s, peak RSS MiB) of one child process, from its own rusage."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def result_line(log: Path) -> dict:
    for ln in reversed(log.read_text(errors="replace").splitlines()):
        if ln.startswith("RESULT "):
            return json.loads(ln[len("RESULT "):])
    return {}


def execute(run: Run, s: Settings, done_marker: str) -> Run:
    log = s.work / "logs" / f"{run.name}.log"
    if s.reuse and (run.out / done_marker).is_file() and (s.work / "logs" / f"{run.name}.json").is_file():
        saved = json.loads((s.work / "logs" / f"{run.name}.json").read_text())
        for k in ("wall_s", "cpu_s", "peak_rss_mb", "quantize_s", "tokens", "load", "extra"):
            setattr(run, k, saved.get(k))
        run.status = "reused"
        say(f"{run.name}: reusing {run.out}")
        return run
    say(f"{run.name}: {' '.join(map(str, run.command))}")
    shutil.rmtree(run.out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    rc, run.wall_s, run.cpu_s, run.peak_rss_mb = measured([str(c) for c in run.command], thread_env(s.threads), log)
    run.load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if rc != 0:
        run.status, run.reason = "failed", f"exit {rc}: {last_error(log)} (log: {log.relative_to(s.work)})"
        say(f"{run.name}: FAILED {run.reason}")
        return run
    run.status = "ok"
    say(f"{run.name}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, peak RSS {run.peak_rss_mb:.0f} MiB")
    return run


def save_run(run: Run, s: Settings) -> None:
    (s.work / "logs" / f"{run.name}.json").write_text(json.dumps(
        {k: v for k, v in asdict(run).items() if k not in ("out",)}, default=str, indent=1))


def ours(s: Settings, name: str, calib: str, label: str, extra_args: list[str], samples: int | None = None) -> Run:
    out = s.work / name
    report = s.work / "logs" / f"{name}.awq.json"
    cmd = [sys.executable, "-m", "r1v_quant.cli.main", "awq", "--model", s.model, "--out", out, "--calib", calib,
           "--samples", samples or s.samples, "--max-tokens", s.calib_tokens, "--group-size", GROUP, "--device", "cpu",
           "--seed", s.seed, "--no-kl-check", "--force", "--json", report, *extra_args]
    run = execute(Run(name, "r1v-quant", label, out, cmd), s, "config.json")
    if run.status == "ok":
        data = json.loads(report.read_text())
        run.quantize_s = data["seconds"]
        run.tokens = int(data["summary"]["calibration tokens"])
        run.extra = {"image-token share": data["summary"]["image-token share"],
                     "compute dtype": data.get("settings", {}).get("compute dtype", "?")}
        save_run(run, s)
    return run


def peer(s: Settings, name: str, llm: Path, tokens: Path) -> Run:
    spec = PEERS[name]
    raw = s.work / f"{name}-raw"
    run = Run(name, spec.tool, "text (same token ids)", s.work / name,
              [spec.python, DRIVERS / spec.driver, "--model", llm, "--tokens", tokens, "--out", raw, "--group-size", GROUP,
               "--threads", s.threads, "--dtype", s.peer_dtype, *spec.args])
    if name in s.skip:
        run.status, run.reason = "skipped", "--skip"
        return run
    if not spec.python.is_file():
        run.status, run.reason = "skipped", f"{spec.python.relative_to(ROOT)} missing: run benchmarks/peers-env.sh"
        return run
    if s.reuse and (run.out / "config.json").is_file():
        return execute(run, s, "config.json")
    run = execute(run, s, "config.json")
    if run.status != "ok":
        return run
    info = result_line(s.work / "logs" / f"{name}.log")
    run.quantize_s, run.tokens = info.get("quantize_s"), s.calib_tokens
    run.extra = info
    try:
        if spec.layout == "gemm":
            run.extra["conversion"] = convert_gemm(raw, s.model, run.out, spec.tool)
        else:
            run.extra["conversion"] = convert_llmc(raw, s.model, run.out, spec.tool)
    except Exception as error:  # noqa: BLE001 - any conversion failure is reported, not hidden
        run.status, run.reason = "failed", f"conversion to the R1V layout: {type(error).__name__}: {error}"
        say(f"{name}: FAILED {run.reason}")
        return run
    save_run(run, s)
    return run


def text_runs(s: Settings, llm: Path, calib: dict) -> list[Run]:
    """r1v-quant, AutoAWQ and llm-compressor on the same text tokens; with repeats, the order
    rotates every round (so none always runs first on a shared machine) and medians are kept."""
    tokens = Path(calib["token_ids"])
    makers = {
        "ours-text": lambda: ours(s, "ours-text", f"text:{calib['text']}", "text, same token ids as the peers",
                                  ["--seq-len", s.seq_len]),
        "autoawq": lambda: peer(s, "autoawq", llm, tokens),
        "llmc": lambda: peer(s, "llmc", llm, tokens),
    }
    names = list(makers)
    last: dict[str, Run] = {}
    measured_runs: dict[str, list[list[float]]] = {n: [] for n in names}
    for round_ in range(1 if s.reuse else s.repeats):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            if name in last and last[name].status in ("failed", "skipped"):
                continue
            run = makers[name]()
            last[name] = run
            if run.status == "ok":
                measured_runs[name].append([run.wall_s, run.cpu_s, run.peak_rss_mb, run.quantize_s or 0.0])
    for name, rows in measured_runs.items():
        run = last[name]
        if len(rows) > 1:
            run.wall_s, run.cpu_s, run.peak_rss_mb, run.quantize_s = (
                statistics.median(r[i] for r in rows) for i in range(4))
            run.extra["repeats (wall s, CPU s, peak RSS MiB, quantise s)"] = rows
            save_run(run, s)
    return [last[n] for n in names]


# ---------------------------------------------------------------- 4. peers' outputs -> the R1V layout


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "check.safetensors" and not f.name.startswith("codes"):
            tensors.update(load_file(str(f)))
    return tensors


def write_r1v(src: Path, dst: Path, llm: dict[str, torch.Tensor], recipe: dict) -> dict:
    """An R1V export of AWQ GEMM tensors `llm` (names as in a Qwen2ForCausalLM), the rest from `src`.

    Vision, mlp1, embeddings, final norm and lm_head are the source's bytes; the peer's copies
    of them are only compared (they may have been cast). Decoder norms come from the peer,
    because AWQ folds its scales into them.
    """
    from r1v_quant.model.checkpoint import Checkpoint, ShardWriter
    from r1v_quant.model.config import load_config
    from r1v_quant.model.layout import is_quant_linear
    from r1v_quant.output import staged_dir
    from r1v_quant.quant.export import copy_side_files, export_config

    cfg, ckpt = load_config(src), Checkpoint(src)
    worst_copy, taken = 0.0, 0
    with staged_dir(dst, force=True) as tmp:
        writer = ShardWriter(tmp, 5 * 1000**3)
        for name in ckpt.names():
            if not name.startswith(LLM):
                writer.add(name, ckpt.get(name))
                continue
            inner, module = name[len(LLM):], name.removesuffix(".weight")
            if name.endswith(".weight") and is_quant_linear(module):
                base = inner.removesuffix(".weight")
                for suffix in ("qweight", "qzeros", "scales"):
                    writer.add(f"{module}.{suffix}", llm[f"{base}.{suffix}"].contiguous())
                taken += 1
            elif ".layers." in name:  # decoder norms (scaled by AWQ) and q/k/v biases
                source = ckpt.get(name)
                writer.add(name, llm[inner].to(source.dtype).contiguous())
            else:
                source = ckpt.get(name)
                if inner in llm:
                    worst_copy = max(worst_copy, float((llm[inner].float() - source.float()).abs().max()))
                writer.add(name, source)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(export_config(cfg, GROUP), indent=2) + "\n")
        copy_side_files(src, tmp)
        (tmp / "r1v_quant_report.json").write_text(json.dumps({"recipe": recipe}, indent=2) + "\n")
    return {"linears": taken, "untouched tensors max |peer - source|": worst_copy}


def codes_to_gemm(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Unsigned 4-bit codes [out, in], zero points and scales [out, in/g] (w = (q - z) * s) as AWQ GEMM
    qweight/qzeros/scales, with no requantisation: the codes and zero points are packed as they are and
    the scales become float16. Also returns the largest relative change a scale took to float16 (0 when
    every scale was float16-exact, so that the conversion is lossless)."""
    from r1v_quant.int4.format import to_awq

    if codes.dtype != torch.uint8 or zeros.dtype != torch.uint8 or int(codes.max()) > 15 or int(zeros.max()) > 15:
        raise ValueError("codes and zero points must be unsigned 4-bit values (uint8 in 0..15)")
    s32 = scales.float()
    change = float(((s32.to(torch.float16).float() - s32).abs() / s32.abs().clamp_min(1e-30)).max())
    gemm = to_awq(codes.contiguous(), zeros.contiguous(), s32)
    return gemm["qweight"], gemm["qzeros"], gemm["scales"], change


def dense_mismatch(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, theirs: torch.Tensor,
                   module: str) -> float:
    """Raises unless r1v-quant's dequantisation of GEMM tensors equals a tool's own dense weight [out, in]
    exactly; returns the (zero) largest difference."""
    from r1v_quant.quant.primitives import awq_dequantize

    mine = awq_dequantize(qweight, qzeros, scales, GROUP)
    if mine.shape != theirs.shape:
        raise ValueError(f"{module}: the converted weight is {tuple(mine.shape)}, the tool's {tuple(theirs.shape)}")
    worst = float((mine.float() - theirs.float()).abs().max())
    if worst > 0:
        raise ValueError(f"{module}: the converted tensors differ from the tool's own dequantisation by up to {worst:g}")
    return worst


def _check_dense(dst_dir: Path, check: Path, module: str) -> float:
    """Max |our reading of the converted tensors - the peer's own dequantised weight| for one linear."""
    from safetensors.torch import load_file

    from r1v_quant.model.checkpoint import Checkpoint

    ck = Checkpoint(dst_dir)
    name = f"{LLM}{module}"
    return dense_mismatch(ck.get(f"{name}.qweight"), ck.get(f"{name}.qzeros"), ck.get(f"{name}.scales"),
                          load_file(str(check))["weight"].float(), module)


def convert_gemm(raw: Path, src: Path, dst: Path, tool: str) -> dict:
    """AutoAWQ, and auto-round's `auto_awq` export, write GEMM qweight/qzeros/scales already: names get the
    `language_model.` prefix back. The driver's check.safetensors holds the tool's own dequantisation."""
    llm = _read_folder(raw)
    info = write_r1v(src, dst, llm, {"calibration set": "text (peers' token ids)", "tool": tool, "group size": GROUP})
    info["max |dequantised - the tool's own dequantisation| (layer 0 q_proj)"] = _check_dense(
        dst, raw / "check.safetensors", "model.layers.0.self_attn.q_proj")
    return info


def convert_llmc(raw: Path, src: Path, dst: Path, tool: str) -> dict:
    """llm-compressor writes compressed-tensors (pack-quantized int4). Its driver also writes, with
    compressed-tensors' own unpacking, the unsigned codes [out, in], zero points [out, in/g] and
    scales [out, in/g] of every quantised linear (codes.safetensors); w = (q - z) * s in both
    formats, so they become AWQ GEMM tensors exactly: only the nibble order and transposition differ,
    and the scales become float16 (they are checked to be float16-exact)."""
    from safetensors.torch import load_file

    llm = {k: v for k, v in _read_folder(raw).items()
           if not k.endswith(("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"))}
    codes = load_file(str(raw / "codes.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in codes})
    worst_scale = 0.0
    for m in modules:
        qweight, qzeros, scales, change = codes_to_gemm(codes[f"{m}.codes"], codes[f"{m}.zeros"], codes[f"{m}.scales"])
        llm[f"{m}.qweight"], llm[f"{m}.qzeros"], llm[f"{m}.scales"] = qweight, qzeros, scales
        worst_scale = max(worst_scale, change)
    info = write_r1v(src, dst, llm, {"calibration set": "text (peers' token ids)", "tool": tool, "group size": GROUP})
    info["linears from compressed-tensors codes"] = len(modules)
    info["max relative change of a scale to float16"] = worst_scale
    info["max |dequantised - compressed-tensors' dequantize| (layer 0 q_proj)"] = _check_dense(
        dst, raw / "check.safetensors", "model.layers.0.self_attn.q_proj")
    return info


# ---------------------------------------------------------------- 5. evaluation


def _bitsandbytes_ready() -> str | None:
    try:
        import bitsandbytes

        return None
    except ImportError:
        pass
    if NF4_DIR.is_dir():
        sys.path.append(str(NF4_DIR))
        try:
            import bitsandbytes  # noqa: F401

            return None
        except ImportError as error:
            return f"bitsandbytes in {NF4_DIR.name} does not import ({error})"
    return "bitsandbytes is not installed: pip install 'r1v-quant[nf4]' or benchmarks/peers-env.sh --nf4"


def evaluate(s: Settings, runs: list[Run], baselines: list[str]) -> dict:
    from r1v_quant.calib.traces import model_identity
    from r1v_quant.evals import run as ev
    from r1v_quant.quant import baselines as quant_baselines

    settings = ev.EvalSettings(suite=s.suite, limit=s.questions, seed=s.seed, max_new_tokens=s.max_new_tokens,
                               batch_size=s.batch_size, device="cpu", dtype="bf16", cache_dir=s.work / "eval-cache")
    suite = ev.load_suite(settings)
    from r1v_quant.model.r1v import load_model

    specs = [ev.ModelSpec("reference (bf16)", "reference", lambda: load_model(s.model, "cpu", "bf16"))]
    for r in runs:
        if r.status in ("ok", "reused"):
            specs.append(ev.ModelSpec(r.name, "candidate", lambda p=r.out: load_model(p, "cpu", "bf16")))
    skipped = {}
    for base in baselines:
        if base == "rtn":
            specs.append(ev.ModelSpec("rtn", "baseline", lambda: quant_baselines.build_rtn(s.model, GROUP, "cpu", "bf16")))
        elif base == "nf4":
            why = _bitsandbytes_ready()
            if why:
                skipped["nf4"] = why
            else:
                specs.append(ev.ModelSpec("nf4", "baseline", lambda: quant_baselines.build_nf4(s.model, "cpu", "bf16")))

    def progress(label, done, total):
        if done in (0, total) or done % max(1, total // 4) == 0:
            say(f"eval {label}: {done}/{total}")

    key = ev.cache_key(model_identity(s.model), suite, settings)
    cache = ev.ReferenceCache.open(settings.cache_dir, key)
    start = time.perf_counter()
    ref_items, reused = ev.run_reference(specs[0], suite, settings, cache, progress)
    runs_out = {specs[0].label: ("reference", ev.reference_results(ref_items))}
    seconds = {specs[0].label: time.perf_counter() - start}
    failed = {}
    for spec in specs[1:]:
        start = time.perf_counter()
        try:
            runs_out[spec.label] = (spec.role, ev.run_model(spec, suite, settings, ref_items, progress))
        except Exception as error:  # noqa: BLE001 - one model failing must not lose the others
            failed[spec.label] = f"{type(error).__name__}: {str(error)[:300]}"
            say(f"eval {spec.label}: FAILED {failed[spec.label]}")
            continue
        seconds[spec.label] = time.perf_counter() - start
    from r1v_quant.model.r1v import load_tokenizer

    close_id = load_tokenizer(s.model).convert_tokens_to_ids("</think>")
    models, comparisons = ev.qa_results(suite, runs_out, close_id)
    return {"models": {m.name: asdict(m) for m in models}, "comparisons": {c.model: asdict(c) for c in comparisons},
            "seconds": seconds, "failed": failed, "skipped": skipped, "reference_reused": reused,
            "questions": len(suite.samples), "settings": settings.describe()}


# ---------------------------------------------------------------- tables


LABELS = {
    "reference (bf16)": ("reference, bf16", "-"),
    "ours-builtin": ("r1v-quant AWQ", "built-in multimodal (images + text)"),
    "ours-traces": ("r1v-quant AWQ", "built-in multimodal + own reasoning traces"),
    "ours-text": ("r1v-quant AWQ", "text, same token ids as the peers"),
    "autoawq": ("AutoAWQ 0.2.9", "text, same token ids"),
    "llmc": ("llm-compressor 0.14.0.1 AWQModifier", "text, same token ids"),
    "rtn": ("round-to-nearest w4 g128", "none"),
    "nf4": ("bitsandbytes NF4", "none"),
}


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def quality_rows(results: dict, runs: list[Run]) -> list[list[str]]:
    ev = results["eval"]
    models, comps = ev["models"], ev["comparisons"]
    base_kl = (comps.get("ours-text") or {}).get("mean_kl")
    tokens = {r.name: r.tokens for r in runs}
    rows = []
    order = ["reference (bf16)", "ours-builtin", "ours-traces", "ours-text", "autoawq", "llmc", "rtn", "nf4"]
    for name in order:
        tool, calib = LABELS[name]
        if name not in models:
            why = ev["failed"].get(name) or ev["skipped"].get(name) or next(
                (f"{r.status}: {r.reason}" for r in runs if r.name == name), None)
            if why:
                rows.append([tool, calib, "-", "-", "-", "-", "-", "-", f"not measured ({why})"])
            continue
        m, c = models[name], comps.get(name) or {}
        kl = c.get("mean_kl", 0.0 if name.startswith("reference") else None)
        ratio = "-" if kl is None or not base_kl or name.startswith("reference") else f"{kl / base_kl:.2f}"
        acc = f"{m['accuracy']:.1f} [{m['accuracy_lo']:.1f}, {m['accuracy_hi']:.1f}]"
        diff = "-" if not c else f"{c['diff']:+.1f} [{c['diff_lo']:+.1f}, {c['diff_hi']:+.1f}]"
        top1 = "100.0" if name.startswith("reference") else _f(c.get("top1_agreement"), ".1f")
        rows.append([tool, calib, _f(tokens.get(name), "d"), _f(kl, ".3g"), ratio, top1, acc, diff, ""])
    return rows


QUALITY_HEAD = ["tool", "calibration", "calib tokens", "KL (nats/token)", "KL ÷ r1v-quant text", "top-1 agree %",
                "accuracy % [95% CI]", "Δ vs reference, points [95% CI]", "note"]
COST_HEAD = ["tool", "wall s", "÷ r1v-quant", "CPU s", "÷ r1v-quant", "peak RSS MiB", "÷ r1v-quant",
             "tool's own quantise call s", "note"]


def cost_rows(runs: list[Run]) -> list[list[str]]:
    base = next((r for r in runs if r.name == "ours-text" and r.wall_s), None)
    rows = []
    for r in runs:
        if r.name not in ("ours-text", "autoawq", "llmc"):
            continue
        tool = LABELS[r.name][0]
        if r.wall_s is None:
            rows.append([tool, "-", "-", "-", "-", "-", "-", "-", f"{r.status}: {r.reason}"])
            continue

        def ratio(a, b):
            return "-" if not base or not b else f"{a / b:.2f}"

        note = "reused from an earlier run" if r.status == "reused" else ("" if r.status == "ok" else r.reason)
        rows.append([tool, f"{r.wall_s:.1f}", ratio(r.wall_s, base and base.wall_s), f"{r.cpu_s:.1f}",
                     ratio(r.cpu_s, base and base.cpu_s), f"{r.peak_rss_mb:.0f}",
                     ratio(r.peak_rss_mb, base and base.peak_rss_mb), _f(r.quantize_s, ".1f"), note])
    return rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i < 2 or i == len(head) - 1 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


# ---------------------------------------------------------------- seeds: every calibrated variant over calibration seeds


SEED_ORDER = ("ours-text", "ours-builtin", "ours-traces", "llmc-awq-gptq", "llmc-gptq", "llmc", "autoround", "autoawq",
              "rtn")
BUILTIN_OURS = {"ours-text": [], "ours-builtin": ["--calib", "builtin"], "ours-traces": ["--traces", "self"]}


def parse_ours_variant(text: str) -> tuple[str, list[str]]:
    """`NAME=ARGS` (ARGS: extra `awq` arguments, shell-quoted) as ("ours-NAME", [args])."""
    import shlex

    name, sep, args = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--ours-variant {text!r}: expected NAME=\"AWQ ARGUMENTS\", NAME of letters, digits, - and _")
    return f"ours-{name}", shlex.split(args)


def ours_calibration(args: list[str]) -> tuple[str, list[str]]:
    """Which calibration set an r1v-quant variant uses, and its remaining arguments: `--calib X` as given;
    with `--traces`, the built-in multimodal set (traces are the model's replies to its questions);
    otherwise the peers' text tokens of the seed."""
    args = list(args)
    if "--calib" in args:
        i = args.index("--calib")
        if i + 1 >= len(args):
            raise SystemExit("--ours-variant: --calib needs a value")
        calib = args[i + 1]
        del args[i:i + 2]
        return calib, args
    return ("builtin" if "--traces" in args else "text"), args


def pooled_seeds(ref_correct: list[bool], cand_by_seed: list[list[bool]], n_boot: int = 2000, seed: int = 0,
                 conf: float = 0.95) -> dict:
    """Δ (points, candidate minus reference) of a variant calibrated with several seeds.

    Per seed: the paired difference on the same questions. Pooled: each question's difference is
    averaged over the seeds (its answers under every seed against the reference's one answer),
    and the questions are resampled with all their seeds together (a cluster bootstrap, as for
    pass@1 over k replies), so the interval counts the questions once and the seeds' spread with
    them. The pooled value equals the mean of the per-seed values."""
    from r1v_quant.evals.pass_at_k import paired_pass_at_1

    n = len(ref_correct)
    if not cand_by_seed or any(len(c) != n for c in cand_by_seed):
        raise ValueError("every seed must answer the reference's questions")
    per_seed = [100.0 * (sum(map(bool, c)) - sum(map(bool, ref_correct))) / n for c in cand_by_seed]
    pooled = paired_pass_at_1(list(ref_correct) * len(cand_by_seed), [bool(x) for c in cand_by_seed for x in c],
                              list(range(n)) * len(cand_by_seed), n_boot=n_boot, seed=seed, conf=conf)
    return {"per_seed": per_seed, "mean": statistics.fmean(per_seed), "min": min(per_seed), "max": max(per_seed),
            "pooled": pooled.value, "pooled_lo": pooled.lo, "pooled_hi": pooled.hi}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_while_written(folder: Path, poll_s: float = 20.0) -> None:
    """Another run on the same work folder may be computing the shared reference right now (it leaves
    its process id in WRITER while it does): wait for it, then read what it wrote rather than compute
    it twice."""
    marker = folder / WRITER
    while marker.is_file():
        try:
            pid = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if not pid or pid == os.getpid() or not _alive(pid):
            return
        say(f"the reference is being computed by process {pid}; waiting")
        time.sleep(poll_s)


WRITER = "reference-writer.pid"


class Evaluator:
    """The reference's replies (cached on disk, shared by every variant and seed) and one candidate at a time."""

    def __init__(self, s: Settings, eval_seed: int):
        from r1v_quant.calib.traces import model_identity
        from r1v_quant.evals import run as ev
        from r1v_quant.model.r1v import load_model, load_tokenizer

        self.ev, self.s = ev, s
        self.settings = ev.EvalSettings(suite=s.suite, limit=s.questions, seed=eval_seed,
                                        max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, device="cpu",
                                        dtype="bf16", cache_dir=s.work / "eval-cache")
        self.suite = ev.load_suite(self.settings)
        _wait_while_written(self.settings.cache_dir)
        cache = ev.ReferenceCache.open(self.settings.cache_dir, ev.cache_key(model_identity(s.model), self.suite,
                                                                             self.settings))
        spec = ev.ModelSpec("reference (bf16)", "reference", lambda: load_model(s.model, "cpu", "bf16"))
        start = time.perf_counter()
        marker = self.settings.cache_dir / WRITER
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        try:
            self.ref_items, reused = ev.run_reference(spec, self.suite, self.settings, cache, self.progress)
        finally:
            marker.unlink(missing_ok=True)
        say(f"reference: {len(self.ref_items)} questions, {reused} from the cache, {time.perf_counter() - start:.0f} s")
        self.ref_results = ev.reference_results(self.ref_items)
        self.close_id = load_tokenizer(s.model).convert_tokens_to_ids("</think>")
        self.ref_correct = [bool(c) for c in ev.score(self.suite, self.ref_results, self.close_id).correct]

    @staticmethod
    def progress(label, done, total):
        if done in (0, total) or done % max(1, total // 4) == 0:
            say(f"eval {label}: {done}/{total}")

    def measure(self, label: str, load) -> dict:
        ev = self.ev
        start = time.perf_counter()
        items = ev.run_model(ev.ModelSpec(label, "candidate", load), self.suite, self.settings, self.ref_items,
                             self.progress)
        models, comps = ev.qa_results(self.suite, {"reference (bf16)": ("reference", self.ref_results),
                                                   label: ("candidate", items)}, self.close_id)
        model, comp = next(m for m in models if m.name == label), comps[0]
        return {"correct": [bool(c) for c in ev.score(self.suite, items, self.close_id).correct],
                "accuracy": model.accuracy, "diff": comp.diff, "diff_lo": comp.diff_lo, "diff_hi": comp.diff_hi,
                "mean_kl": comp.mean_kl, "top1_agreement": comp.top1_agreement,
                "seconds": time.perf_counter() - start}


def seed_record_path(work: Path, name: str, seed: int | None) -> Path:
    return work / "seeds" / f"{name}@{'-' if seed is None else seed}.json"


def seed_run(s: Settings, name: str, seed: int, llm: Path, ours_args: dict[str, list[str]]) -> Run:
    """Quantise variant `name` with calibration seed `seed`, in that seed's own work folder."""
    sd = Settings(**{**asdict(s), "seed": seed, "work": s.work / f"seed-{seed}", "skip": ()})
    (sd.work / "logs").mkdir(parents=True, exist_ok=True)
    calib = calibration_text(s.model, s.samples, s.seq_len, seed, sd.work / "calib")
    if name in PEERS:
        return peer(sd, name, llm, Path(calib["token_ids"]))
    calib_set, args = ours_calibration(ours_args[name])
    if calib_set == "text":
        return ours(sd, name, f"text:{calib['text']}", "text, same token ids as the peers", ["--seq-len", s.seq_len, *args])
    if "--traces" in args and "--max-trace-tokens" not in args:
        args += ["--max-trace-tokens", s.trace_tokens]
    # The built-in set: more questions than the text set has sequences (a picture question is a few
    # hundred tokens), the same cap on tokens.
    label = "built-in multimodal" if calib_set == "builtin" else calib_set
    return ours(sd, name, calib_set, label + (" + own reasoning traces" if "--traces" in args else ""), args,
                samples=-(-s.calib_tokens // 128))


def seed_study(s: Settings, a: argparse.Namespace, seeds: list[int]) -> int:
    """Each selected variant over the calibration seeds, evaluated as soon as it is quantised; the
    records (one JSON per variant and seed under WORK/seeds) make the tables and let --reuse resume."""
    from r1v_quant.model.r1v import load_model
    from r1v_quant.quant import baselines as quant_baselines

    ours_args = dict(BUILTIN_OURS)
    for text in a.ours_variant or []:
        name, args = parse_ours_variant(text)
        ours_args[name] = args
    names = [x.strip() for x in a.only.split(",") if x.strip()] if a.only else [
        n for n in (*SEED_ORDER, *ours_args) if n not in s.skip]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in PEERS and n not in ours_args and n != "rtn"]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: choose from "
                         f"{', '.join([*ours_args, *PEERS, 'rtn'])} (more with --ours-variant NAME=ARGS)")
    s.work.mkdir(parents=True, exist_ok=True)
    say(f"model {s.model}, work folder {s.work}, seeds {seeds}, variants {', '.join(names)}")
    llm = extract_llm(s.model, s.work / "llm")
    (s.work / "seeds").mkdir(parents=True, exist_ok=True)
    evaluators: list[Evaluator] = []

    def evaluator() -> Evaluator:
        """Made when first needed, so that quantising starts at once (and another run can finish the reference)."""
        if not evaluators:
            e = Evaluator(s, a.eval_seed)
            header = {"machine": machine(), "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:]),
                      "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
                      "eval seed": a.eval_seed, "questions": len(e.ref_correct),
                      "reference accuracy": 100.0 * sum(e.ref_correct) / len(e.ref_correct)}
            (s.work / "seeds" / "reference.json").write_text(json.dumps({**header, "correct": e.ref_correct}) + "\n")
            evaluators.append(e)
        return evaluators[0]
    for name in names:
        for seed in ([None] if name == "rtn" else seeds):
            path = seed_record_path(s.work, name, seed)
            if a.reuse and path.is_file() and json.loads(path.read_text()).get("status") == "ok":
                say(f"{name} seed {seed}: reusing {path.relative_to(s.work)}")
                continue
            if name == "rtn":
                run = Run("rtn", "round-to-nearest", "none", s.work / "rtn", status="ok")
                load = lambda: quant_baselines.build_rtn(s.model, GROUP, "cpu", "bf16")  # noqa: E731
            else:
                run = seed_run(s, name, seed, llm, ours_args)
                load = lambda p=run.out: load_model(p, "cpu", "bf16")  # noqa: E731
            record = {"variant": name, "seed": seed, "tool": run.tool, "calibration": run.calibration,
                      "command": " ".join(map(str, run.command)), "args": ours_args.get(name),
                      **{k: getattr(run, k) for k in ("status", "reason", "wall_s", "cpu_s", "peak_rss_mb",
                                                       "quantize_s", "tokens", "extra")}}
            if run.status == "reused":  # the export (and its measured cost) from an earlier run, evaluated now
                record["status"], record["export reused"] = "ok", True
            if run.status in ("ok", "reused"):
                try:
                    record["eval"] = evaluator().measure(f"{name}@{seed}", load)
                    e = record["eval"]
                    say(f"{name} seed {seed}: Δ {e['diff']:+.1f} [{e['diff_lo']:+.1f}, {e['diff_hi']:+.1f}], "
                        f"KL {e['mean_kl']:.4g}, top-1 {e['top1_agreement']:.1f}%")
                except Exception as error:  # noqa: BLE001 - one model failing must not lose the others
                    record["status"], record["reason"] = "failed", f"evaluation: {type(error).__name__}: {error}"
                    say(f"{name} seed {seed}: FAILED {record['reason']}")
            path.write_text(json.dumps(record, default=str, indent=1) + "\n")
            if evaluators:
                write_seed_tables(s.work, a.json, a.markdown)
    if evaluators or (s.work / "seeds" / "reference.json").is_file():
        write_seed_tables(s.work, a.json, a.markdown, show=True)
    return 0


def seed_table(work: Path) -> tuple[dict, list[list[str]]]:
    """The table of every variant with records under WORK/seeds (whichever runs made them)."""
    ref = json.loads((work / "seeds" / "reference.json").read_text())
    records: dict[str, list[dict]] = {}
    for f in sorted((work / "seeds").glob("*@*.json")):
        r = json.loads(f.read_text())
        records.setdefault(r["variant"], []).append(r)
    order = [n for n in SEED_ORDER if n in records] + sorted(n for n in records if n not in SEED_ORDER)
    rows, summary = [], {}
    for name in order:
        done = sorted((r for r in records[name] if r.get("status") == "ok" and "eval" in r),
                      key=lambda r: -1 if r["seed"] is None else r["seed"])
        failed = [r for r in records[name] if r not in done]
        tool = LABELS.get(name, (None,))[0] or (PEERS[name].tool if name in PEERS else "r1v-quant AWQ")
        calib = (done or failed)[0]["calibration"]
        if name.startswith("ours-") and (done or failed)[0].get("args"):
            calib += f"; `awq {' '.join(map(str, (done or failed)[0]['args']))}`"
        note = "; ".join(f"seed {r['seed']}: {r.get('status')} {r.get('reason', '')[:160]}" for r in failed)
        if not done:
            rows.append([tool, calib, "-", "-", "-", "-", "-", "-", "-", note or "not measured"])
            continue
        d = pooled_seeds(ref["correct"], [r["eval"]["correct"] for r in done])
        kls = [r["eval"]["mean_kl"] for r in done]
        top1 = statistics.fmean(r["eval"]["top1_agreement"] for r in done)
        walls = [r["wall_s"] for r in done if r.get("wall_s") is not None]
        cpus = [r["cpu_s"] for r in done if r.get("cpu_s") is not None]
        seeds = ",".join("-" if r["seed"] is None else str(r["seed"]) for r in done)
        spread = (f"{d['mean']:+.1f} ({d['min']:+.1f} to {d['max']:+.1f})" if len(done) > 1 else f"{d['mean']:+.1f}")
        kl = f"{statistics.fmean(kls):.4f}" + (f" ({min(kls):.4f} to {max(kls):.4f})" if len(kls) > 1 else "")
        summary[name] = {**d, "seeds": seeds, "kl": kls, "top1": top1, "wall_s": walls, "cpu_s": cpus,
                         "accuracy": [r["eval"]["accuracy"] for r in done]}
        rows.append([tool, calib, seeds, spread, f"{d['pooled']:+.1f} [{d['pooled_lo']:+.1f}, {d['pooled_hi']:+.1f}]",
                     kl, f"{top1:.1f}", _f(statistics.fmean(walls) if walls else None, ".0f"),
                     _f(statistics.fmean(cpus) if cpus else None, ".0f"), note])
    return {"reference": {k: v for k, v in ref.items() if k != "correct"}, "variants": summary}, rows


SEED_HEAD = ["variant", "calibration", "seeds", "Δ points, mean (range) over seeds", "Δ pooled over seeds [95% CI]",
             "KL, mean (range)", "top-1 agree %", "calib wall s", "calib CPU s", "note"]


def write_seed_tables(work: Path, json_path: Path | None, md_path: Path | None, show: bool = False) -> None:
    summary, rows = seed_table(work)
    ref = summary["reference"]
    if show:
        print_table(f"{ref['questions']} questions, reference accuracy {ref['reference accuracy']:.1f}%",
                    SEED_HEAD, rows)
    if json_path:
        json_path.write_text(json.dumps({**summary, "table": [dict(zip(SEED_HEAD, r)) for r in rows]}, indent=1,
                                        default=str) + "\n")
    if md_path:
        m = ref["machine"]
        md_path.write_text(
            f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; "
            f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.\n\n"
            f"Command: `{ref['command']}`\n\n{ref['questions']} questions, reference accuracy "
            f"{ref['reference accuracy']:.1f}%.\n\n" + markdown_table(SEED_HEAD, rows) + "\n")


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="full-precision R1V checkpoint (default: models/r1v-mini, the trained small model)")
    p.add_argument("--work", type=Path, help="work folder (default: runs/peers or runs/peers-quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a random tiny checkpoint unless --model, few samples and questions")
    p.add_argument("--samples", type=int, help="calibration sequences (default 16; quick 8)")
    p.add_argument("--seq-len", type=int, help="tokens per text calibration sequence (default 512; quick 128)")
    p.add_argument("--questions", type=int, help="held-out questions evaluated (default 240; quick 8)")
    p.add_argument("--suite", help="r1v-quant eval suite the questions come from (default r1v-mini: the skills the "
                                   "trained model has; quick: builtin)")
    p.add_argument("--max-new-tokens", type=int, help="longest reply in the evaluation (default 128; quick 48)")
    p.add_argument("--trace-tokens", type=int, help="longest self-generated reasoning trace (default 128; quick 48)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every tool (default 2)")
    p.add_argument("--batch-size", type=int, help="questions answered at once in the evaluation (default 8; part of "
                                                  "the reference cache's key, so every variant of a table uses one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of: ours-builtin, ours-traces, autoawq, llmc, rtn, nf4 "
                                              "(with --seeds also llmc-gptq, llmc-awq-gptq, autoround)")
    p.add_argument("--reuse", action="store_true", help="reuse quantised outputs (and their measurements) in the work folder")
    p.add_argument("--peer-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype AutoAWQ and llm-compressor load the model in (default bfloat16, the checkpoint's)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the three text-calibrated tools this many times, order rotated, and report medians")
    p.add_argument("--cost-only", action="store_true",
                   help="only the calibration cost: r1v-quant, AutoAWQ and llm-compressor on the text set, no evaluation")
    p.add_argument("--seeds", help="comma list of calibration seeds (e.g. 0,1,2): every calibrated variant runs once per "
                                   "seed (r1v-quant with `awq --seed`, everyone on that seed's sample of text tokens) and "
                                   "the table gives Δ's mean and range over the seeds and a paired interval pooled over them")
    p.add_argument("--only", help="with --seeds: the variants to run, in this order (default: all), from ours-text, "
                                  "ours-builtin, ours-traces, " + ", ".join(PEERS) + ", rtn and the --ours-variant names")
    p.add_argument("--ours-variant", action="append", metavar='NAME="AWQ ARGS"',
                   help='with --seeds: also r1v-quant with extra `awq` arguments, as variant ours-NAME (repeatable), '
                        'e.g. gptq="--rounding gptq"; on the seed\'s text tokens, or the built-in set with --traces')
    p.add_argument("--eval-seed", type=int, default=0,
                   help="with --seeds: the seed of the evaluation questions, the same for every variant (default 0)")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the two tables and the machine as Markdown here")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else {}
    model = a.model
    work = a.work or ROOT / "runs" / ("peers-quick" if a.quick else "peers")
    if model is None:
        model = default_model()
        if model is None and a.quick:
            model = work / "tiny"
            if not (model / "config.json").is_file():
                from r1v_quant.synthetic.checkpoint import TinySizes, make_tiny

                say(f"writing a random tiny checkpoint to {model}")
                make_tiny(model, seed=a.seed, sizes=TinySizes(llm_layers=2), force=True)
        elif model is None:
            raise SystemExit("no --model given and models/r1v-mini does not exist; pass --model DIR "
                             "(for a smoke run on a random checkpoint: --quick)")
    s = Settings(model=Path(model).resolve(), work=Path(work).resolve(), threads=a.threads, seed=a.seed,
                 skip=tuple(x.strip() for x in a.skip.split(",") if x.strip()), reuse=a.reuse,
                 peer_dtype=a.peer_dtype, cost_only=a.cost_only, repeats=max(1, a.repeats))
    for key in ("samples", "seq_len", "questions", "suite", "max_new_tokens", "trace_tokens"):
        value = getattr(a, key)
        if value is not None:
            setattr(s, key, value)
        elif key in preset:
            setattr(s, key, preset[key])
    if a.quick:
        s.batch_size = QUICK["batch_size"]
    if a.batch_size is not None:
        if a.batch_size < 1:
            raise SystemExit(f"--batch-size {a.batch_size}: must be at least 1")
        s.batch_size = a.batch_size
    return s, a


def main(argv: list[str] | None = None) -> int:
    s, a = parse(argv)
    torch.set_num_threads(s.threads)
    s.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("R1V_QUANT_CACHE", str(s.work / "cache"))  # traces cached per work folder
    if a.seeds:
        try:
            seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--seeds {a.seeds!r}: expected a comma list of integers, e.g. 0,1,2") from None
        return seed_study(s, a, seeds)
    if a.only or a.ours_variant:
        raise SystemExit("--only and --ours-variant go with --seeds")
    t_all = time.perf_counter()
    say(f"model {s.model}, work folder {s.work}")
    llm = extract_llm(s.model, s.work / "llm")
    calib = calibration_text(s.model, s.samples, s.seq_len, s.seed, s.work / "calib")
    say(f"calibration: {calib['sequences']} x {calib['seq_len']} tokens from {calib['questions_used']} built-in questions")

    runs = text_runs(s, llm, calib)
    for name, extra, label in (("ours-builtin", [], "built-in multimodal"),
                               ("ours-traces", ["--traces", "self", "--max-trace-tokens", s.trace_tokens],
                                "built-in multimodal + self traces")):
        if s.cost_only:
            continue
        if name in s.skip:
            runs.append(Run(name, "r1v-quant", label, s.work / name, status="skipped", reason="--skip"))
        else:
            # More questions than the text set has sequences: a picture question is a few hundred
            # tokens, and every variant gets the same token budget, which the cap enforces.
            runs.append(ours(s, name, "builtin", label, extra, samples=-(-s.calib_tokens // 128)))
    baselines = [b for b in ("rtn", "nf4") if b not in s.skip]

    results = {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
               "calibration": calib,
               "command": "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not s.cost_only:
        say("evaluating every variant against the reference")
        results["eval"] = evaluate(s, runs, baselines)
    results["runs"] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(r).items() if k != "command"}
                       | {"command": " ".join(map(str, r.command))} for r in runs]
    results["seconds"] = time.perf_counter() - t_all

    c_rows = cost_rows(runs)
    median = f", median of {s.repeats} runs in rotated order" if s.repeats > 1 else ""
    ours_dtype = next((r.extra.get("compute dtype") for r in runs if r.name == "ours-text" and r.extra), None)
    cost_title = (f"Calibration cost: {s.samples} x {s.seq_len} text tokens, {s.threads} threads, whole process{median} "
                  f"(r1v-quant computes in {ours_dtype or 'its auto dtype'}, the peers in {s.peer_dtype})")
    blocks = []
    if not s.cost_only:
        q_rows = quality_rows(results, runs)
        print_table(f"Quality on {results['eval']['questions']} held-out questions of suite {s.suite} "
                    f"(reference: {s.model.name})",
                    QUALITY_HEAD, q_rows)
        blocks.append(markdown_table(QUALITY_HEAD, q_rows))
        results["quality_table"] = [dict(zip(QUALITY_HEAD, row)) for row in q_rows]
    print_table(cost_title, COST_HEAD, c_rows)
    blocks.append(markdown_table(COST_HEAD, c_rows))
    results["cost_table"] = [dict(zip(COST_HEAD, row)) for row in c_rows]
    say(f"total {results['seconds'] / 60:.1f} min")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        say(f"wrote {a.json}")
    if a.markdown:
        m = results["machine"]
        text = (f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['memory_gib']} GiB; "
                f"{m['os']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']} "
                f"(project environment).\n\n"
                f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min)\n\n"
                + "\n\n".join(blocks) + "\n")
        a.markdown.write_text(text)
        say(f"wrote {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
