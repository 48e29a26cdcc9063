"""Whether a candidate can be a quantisation of the reference, checked before any generation:
the same tokenizer and the same shapes, or the comparison means nothing."""

from __future__ import annotations

from pathlib import Path

from r1v_quant.errors import UserError

# The sizes a quantisation keeps; any difference means another model.
_SHAPE_KEYS = (
    ("llm_config", ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size")),
    ("vision_config", ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")),
    ("", ("downsample_ratio",)),
)


def _shape_difference(ref, cand) -> str | None:
    for section, keys in _SHAPE_KEYS:
        a = ref.raw.get(section, {}) if section else ref.raw
        b = cand.raw.get(section, {}) if section else cand.raw
        for key in keys:
            if a.get(key) != b.get(key):
                label = f"{section} {key}" if section else key
                return f"{label} {b.get(key)!r}, where the reference has {a.get(key)!r}"
    return None


def _tokenizer_difference(ref_path: Path, cand_path: Path) -> str | None:
    from r1v_quant.model.r1v import load_tokenizer

    a, b = load_tokenizer(ref_path), load_tokenizer(cand_path)
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    if len(va) != len(vb):
        return f"{len(vb)} tokens, where the reference's has {len(va)}"
    token = next(t for t in sorted(va) if vb.get(t) != va[t])
    return f"token {token!r} as id {vb.get(token)}, where the reference's has {va[token]}"



def _same_model(source: str, ref_spec: str, ref_path: Path, ref_raw: dict | None = None) -> bool:
    from r1v_quant.quant.export import report_source

    local = Path(source).expanduser()
    if local.is_absolute() and local.exists():  # reports written before they named sources by hub id or name
        return local.resolve() == Path(ref_path).resolve()
    # A hub id (the reference's own, or the one its copy names), or a folder's name: the names must agree.
    return source in (ref_spec, report_source(ref_spec, ref_raw)) or local.name == Path(ref_spec).name


def check_candidate(ref_path: Path, cand_path: Path, ref_spec: str | None = None) -> list[str]:
    """Refuse (UserError) a candidate with other shapes or another tokenizer; warn when its recipe
    names another source. Returns the warnings."""
    from r1v_quant.model.checkpoint import Checkpoint
    from r1v_quant.model.config import load_config
    from r1v_quant.model.layout import check_checkpoint_shapes

    ref, cand = load_config(ref_path), load_config(cand_path)
    shape = _shape_difference(ref, cand)
    if shape:
        raise UserError(f"the candidate {cand_path} has {shape}, so it is not a quantisation of the reference "
                        f"{ref_path} and the comparison would mean nothing.")
    # The candidate's config against its own tensor headers: a mismatch would otherwise surface
    # only when the candidate loads, after the whole reference pass.
    check_checkpoint_shapes(cand, Checkpoint(cand_path))
    tok = _tokenizer_difference(ref_path, cand_path)
    if tok:
        raise UserError(f"the candidate {cand_path} has another tokenizer ({tok}) than the reference {ref_path}, "
                        "so their answers cannot be compared token by token.")
    from r1v_quant.quant.recipe import read_source

    source = read_source(cand_path)
    if source is not None and not _same_model(source, str(ref_spec or ref_path), ref_path, ref.raw):
        return [f"the candidate's recipe names {source} as its source, not the reference {ref_spec or ref_path}; "
                "the difference measured may not be the cost of quantisation."]
    return []
