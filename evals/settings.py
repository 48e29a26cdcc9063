"""What one accuracy comparison is run with: suites' default sizes, decoding, KL settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1v_quant.errors import UserError

DEFAULT_LIMITS = {"builtin": 64, "r1v-mini": 120, "r1v-outliers": 400, "text": 64}  # other suites: every question they hold
BASELINES = ("rtn", "nf4")
ENGINES = ("torch", "vllm")
VLLM_BASELINES = ("rtn",)
SUITE_FORMS = ("builtin, r1v-mini, r1v-outliers, mmmu-sample, mathvista, math-500, aime-2024, gpqa-diamond, "
               "text:PATH (.txt or .jsonl), or a folder / .parquet file in MMMU's layout")

# (model label, questions done, questions in all) after each step of one model's work.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class EvalSettings:
    suite: str = "builtin"
    data_path: Path | None = None
    limit: int | None = None          # None: the suite's default (see DEFAULT_LIMITS)
    seed: int = 0
    max_new_tokens: int = 2048
    greedy: bool = True               # deterministic, so reruns and the cache agree
    temperature: float = 0.6
    top_p: float = 0.95
    repetition_penalty: float = 1.05
    batch_size: int = 4
    device: str | None = None
    dtype: str = "bf16"
    cache_dir: Path | None = None
    use_cache: bool = True
    top_k: int = 64                   # reference log-probs kept per position
    kl_positions: int = 1024          # measured positions per reply (its first tokens)
    text_tokens: int = 2048           # longest text-suite item, in tokens
    samples_per_question: int = 1     # k sampled replies per question, scored as pass@1
    engine: str = "torch"             # torch (transformers generate) or vllm (vLLM's offline LLM)
    tensor_parallel_size: int = 1     # vLLM only, as are the two below
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def generation(self) -> dict:
        """The settings a reply depends on (part of the cache key)."""
        out = {"max_new_tokens": self.max_new_tokens, "greedy": self.greedy, "batch_size": self.batch_size,
               "dtype": self.dtype}
        if self.samples_per_question > 1:
            out["samples_per_question"] = self.samples_per_question
        if self.engine != "torch":  # other kernels, other replies; the torch key stays as it always was
            out["engine"] = self.engine
        if not self.greedy:
            out.update(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                       seed=self.seed)
        return out

    def describe(self) -> dict:
        """Run settings for the report."""
        decoding = "greedy" if self.greedy else (
            f"sampled (temperature {self.temperature}, top_p {self.top_p}, "
            f"repetition_penalty {self.repetition_penalty}, seed {self.seed})")
        return {"suite": self.suite, "data_path": None if self.data_path is None else str(self.data_path),
                "limit": self.limit, "seed": self.seed, "decoding": decoding,
                "samples_per_question": self.samples_per_question,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "dtype": self.dtype,
                "engine": self.engine, **({"tensor_parallel_size": self.tensor_parallel_size,
                                           "pipeline_parallel_size": self.pipeline_parallel_size}
                                          if self.engine == "vllm" else {}),
                "kl": f"top-{self.top_k} coarse-grained KL(reference ‖ model) on the reference's own outputs, "
                      f"first {self.kl_positions} reply tokens per question"}


def check_settings(s: EvalSettings) -> None:
    for name, value in (("--limit", s.limit if s.limit is not None else 1), ("--max-new-tokens", s.max_new_tokens),
                        ("--batch-size", s.batch_size), ("top-k", s.top_k), ("KL positions", s.kl_positions),
                        ("text tokens", s.text_tokens)):
        if value < 1:
            raise UserError(f"{name} must be at least 1 (got {value}).")
    if s.samples_per_question < 1:
        raise UserError(f"--samples-per-question must be at least 1 (got {s.samples_per_question}).")
    if s.engine not in ENGINES:
        raise UserError(f"--engine {s.engine} is not one of {', '.join(ENGINES)}.")
    for name, value in (("--tensor-parallel-size", s.tensor_parallel_size),
                        ("--pipeline-parallel-size", s.pipeline_parallel_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1 (got {value}).")
        if value > 1 and s.engine != "vllm":
            raise UserError(f"{name} needs --engine vllm; the torch engine runs on one device.")
    if s.distributed_executor_backend is not None and s.engine != "vllm":
        raise UserError("--distributed-executor-backend needs --engine vllm.")
    if s.samples_per_question > 1 and s.greedy:
        raise UserError("--samples-per-question needs --sample: greedy decoding gives the same reply every time.")
