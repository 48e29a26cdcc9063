"""Writing an AWQ export: the source checkpoint's names and bytes, with quantised linears in AutoAWQ GEMM form."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file

from r1v_quant.errors import UserError
from r1v_quant.int4.format import AWQ_LEAVES, quantization_config
from r1v_quant.model.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, ShardWriter, is_inside
from r1v_quant.model.config import R1VConfig
from r1v_quant.model.layout import HEAD_MODULE, MODULES_TO_NOT_CONVERT, is_quant_linear

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
# Weights, indexes and formats we rewrite or that must not travel with an export.
_SKIP_SIDE = {"config.json", INDEX_NAME, SINGLE_NAME, "README.md", ".gitattributes"}
_SKIP_SUFFIX = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


# The files of an export besides the side files it copies from its source; an earlier export's
# files by these names are replaced by `awq --force`, anything else in the folder is kept.
_EXPORT_FILE = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|" + "|".join(
    re.escape(n) for n in (SINGLE_NAME, INDEX_NAME, "config.json", "README.md", "r1v_quant_report.json")) + ")$")


def is_export_file(name: str) -> bool:
    """Whether `name` is one of the files `awq` writes into every export (the copied side files aside)."""
    return bool(_EXPORT_FILE.match(name))


def export_config(cfg: R1VConfig, group_size: int, lm_head: bool = False, not_convert: list[str] | None = None) -> dict:
    """The export's config.json; `not_convert` replaces the default `modules_to_not_convert` (kept linears)."""
    raw = json.loads(json.dumps(cfg.raw))
    raw["quantization_config"] = quantization_config(group_size, not_convert or MODULES_TO_NOT_CONVERT, lm_head)
    # A quant config left inside llm_config makes some readers quantise with the wrong settings.
    raw.get("llm_config", {}).pop("quantization_config", None)
    return raw


def write_tensors(ckpt: Checkpoint, layer_file, out_dir: Path, max_shard_bytes: int,
                  head: dict[str, torch.Tensor] | None = None, kept: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """Every source tensor in source order; decoder-layer tensors come from the per-layer results.

    `layer_file(i)` gives the path of layer i's results (names relative to the layer). `head`, by
    checkpoint name, replaces lm_head's weight with its AWQ tensors and the final norm's weight
    with the one that carries lm_head's scales. The decoder linears in `kept` (full module names)
    are stored as weights in the source dtype, their AWQ scales accounted for (`keep.kept_weight`).
    """
    from r1v_quant.quant.keep import kept_weight

    writer = ShardWriter(out_dir, max_shard_bytes)
    cached: tuple[int, dict] | None = None
    for name in ckpt.names():
        m = _LAYER.match(name)
        if head is not None and name == HEAD_MODULE + ".weight":
            for suffix in AWQ_LEAVES:
                writer.add(f"{HEAD_MODULE}.{suffix}", head[f"{HEAD_MODULE}.{suffix}"])
        elif head is not None and name in head:
            writer.add(name, head[name])
        elif not m:
            writer.add(name, ckpt.get(name))  # vision, mlp1, embeddings, final norm, lm_head: untouched
        if not m:
            continue
        index, rest = int(m.group(1)), m.group(2)
        if cached is None or cached[0] != index:
            ckpt.release()
            cached = (index, load_file(str(layer_file(index))))
        tensors = cached[1]
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in kept:
            source = ckpt.get(name)
            writer.add(name, kept_weight(source, rest.removesuffix(".weight"), tensors, source.dtype))
        elif name.endswith(".weight") and is_quant_linear(module):
            base = rest.removesuffix(".weight")
            for suffix in AWQ_LEAVES:
                writer.add(f"{module}.{suffix}", tensors[f"{base}.{suffix}"])
        else:
            writer.add(name, tensors[rest])
    return writer.close()


def side_files(src: Path) -> list[Path]:
    """The tokenizer, configs and other small files an export carries over, checked before any work.

    A link is followed only when its target lies inside the checkpoint (or its hub blob store):
    one pointing elsewhere could carry a private file into an export meant to be shared.
    """
    files = []
    for item in sorted(Path(src).iterdir()):
        if item.name in _SKIP_SIDE or item.name.endswith(_SKIP_SUFFIX) or item.name.startswith("."):
            continue
        if item.is_symlink() and not is_inside(src, item):
            raise UserError(f"{item} links to {item.resolve()}, outside the checkpoint; copy the file in or remove the link.")
        if not item.is_file():
            continue
        files.append(item)
    return files


def copy_side_files(src: Path, dst: Path) -> list[str]:
    umask = os.umask(0)
    os.umask(umask)
    copied = []
    for item in side_files(src):
        target = dst / item.name
        shutil.copyfile(item, target)
        # Never wider than the source file (nor than the umask allows).
        target.chmod(stat.S_IMODE(item.stat().st_mode) & 0o666 & ~umask)
        copied.append(item.name)
    return copied


def card_source(model: str, raw: dict | None = None) -> tuple[str, str | None]:
    """How the card names the source, and its hub id when it has one: a hub id as given, a snapshot
    in the Hugging Face cache by its repository, a copy of a hub model by its config's `_name_or_path`,
    anything else by its folder's name (never a local path, which the user may not want to publish)."""
    from r1v_quant.model.checkpoint import is_hub_id

    if not Path(model).expanduser().exists() and is_hub_id(model):
        return model, model
    folder = Path(os.path.abspath(Path(model).expanduser()))
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        repo = folder.parent.parent.name[len("models--"):].replace("--", "/")
        return repo, repo
    named = (raw or {}).get("_name_or_path")
    if isinstance(named, str) and is_hub_id(named):
        return f"{named} (a local copy, {folder.name})", named
    return f"{folder.name} (local folder)", None


def report_source(model: str, raw: dict | None = None) -> str:
    """The source as the export's report records it: the hub id, else the folder's name."""
    hub_id = card_source(model, raw)[1]
    return hub_id or Path(os.path.abspath(Path(model).expanduser())).name


_CARD_LICENSE_KEYS = ("license", "license_name", "license_link")


def source_license(src: Path | None) -> dict[str, str]:
    """`license` (and `license_name`, `license_link`) from the front matter of the source's model card,
    so the export states the weights' terms as the source does; empty when it states none."""
    try:
        text = (Path(src) / "README.md").read_text(encoding="utf-8") if src is not None else ""
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n"):
        return {}
    front, sep, _ = text[4:].partition("\n---")
    found = {}
    for line in front.splitlines() if sep else []:
        key, colon, value = line.partition(":")
        value = value.strip().strip("'\"")
        if colon and key in _CARD_LICENSE_KEYS and value and "\n" not in value:
            found[key] = value
    return found


def front_matter(hub_id: str | None, license: dict[str, str]) -> str:
    """The card's YAML header: the Hub links a quantised model to its source through `base_model`."""
    lines = [f"base_model: {hub_id}", "base_model_relation: quantized"] if hub_id else []
    lines += [f"{k}: {license[k]}" for k in _CARD_LICENSE_KEYS if k in license]
    lines += ["pipeline_tag: image-text-to-text", "tags: [awq, 4-bit, skywork-r1v, vision-language, r1v-quant]"]
    return "---\n" + "\n".join(lines) + "\n---\n"


def _cell(value) -> str:
    # A bare `|` ends a Markdown table cell.
    return str(value).replace("|", "\\|")


def _quantised_part(cfg: R1VConfig, group_size, lm_head: bool) -> str:
    dtype = cfg.raw.get('torch_dtype', 'bfloat16')
    if not lm_head:
        return f"""The Qwen2 language model's linears are 4-bit AWQ (AutoAWQ GEMM layout,
zero point, group size {group_size}); the vision encoder, `mlp1`, embeddings, `lm_head`
and norms are kept in {dtype}, byte for byte from the source."""
    return f"""The Qwen2 language model's linears and `lm_head` are 4-bit AWQ (AutoAWQ GEMM
layout, zero point, group size {group_size}; `"lm_head": true` in `quantization_config`); the
vision encoder, `mlp1`, embeddings and norms are kept in {dtype}, byte for byte from the source
except the final norm, which carries `lm_head`'s AWQ scales."""


def kept_part(groups: list[str], share: float, not_convert: list[str]) -> str:
    """The card's paragraph on linears kept in bf16 (empty when none are)."""
    if not groups:
        return ""
    listed = ", ".join(f"`{e}`" for e in not_convert)
    return (f"\n\n{len(groups)} decoder linear groups ({share:.1%} of the decoder linears' parameters) are kept in "
            f"bf16, with their AWQ scales accounted for: {', '.join(groups)} (layer.group). `modules_to_not_convert` "
            f"lists them by full name: {listed}.")


def model_card(source: str, cfg: R1VConfig, recipe: dict, summary: dict, lm_head: bool = False, kept: str = "",
               src_dir: Path | None = None) -> str:
    shown, hub_id = card_source(str(source), cfg.raw)
    recipe = {**recipe, "source": shown}
    if recipe.get("mix") is None:
        recipe.pop("mix", None)
    rows = "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in recipe.items())
    measured = "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in summary.items())
    title = report_source(str(source), cfg.raw).rsplit("/", 1)[-1]
    return f"""{front_matter(hub_id, source_license(src_dir))}# {title} — AWQ 4-bit (language model), vision in bf16

Made with `r1v-quant awq`. {_quantised_part(cfg, recipe.get('group size'), lm_head)}{kept}

## Recipe
| setting | value |
| --- | --- |
{rows}

## Measured
| measure | value |
| --- | --- |
{measured}

## Use
```
vllm serve <this folder> --trust-remote-code --dtype bfloat16
r1v-quant chat --model <this folder> --image photo.jpg
r1v-quant eval --reference {hub_id or "<the source folder>"} --candidate <this folder> --suite mmmu-sample
```
Serve with bf16 activations: fp16-only AWQ kernels overflow on Qwen2 models.
"""
