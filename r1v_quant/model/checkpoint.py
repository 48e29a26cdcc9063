"""Finding a checkpoint and reading its safetensors lazily, by the checkpoint's own names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from r1v_quant.errors import UserError
from r1v_quant.output import new_file_mode

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
# Configs shipped with r1v-quant, so planning works offline for the models it targets.
# The family's configs ship with the package so that `plan` works offline by hub id.
BUILTIN_CONFIGS = {"r1v-38b": "r1v-38b.json", "r1v2-38b": "r1v2-38b.json", "r1v3-38b": "r1v3-38b.json"}
ALIASES = {spelling: key for key in BUILTIN_CONFIGS
           for spelling in (key, f"skywork-{key}", f"skywork/skywork-{key}")}


def is_hub_id(text: str) -> bool:
    """True for text shaped like a Hugging Face id (`owner/name`) rather than a path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids reaching the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub (or the proxy in front of it) cannot be reached, found within
    `timeout` seconds; None when it accepts a connection. Without this, an offline machine
    spends half a minute in the hub client's retries before saying the same thing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None) if endpoint.scheme == "https" else None
    target = urlparse(proxy) if proxy else endpoint
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"


def resolve_model(spec: str | os.PathLike) -> Path:
    """A local folder as is; a Hugging Face id through the local cache first, then the hub."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; --model takes a checkpoint folder or a Hugging Face id.")
        return path
    text = str(spec)
    if not is_hub_id(text):
        raise UserError(f"{text} does not exist.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - any cache problem falls through to a download attempt
        pass
    if hub_offline():
        raise UserError(f"{text} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "download it first or pass a folder.")
    unreachable = hub_unreachable()
    if unreachable:
        raise UserError(f"{text} is not in the local Hugging Face cache and the hub is offline here ({unreachable}); "
                        "download it where the hub answers, or pass a folder.")
    try:
        return Path(snapshot_download(text))
    except Exception as e:  # noqa: BLE001 - network, auth and missing repos all end the same way for the user
        raise UserError(
            f"{text} is neither a local folder nor in the Hugging Face cache, and the hub could not provide it "
            f"({type(e).__name__})."
        ) from None


def allowed_roots(model_dir: Path) -> list[Path]:
    """Where a checkpoint's files may really live: the folder itself, and for a Hugging Face cache
    snapshot (whose files are links into the repository's `blobs`), that blob store."""
    root = Path(model_dir).resolve()
    folder = Path(model_dir).absolute()
    roots = [root]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def is_inside(model_dir: Path, path: Path) -> bool:
    real = Path(path).resolve()
    return any(real == r or r in real.parents for r in allowed_roots(model_dir))


def check_inside(model_dir: Path, name: str, source: str) -> None:
    """A file the checkpoint names must stay inside it: no absolute path, no `..`, no link outside."""
    if not isinstance(name, str) or os.path.isabs(name) or ".." in Path(name).parts or \
            not is_inside(model_dir, Path(model_dir) / name):
        raise UserError(f"{source} names {name!r}, which lies outside {model_dir}; refusing to read it.")


def _json_config(path: Path):
    from r1v_quant.model.config import parse_config

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON config ({e}).") from None
    return parse_config(raw, str(path))


def _cached_hub_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a broken cache is the same as no cache here
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def resolve_config(spec: str):
    """The R1VConfig for `--model` when only the config is needed, and where it came from.

    Like `resolve_model`, and also a config .json file, or a built-in config for a known alias
    (`r1v-38b`, `Skywork/Skywork-R1V-38B`) when the hub id is not cached; from the hub it fetches
    config.json only, never the weights.
    """
    from r1v_quant.model.config import load_config

    text = str(spec).strip()
    if not text:
        raise UserError("--model is empty; pass a checkpoint folder, a config.json, a Hugging Face id or r1v-38b.")
    path = Path(text).expanduser()
    if path.is_dir():
        return load_config(path), str(path)
    if path.is_file():
        return _json_config(path), str(path)
    alias = ALIASES.get(text.lower())
    if is_hub_id(text):
        cached = _cached_hub_config(text)
        if cached is not None:
            return _json_config(cached), f"{text} (local Hugging Face cache)"
    if alias is not None:
        return _json_config(DATA_DIR / BUILTIN_CONFIGS[alias]), f"{text} (built-in config {BUILTIN_CONFIGS[alias]})"
    if not is_hub_id(text):
        known = ", ".join(sorted(ALIASES))
        raise UserError(f"{text} is not a folder, a config file, a Hugging Face id or a known model ({known}).")
    if hub_offline():
        raise UserError(f"{text} has no config.json in the local Hugging Face cache and HF_HUB_OFFLINE is set.")
    unreachable = hub_unreachable()
    if unreachable:
        raise UserError(f"{text} has no config.json in the local Hugging Face cache and the hub is offline here "
                        f"({unreachable}).")
    try:
        from huggingface_hub import hf_hub_download

        return _json_config(Path(hf_hub_download(text, "config.json"))), f"{text} (config.json from the hub)"
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth and missing repos all end the same way
        raise UserError(f"{text} is not in the local cache and its config.json could not be fetched "
                        f"({type(e).__name__}).") from None


def read_weight_map(index: Path) -> dict[str, str]:
    """The `weight_map` of a safetensors index, tensor name -> shard file name; one sentence when
    the file is not JSON, has no weight_map, or maps a name to anything but a file name."""
    try:
        data = json.loads(Path(index).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{index} is not valid JSON, so it is not a safetensors index.") from None
    except OSError as e:
        raise UserError(f"{index} could not be read ({e.strerror or e}).") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        got = "none" if weight_map is None else f"a {type(weight_map).__name__}"
        raise UserError(f"{index} is not a valid safetensors index: its weight_map is {got}, not an object "
                        "from tensor names to shard files.")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise UserError(f"{index} places tensor {bad[0]} in shard {bad[1]!r}, which is not a file name.")
    return weight_map


class Checkpoint:
    """The tensors of a checkpoint folder, read one at a time from (possibly sharded) safetensors."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.shard_of = self._map_tensors()
        self._handles: dict[str, object] = {}
        self._check_shards()

    def _map_tensors(self) -> dict[str, str]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = read_weight_map(index)
            for shard in sorted(set(weight_map.values())):
                check_inside(self.dir, shard, str(index))
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise UserError(f"{index} names shard {missing[0]}, which is not in {self.dir}.")
            return dict(weight_map)
        single = self.dir / SINGLE_NAME
        if single.is_file():
            with self._open(SINGLE_NAME) as f:
                return {k: SINGLE_NAME for k in f.keys()}
        raise UserError(f"{self.dir} has no {INDEX_NAME} or {SINGLE_NAME}.")

    def _open(self, shard: str):
        try:
            return safe_open(self.dir / shard, framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise UserError(f"{self.dir / shard} is not a readable safetensors file ({str(e).splitlines()[0][:120]}).") from None

    def _check_shards(self) -> None:
        # Opening validates each header against the file size, which catches truncated downloads early.
        by_shard: dict[str, set[str]] = {}
        for name, shard in self.shard_of.items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in by_shard.items():
            handle = self._handle(shard)
            absent = names - set(handle.keys())
            if absent:
                raise UserError(f"{self.dir / shard} lacks tensor {sorted(absent)[0]}, which the index places there.")

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = self._open(shard)
        return self._handles[shard]

    def names(self) -> list[str]:
        return list(self.shard_of)

    def release(self) -> None:
        """Close the shard mappings: pages read so far stop counting as this process's memory."""
        self._handles.clear()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.shard_of[name]).get_tensor(name)
        except KeyError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"tensor {name} in {self.dir / self.shard_of[name]} could not be read ({e}).") from None

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.shard_of[name]).get_slice(name).get_shape())

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.shard_of if n.startswith(prefix)]


class ShardWriter:
    """Writes tensors into safetensors shards of bounded size, then names them `model-0000i-of-0000N`.

    Tensors are flushed as soon as a shard is full, so a 38B export never holds more than one
    shard in memory.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 1024**3):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = f"part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, str(self.dir / part), metadata={"format": "pt"})
        # safetensors writes its files private (0600); a shard is read by whoever may read the folder.
        (self.dir / part).chmod(new_file_mode())
        self._parts.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush, give shards their final names, write the index, and return the weight map."""
        if self._pending:
            self._flush()
        count = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._parts):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.dir / part).rename(self.dir / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map
