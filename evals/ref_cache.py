"""The reference's outputs on disk, one file per question, so an interrupted eval resumes and a
second candidate never reloads the reference."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from r1v_quant.cache import CACHE_ENV, cache_folder, tensors_digest
from r1v_quant.errors import UserError
from r1v_quant.evals.forcing import RefDist, Reply
from r1v_quant.evals.settings import EvalSettings
from r1v_quant.evals.suites import Suite
from r1v_quant.output import write_atomic, write_text_atomic

# 2: keyed on the weight files' headers and modification times; each entry carries its digest
CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """``$R1V_QUANT_CACHE/eval`` when the variable is set, else ``~/.cache/r1v-quant/eval``."""
    return cache_folder("eval")


def _sha(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def cache_key(identity: dict, suite: Suite, settings: EvalSettings) -> dict:
    from r1v_quant.calib.sample import sample_key

    return {
        "format": CACHE_FORMAT,
        "model": identity,
        "suite": suite.spec,
        "limit": settings.limit,
        "seed": settings.seed,
        # what the model is shown, not the gold answers, which its outputs do not depend on
        "questions": _sha("\n".join(sample_key(s) for s in suite.samples)),
        "generation": settings.generation() if suite.kind == "qa" else {
            "dtype": settings.dtype, **({"engine": settings.engine} if settings.engine != "torch" else {})},
        "device": "cpu" if settings.device is None and not torch.cuda.is_available() else str(settings.device or "cuda"),
        "top_k": settings.top_k,
        "kl_positions": settings.kl_positions,
        "text_tokens": settings.text_tokens,
    }


@dataclass
class RefItem:
    sample_id: str
    prompt_ids: list[int]
    reply: Reply | None          # None for text suites
    think_opened: bool
    dist: RefDist


class ReferenceCache:
    """One file per question under a folder named by the hash of everything the reference's
    outputs depend on; files are written whole (temporary name, then rename)."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = key
        self.damaged: list[str] = []  # entries whose digest did not hold, by file name

    @classmethod
    def open(cls, root: Path, key: dict) -> ReferenceCache:
        name = Path(key["model"]["path"]).name or "model"
        folder = root / f"{name}-{_sha(json.dumps(key, sort_keys=True))[:24]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / "key.json", json.dumps(key, indent=1, sort_keys=True) + "\n")
        except OSError as error:
            raise UserError(f"could not write the eval cache {folder} ({error.strerror or error}); "
                            f"pass --cache-dir or set {CACHE_ENV} to a writable folder.") from None
        return cls(folder, key)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.safetensors"

    def load(self, index: int, sample_id: str) -> RefItem | None:
        """The stored item, or None when there is none or it cannot be trusted (then it is redone;
        one whose digest does not hold is also listed in `damaged`)."""
        from safetensors import safe_open

        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - a damaged cache file is simply redone
            self.damaged.append(path.name)
            return None
        if meta.get("digest") != tensors_digest(t, meta):
            self.damaged.append(path.name)
            return None
        if meta.get("id") != sample_id:
            return None
        reply = None
        if meta.get("kind") == "qa":
            reply = Reply(t["reply_ids"].tolist(), meta["text"], meta["finished"] == "1")
        dist = RefDist(t["logp"], t["ids"].long(), t["tail"], t["top1"].long(), t["nll"])
        return RefItem(sample_id, t["prompt_ids"].tolist(), reply, meta.get("think_opened") == "1", dist)

    def save(self, index: int, item: RefItem) -> None:
        from safetensors.torch import save_file

        tensors = {"prompt_ids": torch.tensor(item.prompt_ids, dtype=torch.int64),
                   "logp": item.dist.logp.contiguous(), "ids": item.dist.ids.to(torch.int32).contiguous(),
                   "tail": item.dist.tail.contiguous(), "top1": item.dist.top1.to(torch.int32),
                   "nll": item.dist.nll.contiguous()}
        meta = {"id": item.sample_id, "kind": "text", "think_opened": "1" if item.think_opened else "0"}
        if item.reply is not None:
            tensors["reply_ids"] = torch.tensor(item.reply.ids, dtype=torch.int64)
            meta.update(kind="qa", text=item.reply.text, finished="1" if item.reply.finished else "0")
        meta["digest"] = tensors_digest(tensors, meta)
        path = self.path(index)
        try:
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as error:
            raise UserError(f"could not write the eval cache {path} ({error.strerror or error}).") from None
