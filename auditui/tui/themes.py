"""Load the Theme definitions shipped in the top-level `themes/` folder (TOML, one per file).

An installed auditui has no `themes/` folder (it lives in the checkout): the app then uses
Textual's built-in dark and light themes.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from textual.theme import Theme

from auditui.config import REPO_ROOT

THEMES_DIR = REPO_ROOT / "themes"
OURS = ("auditui-dark", "auditui-light")
BUILT_IN = ("textual-dark", "textual-light")


def load_themes(folder: Path | None = None) -> list[Theme]:
    """The themes of `folder` (default THEMES_DIR); none when it does not exist."""
    folder = THEMES_DIR if folder is None else folder
    return [Theme(**tomllib.loads(path.read_text(encoding="utf-8"))) for path in sorted(folder.glob("*.toml"))]


def dark_and_light(available: dict) -> tuple[str, str]:
    """The (dark, light) theme names to switch between: ours when both are registered, else Textual's."""
    return OURS if all(name in available for name in OURS) else BUILT_IN
