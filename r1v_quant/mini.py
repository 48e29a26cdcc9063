"""r1v-mini: the small trained Skywork-R1V that ships with the source tree.

Random small checkpoints answer at chance, so an accuracy loss measured on them says
nothing. r1v-mini has the real layout at a few million parameters and answers held-out
built-in questions well above chance, which gives quantisation something to lose. It is
made by ``scripts/train-small.py`` (see ``r1v_quant.train``) and kept in ``models/r1v-mini``.
"""

from __future__ import annotations

from pathlib import Path

from r1v_quant.errors import UserError

MINI_DIR = Path(__file__).resolve().parent.parent / "models" / "r1v-mini"
REBUILD = "python scripts/train-small.py"


def mini_path() -> Path:
    """The folder of the committed r1v-mini checkpoint."""
    if not (MINI_DIR / "config.json").is_file() or not (MINI_DIR / "model.safetensors.index.json").is_file():
        raise UserError(f"the r1v-mini checkpoint is not in {MINI_DIR} (it ships with the source tree, not with "
                        f"an installed package); rebuild it from a checkout with `{REBUILD}`.")
    return MINI_DIR
