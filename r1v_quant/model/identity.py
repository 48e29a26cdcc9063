"""What tells one checkpoint from another without reading its weights: the one identity that the
trace cache, the eval reference cache and `awq --resume` key on.

A shard rewritten in place keeps its name and often its size; its modification time and the
hash of its safetensors header (names, dtypes, shapes, offsets) change. Hashing every weight
byte would take minutes at 38B, so the data itself is not read.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from r1v_quant.errors import UserError

# Files beside the weights whose content decides how prompts are rendered and replies decoded;
# small enough to hash whole.
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")
INDEX_NAME = "model.safetensors.index.json"
# A safetensors header longer than this is not one (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 1000**2


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_digest(path: Path) -> str:
    """sha256 of a safetensors file's length prefix and JSON header; of the first bytes when it has none."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return _sha256(prefix)
        (length,) = struct.unpack("<Q", prefix)
        return _sha256(prefix + f.read(min(length, _MAX_HEADER)))


def shard_identity(path: Path) -> dict:
    """Size, modification time (ns) and header hash of one weight file."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": header_digest(path)}


def model_identity(model_dir: Path) -> dict:
    """The resolved folder; hashes of config.json, the safetensors index and the tokenizer files;
    and size, modification time and header hash of every weight file."""
    folder = Path(model_dir).resolve()
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{folder} has no config.json, so it cannot be identified.")
    files = {name: _sha256((folder / name).read_bytes())
             for name in TOKENIZER_FILES + (INDEX_NAME,) if (folder / name).is_file()}
    weights = {p.name: shard_identity(p) for p in sorted(folder.glob("*.safetensors"))}
    return {"path": str(folder), "config": _sha256(config.read_bytes()), "files": files, "weights": weights}


def changed_file(before: dict, now: dict) -> str | None:
    """The first file (by name) whose identity differs between two `model_identity` results."""
    if before.get("config") != now.get("config"):
        return "config.json"
    for part in ("weights", "files"):
        a, b = before.get(part) or {}, now.get(part) or {}
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                return name
    return None
