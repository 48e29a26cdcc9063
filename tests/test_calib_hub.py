import pytest

from r1v_quant.calib import hub
from r1v_quant.errors import UserError


def test_once_asks_the_probe_a_single_time():
    calls = []
    ask = hub.once(lambda: calls.append(1) or True)
    assert ask() and ask() and calls == [1]


def test_cache_only_switch_is_restored_even_on_error():
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError), hub.datasets_cache_only():
        assert datasets.config.HF_HUB_OFFLINE is True
        raise RuntimeError
    assert datasets.config.HF_HUB_OFFLINE == before


def fake_load(monkeypatch, cached: bool, download_ok: bool = True):
    import datasets
    import datasets.config

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        offline = datasets.config.HF_HUB_OFFLINE
        calls.append(offline)
        if offline and not cached:
            raise ConnectionError("not cached")
        if not offline and not download_ok:
            raise ConnectionError("503")
        return ["row"]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_cached_set_never_asks_the_network(monkeypatch):
    calls = fake_load(monkeypatch, cached=True)
    assert hub.load_hub_dataset("x/y", None, "train", lambda: pytest.fail("asked")) == ["row"]
    assert calls == [True]


def test_a_miss_downloads_only_when_the_hub_answers(monkeypatch):
    calls = fake_load(monkeypatch, cached=False)
    with pytest.raises(hub.HubUnavailable):
        hub.load_hub_dataset("x/y", None, "train", lambda: False)
    assert hub.load_hub_dataset("x/y", None, "train", lambda: True) == ["row"]
    assert calls == [True, True, False]


def test_the_default_probe_is_looked_up_at_call_time(monkeypatch):
    fake_load(monkeypatch, cached=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(hub.HubUnavailable):
        hub.load_hub_dataset("x/y", "cfg", "train")


def test_a_failed_download_is_one_user_error(monkeypatch):
    fake_load(monkeypatch, cached=False, download_ok=False)
    with pytest.raises(UserError, match=r"could not load x/y \(cfg\)"):
        hub.load_hub_dataset("x/y", "cfg", "train", lambda: True)
