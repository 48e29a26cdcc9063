"""The export's model card: a table that renders, the mix only when there was one, the source by hub id."""

from r1v_quant.model.checkpoint import resolve_config
from r1v_quant.quant.export import card_source, model_card

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
    assert card_source(str(local)) == (f"{local} (local folder)", None)
    cfg, _ = resolve_config("r1v-38b")
    card = model_card(str(local), cfg, RECIPE, SUMMARY)
    assert "base_model" not in card and f"| source | {local} (local folder) |" in card
