"""Load the Theme definitions shipped in the top-level `themes/` folder (TOML, one per file)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from textual.theme import Theme

from auditui.config import REPO_ROOT

THEMES_DIR = REPO_ROOT / "themes"


def load_themes(folder: Path = THEMES_DIR) -> list[Theme]:
    themes = []
    for path in sorted(folder.glob("*.toml")):
        data = tomllib.loads(path.read_text())
        themes.append(Theme(**data))
    return themes
