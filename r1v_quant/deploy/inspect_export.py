"""Look inside an export folder: what is quantised and how, bytes per component, and whether vLLM will load it.

Only safetensors headers are read (never the tensor data), so inspecting a 38B export takes a
moment. Each check ends as pass, warn or fail with a sentence naming the problem; a report with
any failure is not servable as is.

The vLLM contract checked here (see design/AWQ-AND-VLLM.md):
  * config.json has a top-level `quantization_config`: quant_method awq, bits 4, a group size,
    zero_point true, version gemm; not only inside llm_config.
  * `modules_to_not_convert` covers every unquantised linear under vLLM's rule (a layer is skipped
    when any entry occurs as a substring of its prefix; vLLM fuses q/k/v into `qkv_proj` and gate/up
    into `gate_up_proj`, and current releases test each part's unfused name, older ones the fused
    prefix: model/kept.py), in particular the vision tower, mlp1 and any decoder linears kept in
    bf16 (`awq --keep-bf16`); it covers no quantised module, and every entry names some linear.
  * every quantised linear has qweight/qzeros/scales (int32/int32/float16) of consistent shapes for
    its (in, out, group), and no leftover `.weight`; q/k/v and gate/up agree, as vLLM fuses them.
  * the group size is one Marlin takes (-1/32/64/128), else a warning.
  * a 4-bit lm_head (`awq --quantize-lm-head`) goes with `"lm_head": true`, and only with it: vLLM's AWQ
    config then builds ParallelLMHead from language_model.lm_head.{qweight,qzeros,scales}; without the
    flag it builds a bf16 head and looks for lm_head.weight. Its weight loader copies the AWQ tensors
    whole into the head padded to 64 rows, so the vocabulary must be a multiple of 64, and the head
    must not be tied to embed_tokens.
  * the remote-code files that `auto_map` names exist (and the modules they import relatively).
  * the safetensors index agrees with the shards: every shard exists, every listed tensor is where
    the index says, every stored tensor is listed.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.deploy.checks import MAX_LISTED, Check, listing
from r1v_quant.deploy.plan import MARLIN_GROUP_SIZES
from r1v_quant.deploy.remote_code import check_remote_code
from r1v_quant.deploy.tensor_files import TensorInfo, read_tensors
from r1v_quant.errors import UserError
from r1v_quant.int4.format import (
    AWQ_DTYPE_NAMES,
    AWQ_LEAVES,
    PACK,
    VLLM_VOCAB_PADDING,
    AWQConfig,
    awq_shapes,
    group_width,
    head_is_tied,
    head_rows_fit_vllm,
    read_quantization_config,
)
from r1v_quant.model.config import R1VConfig, parse_config
from r1v_quant.model.footprint import (
    COMPONENT_LABELS,
    COMPONENTS,
    bytes_by_component,
    component_of,
    export_tensor_specs,
    model_dtype,
)
from r1v_quant.model.kept import is_skipped
from r1v_quant.model.layout import HEAD_MODULE, QUANT_LINEAR_SUFFIXES, checkpoint_shapes, is_quant_linear
from r1v_quant.model.topology import DECODER_LAYERS, FUSED_LINEARS
from r1v_quant.units import ST_TO_TORCH, TORCH_TO_ST

_FUSED = {leaf: fused for fused, leaves in FUSED_LINEARS.items() for leaf in leaves}


@dataclass
class ComponentReport:
    name: str
    label: str
    tensors: int
    bytes: int
    dtypes: dict[str, int]     # torch dtype name -> bytes
    planned_bytes: int | None = None


@dataclass
class InspectReport:
    path: str
    config: dict[str, Any]
    quantization_config: dict[str, Any] | None
    quantised: dict[str, Any]
    components: list[ComponentReport]
    dtypes: dict[str, int]
    total_bytes: int
    planned_total: int | None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---------------------------------------------------------------------------------------------
# Reading


def vllm_prefix(module: str) -> str:
    """The prefix vLLM gives a module: q/k/v become `qkv_proj`, gate/up become `gate_up_proj` in the LLM."""
    if module.startswith(DECODER_LAYERS):
        head, _, leaf = module.rpartition(".")
        return f"{head}.{_FUSED.get(leaf, leaf)}"
    return module


def _area(module: str) -> str:
    if module.startswith(DECODER_LAYERS):
        return "language_model decoder"
    return module.split(".", 1)[0] if not module.startswith("language_model.lm_head") else "lm_head"


# ---------------------------------------------------------------------------------------------
# The checks


def _check_quant_config(raw: dict[str, Any]) -> tuple[Check, AWQConfig | None, int | None]:
    """The top-level quantization_config, read by the format's one reader, against what vLLM loads."""
    top = raw.get("quantization_config")
    inner = (raw.get("llm_config") or {}).get("quantization_config")
    name = "quantization_config"
    if top is None:
        if inner is not None:
            return Check(name, "fail", "quantization_config sits only inside llm_config; put it at the top level of "
                                       "config.json, where vLLM and transformers look first."), None, None
        return Check(name, "fail", "config.json has no quantization_config, so vLLM would load this as an unquantised "
                                   "model."), None, None
    try:
        qc = read_quantization_config(top, "config.json")
    except UserError as e:
        return Check(name, "fail", str(e)), None, None
    problems = qc.problems()
    group = qc.stated("group_size")
    group = group if group is not None and (group > 0 or group == -1) else None
    if problems:
        return Check(name, "fail", "quantization_config: " + "; ".join(problems) + "."), qc, group
    if inner is not None and inner != top:
        return Check(name, "warn", "llm_config carries a different quantization_config from the top level; vLLM uses "
                                   "the top-level one, other tools may not."), qc, group
    return Check(name, "pass", f"top level: {qc.quant_method}, 4 bits, group size {group}, zero point, gemm."), qc, group


def _check_not_convert(qc: AWQConfig, unquantised: list[str], quantised: list[str]) -> Check:
    name = "modules_to_not_convert"
    # The reader gives None for a value that is not a list of module names: as good as missing.
    entries = qc.modules_to_not_convert or []
    # With an empty list vLLM adds vision_model by itself for this model family (and nothing else).
    effective = entries or ["vision_model"]
    # vLLM's rule, as current releases (each part of a fused module) and older ones (the fused prefix) apply it.
    uncovered = [m for m in unquantised if not is_skipped(m, effective)]
    overcovered = [(m, e) for m in quantised for e in effective if is_skipped(m, [e])]
    stray = [e for e in entries if not any(is_skipped(m, [e]) for m in (*unquantised, *quantised))]
    problems = []
    if uncovered:
        areas = ", ".join(f"{a}: {n}" for a, n in sorted(Counter(_area(m) for m in uncovered).items()))
        expose = (f"vLLM would expect 4-bit tensors for {len(uncovered)} unquantised linears ({areas}), "
                  f"e.g. {listing(uncovered)}")
        if not entries:
            problems.append("modules_to_not_convert is missing or empty, so vLLM skips only vision_model (which it adds "
                            f"by itself): {expose}; list [\"vision_model\", \"mlp1\"] explicitly")
        else:
            problems.append(f"modules_to_not_convert {entries} leaves uncovered: {expose}")
    elif not entries:
        problems.append("modules_to_not_convert is missing or empty; it works only because vLLM adds vision_model by "
                        'itself; list ["vision_model", "mlp1"] explicitly')
    if overcovered:
        m, e = overcovered[0]
        problems.append(f"entry {e!r} also matches {len(overcovered)} quantised modules, e.g. {m} (vLLM prefix "
                        f"{vllm_prefix(m)}), which vLLM would then load as unquantised")
    if stray:
        problems.append(f"{len(stray)} entries name no linear of the export, e.g. {listing(stray)}: the list and the "
                        "stored tensors disagree")
    if problems:
        return Check(name, "fail", "; ".join(problems) + ".")
    kept = [m for m in unquantised if is_quant_linear(m)]
    if kept:
        return Check(name, "pass", f"{len(entries)} entries cover all {len(unquantised)} unquantised linears, among "
                                   f"them {len(kept)} decoder linears kept in bf16, and none of the {len(quantised)} "
                                   "quantised ones.")
    return Check(name, "pass", f"{entries} covers all {len(unquantised)} unquantised linears and none of the "
                               f"{len(quantised)} quantised ones.")


def _check_quantised_where(quantised: list[str], head_declared: bool) -> Check:
    name = "vision encoder and projector unquantised"
    wrong = [m for m in quantised if not is_quant_linear(m) and not (head_declared and m == HEAD_MODULE)]
    if not wrong:
        what = "and lm_head " if HEAD_MODULE in quantised else ""
        return Check(name, "pass", f"only language-model decoder linears {what}carry 4-bit tensors.")
    by_area: dict[str, list[str]] = defaultdict(list)
    for m in wrong:
        by_area[_area(m)].append(m)
    parts = []
    for area, mods in sorted(by_area.items()):
        what = {"vision_model": "the vision encoder's linears were quantised", "mlp1": "the projector mlp1 was quantised",
                "lm_head": "lm_head was quantised without \"lm_head\": true in quantization_config"
                }.get(area, f"modules under {area} were quantised")
        parts.append(f"{what} ({len(mods)} modules with qweight, e.g. {listing(mods)})")
    return Check(name, "fail", "; ".join(parts) + "; r1v-quant keeps everything but the decoder linears (and, with "
                               "--quantize-lm-head, lm_head) in bf16.")


def _check_head(qc: AWQConfig | None, modules: dict[str, dict[str, TensorInfo]], cfg: R1VConfig | None) -> Check | None:
    """A 4-bit lm_head against vLLM's ParallelLMHead contract; None when neither the tensors nor the config quantise it."""
    name = "lm_head"
    declared = qc is not None and qc.lm_head
    leaves = modules.get(HEAD_MODULE, {})
    packed = any(leaf in leaves for leaf in AWQ_LEAVES)
    if not declared and not packed:
        return None
    problems = []
    if not declared:
        problems.append(f"lm_head carries 4-bit tensors but quantization_config has lm_head {declared!r}, not true, "
                        "so vLLM would build a bf16 lm_head and find no language_model.lm_head.weight")
    elif not packed:
        problems.append('quantization_config says "lm_head": true but lm_head has no qweight/qzeros/scales'
                        + (" (it has a bf16 weight)" if "weight" in leaves else "")
                        + ", so vLLM would find none of the 4-bit tensors it builds lm_head from")
    if cfg is not None and head_is_tied(cfg.llm):
        problems.append("tie_word_embeddings is true: a tied lm_head is embed_tokens, which vLLM never quantises")
    vocab = int(cfg.llm["vocab_size"]) if cfg is not None else None
    if vocab is not None and not head_rows_fit_vllm(vocab):
        problems.append(f"vocab_size {vocab} is not a multiple of {VLLM_VOCAB_PADDING}: vLLM pads lm_head to "
                        f"{-(-vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING} rows and its loader cannot place the "
                        "4-bit tensors in the padded head")
    if problems:
        return Check(name, "fail", "; ".join(problems) + ".")
    return Check(name, "pass", f'4-bit lm_head with "lm_head": true: vLLM\'s AWQ configs build ParallelLMHead from '
                               f"its qweight/qzeros/scales ({vocab} rows, a multiple of {VLLM_VOCAB_PADDING}).")


def _check_awq_tensors(modules: dict[str, dict[str, TensorInfo]], quantised: list[str], group: int | None,
                       cfg: R1VConfig | None) -> tuple[Check, int | None]:
    name = "AWQ tensors"
    problems: list[str] = []
    expected_shapes = _expected_linear_shapes(cfg) if cfg else {}
    inferred: set[int] = set()
    for m in quantised:
        leaves = modules[m]
        missing = [leaf for leaf in AWQ_LEAVES if leaf not in leaves]
        if missing:
            problems.append(f"{m} lacks {', '.join(missing)}")
            continue
        if "weight" in leaves:
            problems.append(f"{m} has both qweight and an unquantised weight")
        bad_dtype = [f"{leaf} is {ST_TO_TORCH.get(leaves[leaf].dtype, leaves[leaf].dtype)}"
                     for leaf in AWQ_LEAVES if ST_TO_TORCH.get(leaves[leaf].dtype) != AWQ_DTYPE_NAMES[leaf]]
        if bad_dtype:
            problems.append(f"{m}: {', '.join(bad_dtype)} (expected int32/int32/float16)")
            continue
        qw, qz, sc = (leaves[leaf].shape for leaf in AWQ_LEAVES)
        if len(qw) != 2 or len(qz) != 2 or len(sc) != 2:
            problems.append(f"{m}: qweight/qzeros/scales are not 2-D")
            continue
        in_f, out_f, groups = qw[0], sc[1], sc[0]
        if qw[1] * PACK != out_f or qz != (groups, qw[1]):
            problems.append(f"{m}: qweight {list(qw)}, qzeros {list(qz)} and scales {list(sc)} disagree "
                            f"(want [in, out/8], [in/g, out/8], [in/g, out])")
            continue
        if groups <= 0 or in_f % groups:
            problems.append(f"{m}: {groups} groups do not divide {in_f} inputs")
            continue
        g = in_f // groups
        inferred.add(-1 if groups == 1 else g)
        if group is not None and group_width(group, in_f) != g:
            problems.append(f"{m}: scales imply group size {g}, quantization_config says {group}")
        want = expected_shapes.get(m)
        if want is not None and (out_f, in_f) != want:
            problems.append(f"{m}: packs a {in_f}->{out_f} linear, the config says {want[1]}->{want[0]}")
        bias = leaves.get("bias")
        if bias is not None and bias.shape != (out_f,):
            problems.append(f"{m}.bias has shape {list(bias.shape)}, expected [{out_f}]")
    # vLLM fuses q/k/v and gate/up: their quantisation must agree within a layer.
    qset = set(quantised)
    for m in sorted(modules):
        if not is_quant_linear(m):
            continue
        head, _, leaf = m.rpartition(".")
        fused = FUSED_LINEARS.get(_FUSED.get(leaf, ""), (leaf,))
        if leaf != fused[0]:
            continue
        partners = fused[1:]
        states = {f"{head}.{p}" in qset for p in (leaf, *partners) if f"{head}.{p}" in modules}
        if len(states) > 1:
            problems.append(f"{head}: {leaf} and {'/'.join(partners)} differ in quantisation, but vLLM fuses them "
                            f"into {_FUSED[leaf]}")
    if not quantised:
        return Check(name, "fail", "no module has AWQ tensors (qweight/qzeros/scales): this is not a 4-bit export."), None
    if problems:
        return Check(name, "fail", f"{len(problems)} problems: " + "; ".join(problems[:MAX_LISTED])
                     + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "") + "."), None
    only = inferred.pop() if len(inferred) == 1 else None
    return Check(name, "pass", f"{len(quantised)} linears with qweight/qzeros/scales int32/int32/float16 of consistent "
                               f"shapes (group size {only if only is not None else group})."), only


def _expected_linear_shapes(cfg: R1VConfig) -> dict[str, tuple[int, int]]:
    out = {}
    for name, shape in checkpoint_shapes(cfg).items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2:
            out[module] = tuple(shape)
    return out


def _check_marlin(group: int | None, modules: dict[str, dict[str, TensorInfo]], quantised: list[str]) -> Check:
    name = "Marlin kernels"
    notes = []
    if group is not None and group not in MARLIN_GROUP_SIZES:
        notes.append(f"group size {group} is not one Marlin takes (-1/32/64/128): vLLM would fall back to the "
                     "fp16-only AWQ GEMM kernel, slower and prone to overflow on Qwen2")
    odd = []
    for m in quantised:
        qw = modules[m].get("qweight")
        if qw is None or len(qw.shape) != 2:
            continue
        in_f, out_f = qw.shape[0], qw.shape[1] * 8
        if out_f % 64 or in_f % 128:
            odd.append(f"{m} ({in_f}->{out_f})")
    if odd:
        notes.append(f"{len(odd)} linears have widths Marlin's tiles do not divide (outputs by 64, inputs by 128), "
                     f"e.g. {listing(odd)}")
    if notes:
        return Check(name, "warn", "; ".join(notes) + ".")
    return Check(name, "pass", f"group size {group} and every linear's widths suit vLLM's Marlin kernels.")


def _check_layout(cfg: R1VConfig, tensors: dict[str, TensorInfo], quantised: set[str], group: int | None) -> Check:
    """Every tensor the config implies is present with its shape; the unquantised ones in the model dtype."""
    name = "tensors match the config"
    dtype = TORCH_TO_ST[model_dtype(cfg)]
    expected: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for tname, shape in checkpoint_shapes(cfg).items():
        module, _, leaf = tname.rpartition(".")
        if leaf == "weight" and module in quantised:
            if group is None:
                for q in AWQ_LEAVES:
                    expected[f"{module}.{q}"] = ((), None)   # shapes already checked under "AWQ tensors"
                continue
            out_f, in_f = shape
            try:
                leaves = awq_shapes(out_f, in_f, group)
            except UserError:
                continue  # reported under "AWQ tensors"
            for q, (qshape, qdtype) in leaves.items():
                expected[f"{module}.{q}"] = (qshape, TORCH_TO_ST[qdtype])
        else:
            expected[tname] = (tuple(shape), dtype)
    missing = [t for t in expected if t not in tensors]
    extra = [t for t in tensors if t not in expected]
    wrong_shape = [f"{t} {list(tensors[t].shape)} (want {list(s)})" for t, (s, _) in expected.items()
                   if t in tensors and s and tensors[t].shape != s]
    other_dtype = sorted({f"{ST_TO_TORCH.get(tensors[t].dtype, tensors[t].dtype)}" for t, (_, d) in expected.items()
                          if t in tensors and d == dtype and tensors[t].dtype != dtype})
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config implies are missing, e.g. {listing(missing)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors have the wrong shape, e.g. {listing(wrong_shape)}")
    if problems:
        return Check(name, "fail", "; ".join(problems) + ".")
    notes = []
    if extra:
        notes.append(f"{len(extra)} tensors the config does not imply, e.g. {listing(extra)} (vLLM may reject them)")
    if other_dtype:
        notes.append(f"unquantised tensors stored as {', '.join(other_dtype)} while config.json says {model_dtype(cfg)}")
    if notes:
        return Check(name, "warn", "; ".join(notes) + ".")
    return Check(name, "pass", f"all {len(expected)} tensors the config implies are present, unquantised ones in "
                               f"{model_dtype(cfg)}.")


# ---------------------------------------------------------------------------------------------
# The report


def inspect(folder: str | Path) -> InspectReport:
    """Inspect an export folder; raises UserError only when it is not a model folder at all."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; inspect takes an export folder.")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no config.json, so it is not a model folder.")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        parse_config(raw, str(cfg_path))  # the config reader's own sentence for a config that is no object

    checks: list[Check] = []
    cfg: R1VConfig | None
    try:
        cfg = parse_config(raw, str(cfg_path))
        checks.append(Check("config", "pass", f"{raw.get('model_type')} with a Qwen2 LLM of {cfg.num_layers} layers."))
    except UserError as e:
        cfg = None
        checks.append(Check("config", "fail", str(e)))

    tensors, index_check = read_tensors(folder)
    # Missing or damaged shard files explain every tensor check after them, so they are reported first.
    checks.append(index_check)
    modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    for t, info in tensors.items():
        module, _, leaf = t.rpartition(".")
        modules[module][leaf] = info
    quantised = sorted(m for m, leaves in modules.items() if any(q in leaves for q in AWQ_LEAVES))
    unquantised_linears = sorted(
        m for m, leaves in modules.items()
        if m not in quantised and "weight" in leaves and len(leaves["weight"].shape) == 2
        and component_of(m + ".weight") not in ("embeddings", "lm_head")
    )

    qc_check, qc, group = _check_quant_config(raw)
    checks.append(qc_check)
    if qc is not None:
        checks.append(_check_not_convert(qc, unquantised_linears, quantised))
    checks.append(_check_quantised_where(quantised, qc is not None and qc.lm_head))
    head_check = _check_head(qc, modules, cfg)
    if head_check is not None:
        checks.append(head_check)
    awq_check, inferred_group = _check_awq_tensors(modules, quantised, group, cfg)
    checks.append(awq_check)
    group_used = group if group is not None else inferred_group
    if quantised:
        checks.append(_check_marlin(group_used, modules, quantised))
    checks.append(check_remote_code(folder, raw))
    if cfg is not None and tensors:
        checks.append(_check_layout(cfg, tensors, set(quantised), group_used))

    # Bytes by component, and the plan's prediction for the same config and group size.
    comp_bytes: dict[str, int] = defaultdict(int)
    comp_count: Counter = Counter()
    comp_dtypes: dict[str, Counter] = defaultdict(Counter)
    all_dtypes: Counter = Counter()
    for t, info in tensors.items():
        c = component_of(t)
        comp_bytes[c] += info.nbytes
        comp_count[c] += 1
        dname = ST_TO_TORCH.get(info.dtype, info.dtype)
        comp_dtypes[c][dname] += info.nbytes
        all_dtypes[dname] += info.nbytes
    planned: dict[str, int] | None = None
    if cfg is not None and group_used is not None:
        try:
            kept = frozenset(m for m in unquantised_linears if is_quant_linear(m))
            planned = bytes_by_component(export_tensor_specs(cfg, group_used, lm_head=HEAD_MODULE in quantised, kept=kept))
        except UserError:
            planned = None
    names = [c for c in COMPONENTS if comp_bytes.get(c) or (planned or {}).get(c)] + sorted(
        c for c in comp_bytes if c not in COMPONENTS)
    components = [ComponentReport(c, COMPONENT_LABELS.get(c, c), comp_count[c], comp_bytes.get(c, 0),
                                  dict(comp_dtypes[c]), None if planned is None else planned.get(c, 0)) for c in names]
    total = sum(comp_bytes.values())
    planned_total = None if planned is None else sum(planned.values())
    if planned is not None and tensors:
        off = [f"{c.name} {c.bytes - c.planned_bytes:+,d} B" for c in components if c.planned_bytes != c.bytes]
        if off:
            checks.append(Check("sizes match the plan", "warn", f"tensor bytes differ from `r1v-quant plan`'s prediction "
                                                                 f"for this config: {listing(off)}."))
        else:
            checks.append(Check("sizes match the plan", "pass", f"tensor bytes equal `r1v-quant plan`'s prediction, "
                                                                 f"{total:,d} B."))

    by_suffix = Counter(m.rsplit(".", 1)[1] for m in quantised)
    layers = sorted({int(m.split(".")[3]) for m in quantised if is_quant_linear(m)})
    quant_summary = {
        "format": "AutoAWQ GEMM (qweight/qzeros int32, scales float16)" if quantised else None,
        "bits": None if qc is None else qc.bits,
        "group_size": group_used,
        "zero_point": None if qc is None else qc.stated("zero_point"),
        "modules": len(quantised),
        "by_kind": dict(sorted(by_suffix.items())),
        "decoder_layers": len(layers),
        "standard_linears": [s.rsplit(".", 1)[1] for s in QUANT_LINEAR_SUFFIXES],
        "outside_decoder": [m for m in quantised if not is_quant_linear(m)][:20],
        "unquantised_linears": dict(sorted(Counter(_area(m) for m in unquantised_linears).items())),
        "kept_bf16": [m for m in unquantised_linears if is_quant_linear(m)],
    }
    summary: dict[str, Any] = {"model_type": raw.get("model_type"), "architectures": raw.get("architectures"),
                               "torch_dtype": raw.get("torch_dtype") or raw.get("dtype")}
    if cfg is not None:
        summary.update({
            "llm": {k: cfg.llm.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads", "intermediate_size", "vocab_size")},
            "vision": {"hidden_size": cfg.vision.hidden_size, "num_hidden_layers": cfg.vision.num_hidden_layers,
                       "intermediate_size": cfg.vision.intermediate_size},
        })
    raw_qc = raw.get("quantization_config") if isinstance(raw.get("quantization_config"), dict) else None
    return InspectReport(str(folder), summary, raw_qc, quant_summary, components, dict(all_dtypes), total, planned_total, checks)
