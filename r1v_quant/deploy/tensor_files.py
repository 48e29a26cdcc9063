"""The tensors of a folder of safetensors files, read from their headers alone, and whether the
index agrees with the shards: every shard exists, every listed tensor is where the index says,
every stored tensor is listed."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from r1v_quant.deploy.checks import Check, listing
from r1v_quant.errors import UserError
from r1v_quant.model.checkpoint import INDEX_NAME, read_weight_map
from r1v_quant.units import ST_ITEMSIZE


@dataclass
class TensorInfo:
    name: str
    dtype: str                 # safetensors code: BF16, F16, I32, ...
    shape: tuple[int, ...]
    nbytes: int
    file: str


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and byte sizes from a safetensors header; ValueError if it is damaged."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024**2):
            raise ValueError("header length exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"entry {name} lacks dtype, shape or data_offsets") from None
        if dtype not in ST_ITEMSIZE:
            raise ValueError(f"tensor {name} has unknown dtype {dtype}")
        nbytes = math.prod(shape) * ST_ITEMSIZE[dtype]
        if end - begin != nbytes or end > data_size or begin < 0:
            raise ValueError(f"tensor {name} has data offsets that do not match its shape or the file size")
        out[name] = TensorInfo(name, dtype, shape, nbytes, path.name)
    return out


def read_tensors(folder: Path) -> tuple[dict[str, TensorInfo], Check]:
    """All tensors of the folder's safetensors files, and the index check."""
    name = "safetensors index"
    problems: list[str] = []
    warnings: list[str] = []
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    headers: dict[str, dict[str, TensorInfo]] = {}
    for f in files:
        try:
            headers[f] = read_safetensors_header(folder / f)
        except (ValueError, OSError) as e:
            problems.append(f"{f} is not a readable safetensors file ({e})")
    tensors: dict[str, TensorInfo] = {}
    dupes = []
    for f, h in headers.items():
        for t, info in h.items():
            if t in tensors:
                dupes.append(f"{t} ({tensors[t].file} and {f})")
            tensors[t] = info
    if dupes:
        problems.append(f"{len(dupes)} tensors stored twice, e.g. {listing(dupes)}")
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = read_weight_map(index_path)
        except UserError as e:
            return tensors, Check(name, "fail", str(e))
        index = json.loads(index_path.read_text())
        listed_shards = sorted(set(weight_map.values()))
        absent = [s for s in listed_shards if s not in files]
        if absent:
            lost = sum(1 for s in weight_map.values() if s in absent)
            problems.append(f"shard {listing(absent)} named by the index is missing ({lost} tensors)")
        misplaced = [t for t, s in weight_map.items() if s in headers and t not in headers[s]]
        if misplaced:
            problems.append(f"{len(misplaced)} tensors listed in the index are not in their shard, e.g. {listing(misplaced)}")
        unlisted = [t for s in listed_shards if s in headers for t in headers[s] if weight_map.get(t) != s]
        if unlisted:
            problems.append(f"{len(unlisted)} tensors in the shards are not listed in the index, e.g. {listing(unlisted)}")
        stray = [f for f in files if f not in listed_shards]
        if stray:
            warnings.append(f"{listing(stray)} not named by the index (loaders ignore it)")
        meta = index.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        actual = sum(i.nbytes for s in listed_shards if s in headers for i in headers[s].values())
        if total is not None and total != actual and not absent:
            warnings.append(f"index metadata total_size {total} differs from the shards' tensor bytes {actual}")
        summary = f"{len(listed_shards)} shards, {len(weight_map)} tensors, all listed and present"
    elif not files:
        problems.append("the folder holds no .safetensors files")
        summary = ""
    elif len(files) > 1:
        warnings.append(f"{len(files)} safetensors files but no {INDEX_NAME}; transformers needs the index")
        summary = f"{len(files)} files"
    else:
        summary = f"single file {files[0]}, {len(tensors)} tensors"
    if problems:
        return tensors, Check(name, "fail", "; ".join(problems + warnings) + ".")
    if warnings:
        return tensors, Check(name, "warn", "; ".join(warnings) + ".")
    return tensors, Check(name, "pass", summary + ".")


