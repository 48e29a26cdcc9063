"""Hugging Face data sets from the local cache first, downloading only when the Hub answers.

``datasets`` on its own retries an unreachable Hub for about twenty seconds per call, so
the callers here read the cache with the network switched off (:func:`datasets_cache_only`)
and ask :func:`hub_reachable` once, briefly, only on a cache miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from r1v_quant.errors import UserError


class HubUnavailable(Exception):
    """The data is neither cached nor downloadable right now."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all, asked once and briefly.

    Without this, ``datasets`` retries an unreachable Hub for about twenty seconds per call.
    """
    import datasets.config
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure to answer means "not reachable"
        return False
    return True


def once(probe: Callable[[], bool]) -> Callable[[], bool]:
    """``probe`` asked at most once, its first answer remembered."""
    answer: list[bool] = []

    def ask() -> bool:
        if not answer:
            answer.append(probe())
        return answer[0]

    return ask


@contextmanager
def datasets_cache_only() -> Iterator[None]:
    """Within the block, ``datasets`` uses its local cache only and fails at once on a miss."""
    # datasets reads this flag on every call, so setting it for one call makes that call
    # use the local cache only instead of retrying the network (and it would warn "using
    # the latest cached version" once per call: hush that too)
    import datasets.config
    from datasets.utils import logging as datasets_logging

    saved, verbosity = datasets.config.HF_HUB_OFFLINE, datasets_logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = True
    datasets_logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
        datasets_logging.set_verbosity(verbosity)


def load_hub_dataset(path: str, name: str | None, split: str, online: Callable[[], bool] | None = None):
    """A ``datasets`` split from the local cache, downloading it only if the Hub answers.

    ``online`` (by default :func:`hub_reachable`) is asked only on a cache miss, so a fully
    cached data set never touches the network.  Raises HubUnavailable when the data is
    neither cached nor reachable, and UserError when a download was tried and failed.
    """
    import datasets

    try:
        with datasets_cache_only():
            return datasets.load_dataset(path, name, split=split)
    except Exception:  # noqa: BLE001 - datasets reports a cache miss with many exception types
        if not (online or hub_reachable)():
            raise HubUnavailable(path) from None
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # noqa: BLE001 - network, auth and missing sets all end the same way
        label = f"{path} ({name})" if name else path
        raise UserError(f"could not load {label} from the Hugging Face Hub: {error}") from None


# ---------------------------------------------------------------- local copies in the Hub's layouts

# Split names a local copy may carry in a folder or file name.  "test" never matches
# "testmini-...": a split name ends at a separator.
KNOWN_SPLITS = ("train", "validation", "dev", "val", "test", "testmini")


def _names(name: str, word: str) -> bool:
    return name == word or (name.startswith(word) and name[len(word)] in "-_.")


def split_named(file: Path, root: Path) -> str | None:
    """The split a data file belongs to by its path: a folder of that name (the Hub's
    converted-parquet layout ``<config>/<split>/0000.parquet``) or a file name that starts
    with it (``validation-00000-of-00001.parquet``, ``test.jsonl``); None when neither says."""
    folders = file.relative_to(root).parts[:-1] if file != root else ()
    for split in sorted(KNOWN_SPLITS, key=len, reverse=True):
        if split in folders or _names(file.name, split):
            return split
    return None


def config_named(file: Path, root: Path, config: str) -> bool:
    """Whether a data file belongs to a configuration by its path: a folder of that name
    (``gpqa_extended/train-*.parquet``, ``Accounting/validation/0000.parquet``) or a file
    named for it (``gpqa_diamond.csv``)."""
    folders = file.relative_to(root).parts[:-1] if file != root else ()
    return config in folders or file.stem == config or _names(file.name, config)


def data_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The data files under a folder, hidden folders (``.cache`` of ``hf download``) left out."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def files_of(root: Path, files: list[Path], split: str, config: str | None = None) -> list[Path]:
    """The files of one configuration and split among the data files of a folder, read off their paths.

    A configuration is honoured as on the Hub: only files named for it are read.  Of
    those, files that name the split are kept; files that name no split at all count as the
    split (a configuration stored as one file, such as ``gpqa_diamond.csv`` for split train).
    A copy that holds only other splits is refused rather than read in their place."""
    if config is not None:
        files = [f for f in files if config_named(f, root, config)]
        if not files:
            raise UserError(f"no file under {root} belongs to the {config} configuration (a file named {config}.* or "
                            f"a folder {config}/); pass the file itself with --data-path.")
    named = {f: split_named(f, root) for f in files}
    chosen = [f for f, s in named.items() if s == split] or [f for f, s in named.items() if s is None]
    if not chosen and files:
        others = sorted({s for s in named.values() if s})
        raise UserError(f"{root} holds the {', '.join(others)} split(s) but no {split} files; "
                        f"the {split} split is the one scored.")
    return chosen
