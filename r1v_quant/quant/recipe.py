"""The calibration recipe of an `awq` run: what the calibration tokens are, as one validated object.

The recipe is the single owner of the calibration settings. It is checked when built (a library
caller gets the same one-sentence errors as the command line), fingerprinted whole so `--resume`
refuses a work folder made from other tokens, and saved as JSON in the export's
`r1v_quant_report.json`, from which `eval` recomputes the calibration questions.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from r1v_quant.errors import UserError
from r1v_quant.int4.format import DEFAULT_GROUP_SIZE

TRACE_MODES = ("none", "self", "bootstrap")
TRACE_ENGINES = ("transformers", "vllm")
REPORT_NAME = "r1v_quant_report.json"
# `awq --text-share`'s default, chosen by held-out KL (BENCHMARKS.md, "Text share of the calibration tokens").
DEFAULT_TEXT_SHARE = 0.0


@dataclass(frozen=True)
class CalibrationRecipe:
    spec: str = "builtin"              # a calibration set spec (see calib/sets.py)
    path: str | None = None            # local MMMU data for mmmu-sample
    mix: tuple[float, ...] | None = None  # weights of a mixture's parts
    traces: str = "none"               # "none", or "self": the source model's own answers appended
    trace_tokens: int = 1024           # longest self-generated trace
    samples: int = 128
    seq_len: int = 2048                # longest sample, in tokens (image blocks are never cut)
    max_tokens: int = 65536            # cap on calibration tokens in total
    seed: int = 0
    text_share: float = DEFAULT_TEXT_SHARE  # least share of text tokens; 0 keeps the set as encoded
    trace_engine: str = "transformers"  # what generates the traces: our runtime's generate, or vLLM
    trace_model: str | None = None     # a 4-bit export writing the traces instead of the source (or the bootstrap)

    def __post_init__(self) -> None:
        from r1v_quant.calib.sets import check_mix, split_spec
        from r1v_quant.calib.text_share import check_text_share

        object.__setattr__(self, "text_share", check_text_share(self.text_share))

        if self.path is not None:
            object.__setattr__(self, "path", str(self.path))
        if self.mix is not None:
            object.__setattr__(self, "mix", tuple(float(w) for w in self.mix))
        if self.traces not in TRACE_MODES:
            raise UserError(f"--traces {self.traces} is not one of {', '.join(TRACE_MODES)}.")
        if self.trace_engine not in TRACE_ENGINES:
            raise UserError(f"--trace-engine {self.trace_engine} is not one of {', '.join(TRACE_ENGINES)}.")
        if self.trace_model is not None:
            object.__setattr__(self, "trace_model", str(self.trace_model))
            if self.traces == "none":
                raise UserError("--trace-model needs --traces self or bootstrap; without traces no model writes any.")
        for name, low in (("samples", 1), ("seq_len", 16), ("max_tokens", 16), ("trace_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise UserError(f"--{name.replace('_', '-')} {value} must be a whole number of at least {low}.")
        if self.mix is not None and any(not math.isfinite(w) for w in self.mix):
            raise UserError("--mix weights must be non-negative numbers with a positive sum.")
        check_mix(self.mix, split_spec(self.spec.strip()))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mix"] = list(self.mix) if self.mix is not None else None
        if not self.text_share:  # a recipe without a floor is written as before the option existed
            del out["text_share"]
        # likewise the trace options at their defaults
        if self.trace_engine == "transformers":
            del out["trace_engine"]
        if self.trace_model is None:
            del out["trace_model"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CalibrationRecipe:
        known = {f.name for f in fields(cls)}
        # A recipe saved without a text share had none (the key is left out at 0).
        return cls(**{"text_share": 0.0, **{k: v for k, v in data.items() if k in known}})

    def fingerprint_data(self) -> dict[str, Any]:
        """Everything that decides the calibration tokens, with paths made absolute."""
        out = self.to_json()
        if self.path is not None:
            out["path"] = str(Path(self.path).expanduser().resolve())
        if self.trace_model is not None:
            out["trace_model"] = str(Path(self.trace_model).expanduser().resolve())
        return out

    def trace_writer(self) -> str | None:
        """Which model writes the traces, and with which engine (None without traces)."""
        if self.traces == "none":
            return None
        if self.trace_model is not None:
            who = f"the 4-bit export {self.trace_model}"
        elif self.traces == "bootstrap":
            who = "a 4-bit bootstrap export (a first awq pass without traces)"
        else:
            who = "the full-precision source model"
        return f"{who}, greedy, through {self.trace_engine}"

    def display(self) -> dict[str, Any]:
        """Rows of the model card's recipe table."""
        name = self.spec + (f" + {self.traces} traces (<= {self.trace_tokens} tokens)" if self.traces != "none" else "")
        writer = self.trace_writer()
        return {"calibration set": name, "samples requested": self.samples, "mix": list(self.mix) if self.mix else None,
                "longest sample / token cap": f"{self.seq_len} / {self.max_tokens}", "seed": self.seed,
                **({"least text-token share": f"{self.text_share:.0%}"} if self.text_share else {}),
                **({"traces written by": writer} if writer else {})}


def fingerprint(*parts: dict[str, Any]) -> str:
    """A short digest of JSON-able settings; equal settings give equal digests."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_recipe(export: Path) -> CalibrationRecipe | None:
    """The recipe saved in an export, or None when the export carries none (not made by `awq`).

    Raises ValueError when the report is there but unreadable or its recipe invalid.
    """
    path = Path(export) / REPORT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8")).get("calibration")
        return None if data is None else CalibrationRecipe.from_json(data)
    except (OSError, ValueError, AttributeError, TypeError, UserError) as error:
        raise ValueError(f"{path} is unreadable ({error})") from None


def read_source(export: Path) -> str | None:
    """The source model an export's report names, or None when there is no readable report."""
    try:
        source = json.loads((Path(export) / REPORT_NAME).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return None if source is None else str(source)


PROPAGATE_MODES = ("quantized", "float")
ROUNDING_MODES = ("nearest", "gptq")
# `--gptq-damp`'s default, a fraction of mean diag(H), chosen by held-out KL (BENCHMARKS.md, "GPTQ rounding").
DEFAULT_GPTQ_DAMP = 0.01


@dataclass(frozen=True)
class AWQSettings:
    """How each decoder layer (and, with `lm_head`, the output head) is searched and quantised, checked when built."""

    group_size: int = DEFAULT_GROUP_SIZE
    grid: int = 20
    clip: bool = True
    duo: bool = True
    propagate: str = "quantized"  # feed layer i+1 with layer i's quantised ("quantized") or float ("float") outputs
    balance: bool = True  # image and text tokens weigh half each in the searches
    lm_head: bool = False  # also AWQ lm_head, its scales folded into the final norm (quant/head.py)
    rounding: str = "nearest"  # codes by round-to-nearest, or by GPTQ's error feedback (quant/gptq.py)
    gptq_damp: float = DEFAULT_GPTQ_DAMP  # GPTQ's dampening, a fraction of mean diag(H)
    sensitivity: bool = False  # measure each linear group's sensitivity, for --keep-bf16 (quant/keep.py)

    def __post_init__(self) -> None:
        if self.propagate not in PROPAGATE_MODES:
            raise UserError(f"--propagate {self.propagate} is not one of {', '.join(PROPAGATE_MODES)}.")
        if self.rounding not in ROUNDING_MODES:
            raise UserError(f"--rounding {self.rounding} is not one of {', '.join(ROUNDING_MODES)}.")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) \
                or not math.isfinite(self.gptq_damp) or not 0 < self.gptq_damp <= 1:
            raise UserError(f"--gptq-damp {self.gptq_damp} must be a number above 0 and at most 1.")
        object.__setattr__(self, "gptq_damp", float(self.gptq_damp))
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise UserError(f"--group-size {self.group_size} must be positive.")
        if not isinstance(self.grid, int) or self.grid < 2:
            raise UserError(f"--grid {self.grid} must be a whole number of at least 2.")

    def to_json(self) -> dict[str, Any]:
        """The settings as the report records and the fingerprint reads them; `lm_head` only when on, and the
        rounding only when it is GPTQ's, so that exports without them are byte for byte what they were
        before the options existed."""
        out = asdict(self)
        for flag in ("lm_head", "sensitivity"):
            if not out[flag]:
                out.pop(flag)
        if self.rounding == "nearest":
            out.pop("rounding")
            out.pop("gptq_damp")
        return out

    def display(self) -> dict[str, Any]:
        out = {"group size": self.group_size, "grid": self.grid, "duo scaling": self.duo, "clipping": self.clip,
               "layer inputs": self.propagate, "image/text tokens balanced": self.balance}
        if self.rounding == "gptq":
            out["rounding"] = (f"GPTQ error feedback (static order, dampening {self.gptq_damp:g} of mean diag(H))"
                               + ("; lm_head round-to-nearest" if self.lm_head else ""))
        if self.lm_head:
            out["lm_head"] = "4-bit AWQ, scales folded into the final norm"
        if self.sensitivity:
            out["linear-group sensitivity"] = "measured per layer (layer-output error removed by keeping the group float)"
        return out
