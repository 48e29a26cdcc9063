"""The export's model card: a table that renders, the mix only when there was one, the source by hub id."""

import json
from pathlib import Path

import yaml

from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.quant.export import card_source, model_card, report_source

RECIPE = {"source": "x", "calibration set": "builtin", "mix": None, "group size": 128}
SUMMARY = {"KL(source || export), nats per token": "0.0048", "top-1 token agreement": "97.0%"}


def _table_rows(card: str) -> list[list[str]]:
    rows = []
    for line in card.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            # split on pipes that are not escaped, as Markdown renderers do
            cells = [c.strip() for c in line.replace("\\|", "\x00").strip("|").split("|")]
            rows.append([c.replace("\x00", "|") for c in cells])
    return rows


def test_every_row_has_two_cells_and_no_empty_mix():
    cfg, _ = resolve_config("r1v-38b")
    card = model_card("Skywork/Skywork-R1V-38B", cfg, RECIPE, SUMMARY)
    rows = _table_rows(card)
    assert all(len(r) == 2 for r in rows), rows
    assert ["KL(source || export), nats per token", "0.0048"] in rows
    assert not any(r[0] == "mix" for r in rows)
    assert "base_model: Skywork/Skywork-R1V-38B\n" in card
    with_mix = _table_rows(model_card("Skywork/Skywork-R1V-38B", cfg, {**RECIPE, "mix": [0.7, 0.3]}, SUMMARY))
    assert ["mix", "[0.7, 0.3]"] in with_mix


def test_source_is_a_hub_id_or_a_local_folder(tmp_path):
    snap = tmp_path / "hub" / "models--Skywork--Skywork-R1V2-38B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert card_source(str(snap)) == ("Skywork/Skywork-R1V2-38B", "Skywork/Skywork-R1V2-38B")
    assert card_source("Skywork/Skywork-R1V3-38B") == ("Skywork/Skywork-R1V3-38B", "Skywork/Skywork-R1V3-38B")
    local = tmp_path / "r1v-mini"
    local.mkdir()
    assert card_source(str(local)) == ("r1v-mini (local folder)", None)
    cfg, _ = resolve_config("r1v-38b")
    card = model_card(str(local), cfg.__class__(**{**cfg.__dict__, "raw": {}}), RECIPE, SUMMARY)
    assert "base_model" not in card and "| source | r1v-mini (local folder) |" in card
    assert str(tmp_path) not in card


def front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def test_front_matter_links_a_hub_source_as_quantized():
    cfg, _ = resolve_config("r1v-38b")
    meta = front(model_card("Skywork/Skywork-R1V-38B", cfg, RECIPE, SUMMARY))
    assert meta["base_model"] == "Skywork/Skywork-R1V-38B" and meta["base_model_relation"] == "quantized"
    assert meta["pipeline_tag"] == "image-text-to-text" and "awq" in meta["tags"]


def test_a_local_copy_of_a_hub_model_is_linked_by_its_config(tmp_path):
    """A folder downloaded with `huggingface-cli download --local-dir` keeps `_name_or_path` in its config."""
    cfg, _ = resolve_config("r1v-38b")
    assert cfg.raw["_name_or_path"] == "Skywork/Skywork-R1V-38B"
    local = tmp_path / "models" / "r1v"
    local.mkdir(parents=True)
    (local / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# Skywork-R1V\n")
    card = model_card(str(local), cfg, RECIPE, SUMMARY, src_dir=local)
    meta = front(card)
    assert meta["base_model"] == "Skywork/Skywork-R1V-38B" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "mit" and meta["pipeline_tag"] == "image-text-to-text"
    assert "| source | Skywork/Skywork-R1V-38B (a local copy, r1v) |" in card and str(tmp_path) not in card
    assert report_source(str(local), cfg.raw) == "Skywork/Skywork-R1V-38B"


def test_a_hub_cache_snapshot_is_linked_by_its_repository(tmp_path):
    snap = tmp_path / "hub" / "models--Skywork--Skywork-R1V2-38B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: other\nlicense_name: skywork\nlicense_link: https://x.org/L\n---\n")
    cfg, _ = resolve_config("r1v2-38b")
    meta = front(model_card(str(snap), cfg, RECIPE, SUMMARY, src_dir=snap))
    assert meta["base_model"] == "Skywork/Skywork-R1V2-38B"
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "skywork", "https://x.org/L")
    assert report_source(str(snap)) == "Skywork/Skywork-R1V2-38B"


def test_a_plain_local_folder_has_no_base_model_and_no_path(tmp_path):
    cfg, _ = resolve_config("r1v-38b")
    raw = {k: v for k, v in cfg.raw.items() if k != "_name_or_path"}
    local = tmp_path / "my-r1v"
    local.mkdir()
    card = model_card(str(local), cfg.__class__(**{**cfg.__dict__, "raw": raw}), RECIPE, SUMMARY, src_dir=local)
    meta = front(card)
    assert "base_model" not in meta and "license" not in meta and meta["pipeline_tag"] == "image-text-to-text"
    assert str(tmp_path) not in card and card.splitlines()[4].startswith("# my-r1v")
    assert report_source(str(local), raw) == "my-r1v" and report_source(".", raw) == Path.cwd().name


def test_the_export_names_its_source_without_a_local_path(tiny_dir, tiny_export):
    """The session export was made from an absolute path: the report and the card hold only the folder's name."""
    report = json.loads((tiny_export / "r1v_quant_report.json").read_text())
    assert report["source"] == tiny_dir.name
    for name in ("r1v_quant_report.json", "README.md"):
        assert str(tiny_dir.parent) not in (tiny_export / name).read_text(), name
    assert front((tiny_export / "README.md").read_text())["pipeline_tag"] == "image-text-to-text"
