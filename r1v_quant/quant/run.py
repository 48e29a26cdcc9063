"""`awq` end to end: calibration data -> layer-by-layer AWQ -> an export folder that appears whole."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import Checkpoint, resolve_model
from r1v_quant.model.config import load_config
from r1v_quant.model.layout import check_checkpoint_shapes
from r1v_quant.output import check_out_dir, staged_dir
from r1v_quant.quant.export import copy_side_files, export_config, model_card, side_files, write_tensors
from r1v_quant.quant.pipeline import AWQSettings, run_awq, validate_group_size
from r1v_quant.quant.run_guard import guarded, work_path
from r1v_quant.quant.space import check_space, run_needs
from r1v_quant.quant.workdir import LayerReport, WorkFolder
from r1v_quant.replace_guard import check_replaceable


@dataclass
class CalibChoice:
    spec: str = "builtin"
    calib_path: Path | None = None
    mix: list[float] | None = None
    traces: str = "none"  # "none" or "self"
    max_trace_tokens: int = 1024
    trace_cache: Path | None = None


@dataclass
class AWQResult:
    out: Path
    layers: list[LayerReport]
    samples: int
    tokens: int
    image_token_share: float
    seconds: float
    kl: dict | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        awq = [r.rel_err_awq for r in self.layers]
        rtn = [r.rel_err_rtn for r in self.layers]
        out = {
            "calibration samples": self.samples,
            "calibration tokens": self.tokens,
            "image-token share": f"{self.image_token_share:.1%}",
            "mean relative layer-output error, AWQ": f"{sum(awq) / len(awq):.4f}",
            "mean relative layer-output error, round-to-nearest": f"{sum(rtn) / len(rtn):.4f}",
        }
        if self.kl:
            out.update({f"held-out {k}": v for k, v in self.kl.items()})
        return out


def calib_paths(choice: CalibChoice) -> list[Path]:
    """Local files and folders the calibration reads, which `--force` must never delete."""
    paths = [choice.calib_path] if choice.calib_path else []
    for part in choice.spec.split("+"):
        kind, _, rest = part.partition(":")
        if kind == "text" and rest:
            paths.append(Path(rest).expanduser())
        elif not rest and Path(part).expanduser().exists():
            paths.append(Path(part).expanduser())
    return paths


def load_samples(choice: CalibChoice, settings: AWQSettings, model_dir: Path, device: str | None, progress=None):
    from r1v_quant.calib.sets import load_calibration

    samples = load_calibration(choice.spec, n=settings.samples, seed=settings.seed,
                               calib_path=choice.calib_path, mix=choice.mix)
    if choice.traces == "self":
        from r1v_quant.calib.traces import add_self_traces

        samples = add_self_traces(samples, model_dir, choice.max_trace_tokens, cache_dir=choice.trace_cache, device=device,
                                  progress=progress)
    elif choice.traces != "none":
        raise UserError(f"--traces {choice.traces} is not one of none, self.")
    return samples


@guarded  # locks on --out and the work folder; one sentence on a signal or a failed write
def quantize_checkpoint(
    model: str,
    out: Path,
    settings: AWQSettings = AWQSettings(),
    calib: CalibChoice = CalibChoice(),
    force: bool = False,
    device: str | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    offload_dir: Path | None = None,
    offload_above: int = 8 * 1024**3,
    keep_work: bool = False,
    max_shard_bytes: int = 5 * 1000**3,
    progress: Callable[[int, int, LayerReport | None], None] | None = None,
    stop_after: int | None = None,
    kl_check: Callable[[Path, Path], dict] | None = None,
    trace_progress: Callable[[int, int], None] | None = None,
) -> AWQResult:
    from r1v_quant.calib.encode import embed_encoded, encode_samples, image_token_share
    from r1v_quant.model.r1v import load_front, load_tokenizer, pick_device

    start = time.perf_counter()
    src = resolve_model(model)
    cfg = load_config(src)
    if cfg.quantization:
        raise UserError(f"{src} is already quantised ({cfg.quantization.get('quant_method')}); pass the full-precision checkpoint.")
    ckpt = Checkpoint(src)
    check_checkpoint_shapes(cfg, ckpt)
    side_files(src)  # a link out of the checkpoint is refused before any work
    validate_group_size(cfg, settings.group_size)
    out = Path(out)
    check_out_dir(out, force, source=src)
    work_folder = work_path(out, work_dir)
    protected = {"source checkpoint": src, "offload folder": offload_dir, "work folder": work_folder,
                 **{f"calibration data {p}": p for p in calib_paths(calib)}}
    check_replaceable(out, protected)
    check_space(run_needs(cfg, settings.group_size, out, work_folder, offload_dir, offload_above, settings.max_tokens,
                          resume))
    dev = pick_device(device)
    tok = load_tokenizer(src)

    samples = load_samples(calib, settings, src, device, trace_progress)
    encoded = encode_samples(samples, cfg, tok, settings.seq_len, settings.max_tokens)
    tokens = sum(len(e.ids) for e in encoded)

    def first_inputs():
        front = load_front(cfg, ckpt, dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
        front.img_context_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        context = front.img_context_id
        for enc, x in zip(encoded, embed_encoded(front, encoded, dev)):
            yield x, torch.tensor(enc.ids) == context

    work = WorkFolder(work_folder, settings.fingerprint(src, calib.spec))
    reports = run_awq(cfg, ckpt, first_inputs, settings, work, dev, resume=resume, offload_dir=offload_dir,
                      offload_above=offload_above,
                      progress=progress, stop_after=stop_after)
    result = AWQResult(out, reports, len(encoded), tokens, image_token_share(encoded, tok), time.perf_counter() - start)

    recipe = {
        "source": str(model),
        "calibration set": calib.spec + (f" + self traces (<= {calib.max_trace_tokens} tokens)" if calib.traces == "self" else ""),
        "samples requested": settings.samples,
        "mix": calib.mix,
        "samples / tokens": f"{len(encoded)} / {tokens}",
        "group size": settings.group_size,
        "grid": settings.grid,
        "duo scaling": settings.duo,
        "clipping": settings.clip,
        "layer inputs": settings.propagate,
        "image/text tokens balanced": settings.balance,
        "seed": settings.seed,
    }
    check_replaceable(out, protected)
    with staged_dir(out, force=force) as tmp:
        write_tensors(ckpt, work.layer_file, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(export_config(cfg, settings.group_size), indent=2) + "\n")
        copy_side_files(src, tmp)
        if kl_check is not None:
            result.kl = kl_check(src, tmp)
        (tmp / "README.md").write_text(model_card(str(model), cfg, recipe, result.summary()))
        # Only deterministic facts go into the export, so equal inputs give byte-identical folders.
        layers = [{"index": r.index, "rel_err_awq": r.rel_err_awq, "rel_err_rtn": r.rel_err_rtn, "alphas": r.alphas}
                  for r in reports]
        (tmp / "r1v_quant_report.json").write_text(json.dumps(
            {"recipe": recipe, "summary": result.summary(), "layers": layers}, indent=2) + "\n")
    if not keep_work:
        import shutil

        shutil.rmtree(work.path, ignore_errors=True)
    return result
