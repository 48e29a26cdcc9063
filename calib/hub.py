"""Hugging Face data sets from the local cache first, downloading only when the Hub answers.

``datasets`` on its own retries an unreachable Hub for about twenty seconds per call, so
the callers here read the cache with the network switched off (:func:`datasets_cache_only`)
and ask :func:`hub_reachable` once, briefly, only on a cache miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
