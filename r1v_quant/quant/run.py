"""`awq` end to end: calibration data -> layer-by-layer AWQ -> an export folder that appears whole."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import Checkpoint, resolve_model
from r1v_quant.model.config import load_config
from r1v_quant.model.identity import model_identity
from r1v_quant.model.layout import check_checkpoint_shapes
from r1v_quant.output import check_out_dir, staged_dir
from r1v_quant.quant.chunks import available_host_bytes, default_budget
from r1v_quant.quant.compute import choose_compute_dtype, dtype_name
from r1v_quant.quant.export import (
    copy_side_files,
    export_config,
    is_export_file,
    kept_part,
    model_card,
    report_source,
    side_files,
    write_tensors,
)
from r1v_quant.quant.keep import KeepRequest
from r1v_quant.quant.memory_model import auto_spill_above, calibration_tokens, config_plan, predict
from r1v_quant.quant.pipeline import run_awq, validate_group_size
from r1v_quant.quant.recipe import REPORT_NAME, AWQSettings, CalibrationRecipe, fingerprint
from r1v_quant.quant.run_guard import guarded, kept_note, work_path
from r1v_quant.quant.space import check_space, run_needs
from r1v_quant.quant.workdir import SPILL, LayerReport, WorkFolder, check_work_folder, remove_work_folder
from r1v_quant.replace_guard import check_export_conflicts, check_replaceable


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
    head: LayerReport | None = None   # lm_head's search, with --quantize-lm-head
    kept_files: list[str] = field(default_factory=list)  # what the user had added to an earlier export at --out

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
        raised = [f"{r.index}:{name}={d:g}" for r in self.layers for name, d in r.gptq_damp.items()]
        if raised:
            out["GPTQ dampening raised (layer:linear=dampening)"] = ", ".join(raised)
        if self.head is not None:
            out["relative logit error of lm_head, AWQ / round-to-nearest"] = (
                f"{self.head.rel_err_awq:.4f} / {self.head.rel_err_rtn:.4f}")
        if self.kl:
            out.update({f"held-out {k}": v for k, v in self.kl.items()})
        return out


def calib_paths(choice: CalibrationRecipe) -> list[Path]:
    """Local files and folders the calibration reads, which `--force` must never delete."""
    paths = [choice.path] if choice.path else []
    for part in choice.spec.split("+"):
        kind, _, rest = part.partition(":")
        if kind == "text" and rest:
            paths.append(Path(rest).expanduser())
        elif not rest and Path(part).expanduser().exists():
            paths.append(Path(part).expanduser())
    return paths


def load_samples(recipe: CalibrationRecipe, model_dir: Path, device: str | None, trace_cache: Path | None = None,
                 progress=None, parallel=None, before_load=None):
    """The calibration samples, with traces from `model_dir` (the model writing them) when the recipe asks."""
    from r1v_quant.calib.sets import load_calibration

    samples = load_calibration(recipe.spec, n=recipe.samples, seed=recipe.seed, calib_path=recipe.path, mix=recipe.mix)
    if recipe.traces != "none":
        from r1v_quant.calib.traces import add_self_traces

        samples = add_self_traces(samples, model_dir, recipe.trace_tokens, cache_dir=trace_cache, device=device,
                                  progress=progress, engine=recipe.trace_engine, parallel=parallel,
                                  before_load=before_load)
    return samples


def weight_file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def trace_check(cfg, calib: CalibrationRecipe, trace_dir: Path | None, dev: torch.device, budget: int,
                group_size: int, parallel=None) -> Callable[[], None]:
    """The memory pre-check of the trace phase, run before the trace model is loaded.

    `trace_dir` None: the bootstrap export not yet made (its size predicted from the config)."""
    from r1v_quant.quant import trace_plan as tp

    def check() -> None:
        job = tp.TraceJob(calib.samples, calib.seq_len, calib.trace_tokens)
        four_bit = trace_dir is None or bool(load_config(trace_dir).quantization)
        if trace_dir is None:
            weights = tp.weight_totals(cfg, group_size)["export"]
        elif four_bit:
            weights = weight_file_bytes(trace_dir)
        else:
            weights = tp.weight_totals(cfg, group_size)["source"]
        gpu_bytes = None
        if calib.trace_engine == "vllm" and dev.type == "cuda":
            from r1v_quant.deploy.serve import gpu_memory

            found = gpu_memory()
            gpu_bytes = found[0] if found else None
        gpus = parallel.gpus if parallel is not None else 1
        path = tp.runtime_path(cfg, job, calib.trace_engine, weights, four_bit, budget, gpus=gpus, gpu_bytes=gpu_bytes,
                               group_size=group_size)
        from r1v_quant.units import human_bytes

        where = (f"{gpus} x {human_bytes(gpu_bytes)} GPU" if gpu_bytes is not None and calib.trace_engine == "vllm"
                 else f"the {dev.type} budget of {human_bytes(budget)}")
        tp.check_trace_phase(path, job, where)

    return check


def bootstrap_settings(cfg, settings: AWQSettings, calib: CalibrationRecipe, dev: torch.device) -> AWQSettings:
    """The first pass's settings: the run's, with a 4-bit lm_head when vLLM serves the bootstrap on a GPU
    whose recipe from the plan needs one to hold a trace."""
    from dataclasses import replace

    if settings.lm_head or calib.trace_engine != "vllm" or dev.type != "cuda":
        return settings
    from r1v_quant.deploy.plan import make_plan
    from r1v_quant.deploy.serve import gpu_memory

    found = gpu_memory()
    if found is None:
        return settings
    recipe = make_plan(cfg, group_size=settings.group_size, gpu_mems=[("GPU", found[0])]).cards[0].best
    if "lm-head-4bit" not in recipe.levers:
        return settings
    try:
        validate_group_size(cfg, settings.group_size, True)
    except UserError:  # a vocabulary that does not pack: the bootstrap keeps its bf16 lm_head
        return settings
    return replace(settings, lm_head=True)


def bootstrap_export(model: str, out: Path, settings: AWQSettings, calib: CalibrationRecipe, **kwargs) -> Path:
    """The first pass of `--traces bootstrap`: `awq` without traces, into a folder beside the work folder."""
    from dataclasses import replace

    first = replace(calib, traces="none", trace_model=None, trace_engine="transformers")
    result = quantize_checkpoint(model, out, settings, first, force=True, **kwargs)
    return Path(result.out)


def act_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def check_fits(cfg, calib: CalibrationRecipe, group_size: int, budget: int, dev: torch.device, dtype: torch.dtype,
               spill_above: int, lm_head: bool = False, gptq: bool = False) -> None:
    """Refuse, before any layer loads, settings whose predicted peaks cannot fit the device or the host."""
    from r1v_quant.quant.memory_model import largest_within_host

    tokens = calibration_tokens(calib.samples, calib.seq_len, calib.max_tokens)
    kw = dict(device=dev.type, act_bytes=act_bytes(dtype), seq_len=calib.seq_len, group_size=group_size,
              spill_above=spill_above, lm_head=lm_head, gptq=gptq)
    pred = predict(cfg, tokens, budget, **kw)
    if budget < pred.min_budget:
        need = -(-pred.min_budget // 2**20)
        what = ("lm_head's AWQ pass, which needs at least {}MiB (its weight twice and a 16-token chunk of logits)"
                if pred.min_budget_phase == "lm_head" else
                "one decoder layer's AWQ pass, which needs at least {}MiB (the layer's weights twice, a 16-token chunk "
                "and one --seq-len sample{})").format(
                    need, "; with --rounding gptq, three float32 matrices of the widest linear's input width squared"
                    if gptq else "")
        raise UserError(f"--max-device-memory {budget // 2**20}MiB cannot hold {what}; pass --max-device-memory "
                        f"{need}MiB or more, or use a larger device.")
    host = available_host_bytes()
    if pred.host_peak > host:
        fit = largest_within_host(cfg, budget, host, ceiling=tokens, **kw)
        raise UserError(f"{tokens:,d} calibration tokens need about {pred.host_peak / 2**30:.1f} GiB of host memory "
                        f"but {host / 2**30:.1f} GiB is available; pass --max-tokens {max(fit, 16)} or fewer "
                        f"(or --samples / --seq-len that give at most that many).")


@guarded  # locks on --out and the work folder; one sentence on a signal or a failed write
def quantize_checkpoint(
    model: str,
    out: Path,
    settings: AWQSettings = AWQSettings(),
    calib: CalibrationRecipe = CalibrationRecipe(),
    force: bool = False,
    device: str | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    offload_dir: Path | None = None,
    offload_above: int | None = None,
    keep_work: bool = False,
    max_shard_bytes: int = 5 * 1000**3,
    progress: Callable[[int, int, LayerReport | None], None] | None = None,
    stop_after: int | None = None,
    kl_check: Callable[[Path, Path], dict] | None = None,
    trace_progress: Callable[[int, int], None] | None = None,
    trace_cache: Path | None = None,
    max_device_memory: int | None = None,
    compute_dtype: str = "auto",
    trace_parallel=None,
    note: Callable[[str], None] | None = None,
    keep: KeepRequest | None = None,
) -> AWQResult:
    from r1v_quant.calib.encode import composition, embed_encoded, image_token_share
    from r1v_quant.calib.text_share import encode_with_text_share, fill_source
    from r1v_quant.model.r1v import load_front, load_tokenizer, pick_device

    start = time.perf_counter()
    src = resolve_model(model)
    cfg = load_config(src)
    if cfg.quantization:
        raise UserError(f"{src} is already quantised ({cfg.quantization.get('quant_method')}); pass the full-precision checkpoint.")
    ckpt = Checkpoint(src)
    check_checkpoint_shapes(cfg, ckpt)
    source_identity = model_identity(src)  # before any work: a resumed run must find the source as it was
    side_files(src)  # a link out of the checkpoint is refused before any work
    validate_group_size(cfg, settings.group_size, settings.lm_head)
    if keep is not None and keep.measures and not settings.sensitivity:
        from dataclasses import replace

        settings = replace(settings, sensitivity=True)
    if keep is not None and keep.mode == "auto":
        from r1v_quant.quant.keep import resolve

        resolve(keep, cfg, settings.group_size, {})  # a card without room even for the context is refused before work
    out = Path(out)
    work_folder = work_path(out, work_dir)
    inputs = {"source checkpoint": src, **{f"calibration data {p}": p for p in calib_paths(calib)}}
    check_work_folder(work_folder, out, inputs)
    check_out_dir(out, force, source=src)
    # Activations between layers spill past a share of the free RAM, by default into the work folder.
    offload_dir = offload_dir or work_folder / SPILL
    offload_above = auto_spill_above(available_host_bytes()) if offload_above is None else offload_above
    protected = {**inputs, "offload folder": offload_dir, "work folder": work_folder,
                 **({"trace model": resolve_model(calib.trace_model)} if calib.trace_model else {})}
    check_replaceable(out, protected)
    check_export_conflicts(out, [p.name for p in side_files(src)], is_export_file)
    needs = run_needs(cfg, settings.group_size, out, work_folder, offload_dir, offload_above, calib.max_tokens, resume)
    if keep is not None:
        from dataclasses import replace as with_bytes

        from r1v_quant.quant.keep import most_extra_bytes

        extra = most_extra_bytes(keep, cfg, settings.group_size)
        needs = [with_bytes(n, bytes=n.bytes + extra) if n.label == "export" else n for n in needs]
    check_space(needs)
    dev = pick_device(device)
    dtype, dtype_why = choose_compute_dtype(compute_dtype, dev)
    budget = default_budget(dev) if max_device_memory is None else max_device_memory
    check_fits(cfg, calib, settings.group_size, budget, dev, dtype, offload_above, settings.lm_head,
               settings.rounding == "gptq")
    tok = load_tokenizer(src)

    trace_dir = resolve_model(calib.trace_model) if calib.trace_model else (src if calib.traces == "self" else None)
    boot = None
    if calib.traces == "bootstrap" and trace_dir is None:
        # refused before the first pass, not after it: the bootstrap's size is known from the config
        trace_check(cfg, calib, None, dev, budget, settings.group_size, trace_parallel)()
        boot = Path(f"{work_folder}.bootstrap")
        if note is not None:
            note(f"bootstrap: a first awq pass without traces, into {boot}")
        trace_dir = bootstrap_export(model, boot, bootstrap_settings(cfg, settings, calib, dev), calib, device=device,
                                     offload_dir=None,
                                     offload_above=offload_above, max_shard_bytes=max_shard_bytes, progress=progress,
                                     max_device_memory=max_device_memory, compute_dtype=compute_dtype)
    if calib.traces != "none" and note is not None:
        note(f"traces written by {calib.trace_writer()}" + (f" ({trace_dir})" if trace_dir != src else ""))
    try:
        samples = load_samples(calib, trace_dir or src, device, trace_cache, trace_progress, trace_parallel,
                               trace_check(cfg, calib, trace_dir, dev, budget, settings.group_size, trace_parallel))
    finally:
        if boot is not None and not keep_work:
            import shutil

            shutil.rmtree(boot, ignore_errors=True)
    fill = (fill_source(calib.spec, calib.seed, calib.samples, calib.path, {s.id for s in samples})
            if calib.text_share else None)
    encoded, stubs, share_note = encode_with_text_share(samples, fill, cfg, tok, calib.seq_len, calib.max_tokens,
                                                        calib.text_share)
    tokens = sum(len(e.ids) for e in encoded)

    def first_inputs():
        front = load_front(cfg, ckpt, dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
        front.img_context_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        context = front.img_context_id
        for enc, x in zip(encoded, embed_encoded(front, encoded, dev)):
            yield x, torch.tensor(enc.ids) == context

    # The whole recipe goes into the fingerprint: a work folder made from other tokens is not resumed.
    run_id = fingerprint({"model": str(Path(src).resolve()), "compute dtype": dtype_name(dtype)}, settings.to_json(),
                         calib.fingerprint_data())
    work = WorkFolder(work_folder, run_id, source=source_identity)
    try:
        reports = run_awq(cfg, ckpt, first_inputs, settings, work, dev, resume=resume, offload_dir=offload_dir,
                          offload_above=offload_above, dtype=dtype,
                          progress=progress, stop_after=stop_after, max_device_memory=max_device_memory)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"{dev.type} ran out of memory within a budget of {budget / 2**30:.1f} GiB (fragmentation or "
                        f"another process); lower --max-device-memory (e.g. to {0.8 * budget / 2**30:.1f}GiB) or "
                        f"--max-tokens, then rerun with --resume: {kept_note(work.path, cfg.num_layers)}.") from None
    head = reports.pop() if settings.lm_head else None
    result = AWQResult(out, reports, len(encoded), tokens, image_token_share(encoded, tok), time.perf_counter() - start,
                       head=head)
    result.extra.update({f"calibration {k}": v for k, v in composition(encoded, tok, stubs).items()})
    result.extra["calibration text share"] = share_note.line()
    result.extra["compute dtype"] = f"{dtype_name(dtype)} ({dtype_why})"
    if calib.traces != "none":
        result.extra["traces written by"] = calib.trace_writer()
    plan = config_plan(cfg, tokens, budget, act_bytes(dtype))
    result.extra["device budget"] = (
        f"{budget / 2**30:.1f} GiB: chunks of {plan.chunk_tokens} tokens, calibration tensors "
        f"{'on the device' if plan.stored_on_device else 'in host memory'}, down_proj inputs "
        f"{'kept' if plan.keep_down_inputs else 'rebuilt per chunk'}")

    kept_groups, kept_info, not_convert = choose_kept(keep, cfg, settings, reports, work)
    if kept_info:
        from r1v_quant.units import human_bytes

        result.extra["kept in bf16"] = (f"{len(kept_groups)} groups, {kept_info['params_share']:.1%} of the decoder "
                                        f"linears, +{human_bytes(kept_info['extra_bytes'])}")
    card = {"source": str(model), **calib.display(), **settings.display()}
    if kept_info:
        card["kept in bf16"] = kept_info["request"]
    check_replaceable(out, protected)
    kept: list[str] = []
    with staged_dir(out, force=force, owned=is_export_file, kept=kept) as tmp:
        write_tensors(ckpt, work.layer_file, tmp, max_shard_bytes,
                      head=load_file(str(work.head_file)) if settings.lm_head else None,
                      kept=kept_modules(kept_groups))
        (tmp / "config.json").write_text(json.dumps(export_config(cfg, settings.group_size, settings.lm_head,
                                                                  not_convert), indent=2) + "\n")
        copy_side_files(src, tmp)
        if kl_check is not None:
            result.kl = kl_check(src, tmp)
        kept_text = kept_part(kept_info.get("groups", []), kept_info.get("params_share", 0.0), not_convert or [])
        (tmp / "README.md").write_text(model_card(str(model), cfg, card, result.summary(), settings.lm_head, kept_text,
                                                  src_dir=src))
        # Only deterministic facts go into the export, so equal inputs give byte-identical folders.
        layers = [{"index": r.index, "rel_err_awq": r.rel_err_awq, "rel_err_rtn": r.rel_err_rtn, "alphas": r.alphas,
                   **({"gptq_damp_raised": r.gptq_damp, "dead_inputs": r.gptq_dead} if settings.rounding == "gptq" else {}),
                   **({"sensitivity": r.sensitivity} if r.sensitivity else {})}
                  for r in reports]
        report = {"source": report_source(str(model), cfg.raw), "calibration": calib.to_json(), "awq": settings.to_json(),
                  "summary": result.summary(), "layers": layers}
        if calib.traces != "none":
            report["traces"] = {"written by": calib.trace_writer(), "engine": calib.trace_engine,
                                "model": ("bootstrap" if calib.traces == "bootstrap" and not calib.trace_model
                                          else calib.trace_model or "source")}
        if kept_info:
            report["kept_bf16"] = kept_info
        if head is not None:
            report["lm_head"] = {"rel_err_awq": head.rel_err_awq, "rel_err_rtn": head.rel_err_rtn, "alphas": head.alphas}
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    result.kept_files = kept
    if not keep_work:
        remove_work_folder(work.path)
    return result


def choose_kept(keep: KeepRequest | None, cfg, settings: AWQSettings, reports: list[LayerReport], work: WorkFolder
                ) -> tuple[list[tuple[int, str]], dict, list[str] | None]:
    """The groups an export keeps in bf16, the report's summary of the choice, and `modules_to_not_convert`
    (None for the default list). Checks that every kept layer's work file holds the scales it needs."""
    from r1v_quant.model.kept import keep_entries
    from r1v_quant.model.layout import MODULES_TO_NOT_CONVERT
    from r1v_quant.quant.keep import check_scales_present, resolve

    if keep is None:
        return [], {}, None
    sensitivity = {r.index: r.sensitivity for r in reports}
    groups, info = resolve(keep, cfg, settings.group_size, sensitivity)
    for i in sorted({i for i, _ in groups}):
        check_scales_present(load_file(str(work.layer_file(i))), str(work.layer_file(i)))
    return groups, info, keep_entries(list(MODULES_TO_NOT_CONVERT), groups)


def kept_modules(groups: list[tuple[int, str]]) -> frozenset[str]:
    from r1v_quant.model.kept import group_modules

    return frozenset(m for i, g in groups for m in group_modules(i, g))
