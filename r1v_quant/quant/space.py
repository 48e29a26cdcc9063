"""Disk space an `awq` run needs, counted per filesystem before any work: the export, the work
folder (finished layers plus two generations of activations during a commit) and the spilled
activations of `--offload-dir`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from r1v_quant.errors import UserError

# Indexes, configs, the model card and filesystem overhead.
_HEADROOM = 1.05


@dataclass(frozen=True)
class Need:
    label: str
    folder: Path
    bytes: int


def _existing(folder: Path) -> Path:
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def folder_bytes(folder: Path) -> int:
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_needs(cfg, group_size: int, out: Path, work: Path, offload_dir: Path | None, offload_above: int,
              max_tokens: int, resume: bool) -> list[Need]:
    """What each folder of the run receives, with calibration tokens bounded by `max_tokens`."""
    from r1v_quant.model.footprint import export_tensor_specs
    from r1v_quant.model.topology import DECODER_LAYERS
    from r1v_quant.units import spec_bytes

    specs = export_tensor_specs(cfg, group_size)
    export = sum(spec_bytes(s, d) for s, d in specs.values())
    layers = sum(spec_bytes(s, d) for n, (s, d) in specs.items() if n.startswith(DECODER_LAYERS))
    from r1v_quant.quant.chunks import ACT_BETWEEN_LAYERS

    acts = max_tokens * cfg.hidden_size * ACT_BETWEEN_LAYERS
    work_bytes = layers + 2 * acts + max_tokens
    if resume:
        work_bytes = max(0, work_bytes - folder_bytes(work))
    needs = [Need("export", Path(out).absolute().parent, export), Need("work folder", Path(work), work_bytes)]
    if offload_dir is not None and acts > offload_above:
        needs.append(Need("offloaded activations", Path(offload_dir), acts - offload_above))
    return needs


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


def check_space(needs: list[Need]) -> None:
    """One sentence naming the filesystem that is short, what it has and what each part needs."""
    by_device: dict[int, tuple[Path, list[Need]]] = {}
    for need in needs:
        probe = _existing(need.folder)
        dev = os.stat(probe).st_dev
        by_device.setdefault(dev, (probe, []))[1].append(need)
    for probe, group in by_device.values():
        free = shutil.disk_usage(probe).free
        total = sum(n.bytes for n in group)
        if free < total * _HEADROOM:
            parts = ", ".join(f"{n.label} {_gb(n.bytes)}" for n in group)
            raise UserError(f"{probe} has {_gb(free)} free but this run writes about {_gb(total * _HEADROOM)} there "
                            f"({parts}, plus 5% headroom); free space or choose other folders.")
