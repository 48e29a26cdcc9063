"""Every table `plan`, `plan --calibrate`, `inspect` and `awq` print is whole at 80 columns.

No cell cut with "…", no line wider than the terminal, no flag broken mid-word, and every figure of
the JSON report written in full.
"""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest
from conftest import run_cli
from rich.console import Console
from rich.table import Table

from r1v_quant import tables
from r1v_quant.units import GiB

WIDTH = 80


def _whole(out: str) -> None:
    assert "…" not in out, out
    assert max(len(line) for line in out.splitlines()) <= WIDTH, out


def _run(args, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    _whole(out)
    return out


def _words(out: str) -> set[str]:
    return set(out.split())


def test_plan_default_cards(tmp_path, capsys, monkeypatch):
    report = tmp_path / "plan.json"
    out = _run(["plan", "--model", "r1v-38b", "--json", report], capsys, monkeypatch)
    data = json.loads(report.read_text())
    words = _words(out)
    assert len(data["cards"]) == 5
    for card in data["cards"]:
        assert f"{card['max_context']:,d}" in words and f"{card['max_model_len']:,d}" in words
        assert f"{card['kv_room_bytes'] / GiB:,.2f}" in words
        for s in card["suggestions"]:
            # Each flag of the suggestion is printed whole, not as "--gpu-memo ry-utiliza tion".
            for flag in re.findall(r"--[a-z0-9-]+", s["how"]):
                assert flag in words, (flag, out)
    for fit in data["keep_bf16_auto"]:
        assert f"{fit['room_bytes'] / GiB:,.2f}" in words
        assert f"{fit['max_context']:,d}" in words
        assert all(f"{n:,d}" in words for n in fit["context_at"].values())
    assert "room beyond 32,768 tokens GiB: " in out  # the keep-bf16 table, folded at 80 columns


def test_plan_unchanged_on_a_wide_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(["plan", "--model", "r1v-38b"], capsys)
    assert code == 0
    # Drawn as tables: the header rows of the context and keep-bf16 tables, no folded "column: value" lines.
    assert re.search(r"┃ card +┃ budget GiB +┃", out) and "max tokens after auto" in out
    assert "card: 24 GB" not in out


def test_plan_calibrate(tmp_path, capsys, monkeypatch):
    report = tmp_path / "cal.json"
    out = _run(["plan", "--model", "r1v-38b", "--calibrate", "--gpu-mem", "24GiB", "--json", report], capsys, monkeypatch)
    (row,) = json.loads(report.read_text())
    words = _words(out)
    for key in ("chunk_tokens", "max_tokens_on_device", "max_tokens_host"):
        assert f"{row[key]:,d}" in words, (key, out)
    assert "17,520" in words and "259,310" in words  # the figures the narrow table once cut ("17,5…", "259,…")
    assert f"{row['device_peak'] / GiB:,.2f}" in words and f"{row['host_peak'] / 1e9:,.2f}" in words
    assert f"{row['disk'] / 1e9:,.1f}" in words


def test_plan_calibrate_with_traces(tmp_path, capsys, monkeypatch):
    report = tmp_path / "cal.json"
    out = _run(["plan", "--model", "r1v-38b", "--calibrate", "--traces", "self", "--gpu-mem", "24GiB,80GiB",
                "--json", report], capsys, monkeypatch)
    rows = json.loads(report.read_text())
    words = _words(out)
    assert len(rows) == 2
    for row in rows:
        assert f"{row['max_tokens_on_device']:,d}" in words and f"{row['chunk_tokens']:,d}" in words
        assert row["assumed_chip"] in out
        trace = row["trace"]
        assert f"{trace['device_bytes'] / GiB:,.2f}" in words and f"{trace['budget'] / GiB:,.2f}" in words
        assert f"batch: {trace['batch']:,d}" in out
        assert all(lever in words for lever in trace["levers"])


def test_inspect(tmp_path, capsys, monkeypatch):
    from test_inspect import build

    for name, kwargs, code_wanted in (("good", {}, 0), ("bad", {"quantise_vision": True}, 1)):
        folder = build(tmp_path / name, **kwargs)
        report = tmp_path / f"{name}.json"
        monkeypatch.setenv("COLUMNS", str(WIDTH))
        code, out, _ = run_cli(["inspect", folder, "--json", report], capsys)
        assert code == code_wanted
        _whole(out)
        data = json.loads(report.read_text())
        words = _words(out)
        total = sum(c["tensors"] for c in data["components"])
        assert f"{total:,d}" in words
        for check in data["checks"]:
            assert check["name"].split()[0] in words
            # The detail's figures and module names are written whole, whichever form the table takes.
            for word in check["message"].split():
                assert word in out, (word, out)


def _layers(n: int):
    def layer(i):
        return SimpleNamespace(index=i, rel_err_awq=0.012345 + i / 1000, rel_err_rtn=0.034567, seconds=12345.6 + i,
                               peak_mem_mb=123456.0)
    return SimpleNamespace(layers=[layer(i) for i in range(n)], head=layer(n))


def _render(table: Table, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    tables.show(console, table)
    return console.file.getvalue()


def test_awq_layer_table():
    from r1v_quant.cli.awq import layer_table

    result = _layers(64)
    out = _render(layer_table(result), WIDTH)
    _whole(out)
    words = _words(out)
    for r in result.layers:
        assert f"{r.rel_err_awq:.4f}" in words and f"{r.seconds:.1f}" in words
    assert "lm_head" in words and "123456" in words and "round-to-nearest" in words


def _wide_table() -> Table:
    t = Table(title="wide")
    for col in ("card", *(f"max tokens at {p}% kept" for p in range(1, 12))):
        t.add_column(col, justify="right")
    t.add_row("24 GB", *(f"{1_234_567 + i:,d}" for i in range(11)))
    return t


@pytest.mark.parametrize("width", [40, 60, 80])
def test_a_table_too_wide_is_folded_whole(width):
    out = _render(_wide_table(), width)
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= width
    lines = out.splitlines()
    assert lines[0] == "wide" and lines[1] == "card: 24 GB"
    assert lines[2:] == [f"  max tokens at {p}% kept: {1_234_567 + p - 1:,d}" for p in range(1, 12)]


def test_a_table_that_fits_is_drawn_as_rich_draws_it():
    t = Table(title="narrow")
    t.add_column("card")
    t.add_column("max tokens", justify="right")
    t.add_row("24 GB", "131,072")
    plain = Console(file=io.StringIO(), width=WIDTH, color_system=None)
    plain.print(t)
    assert _render(t, WIDTH) == plain.file.getvalue()


def test_a_header_rich_would_cut_folds_the_table():
    # Its minimum width fits 80 columns, but rich narrows the widest column first and cuts "max-model-len".
    t = Table()
    for col in ("card", "budget GiB", "weights", "reserve", "KV room", "max tokens", "max-model-len", "fits"):
        t.add_column(col, justify="right")
    t.add_row("80 GB", "72.00", "28.48", "3.95", "39.56", "162,048", "131,072", "ok")
    assert not tables.fits(t, Console(file=io.StringIO(), width=WIDTH))
    out = _render(t, WIDTH)
    assert "max-model-len: 131,072" in out and "…" not in out
