"""Hostile text through the TUI (issue 17): a session name, a prompt and a completion made of control
characters, escape sequences, C1 codes, bidi overrides, any other (non-surrogate) Unicode and Rich
markup, stored in a real Store and shown on the Sessions and Samples screens under Pilot: no crash,
and no raw ESC, C1 or bidi control character in what is drawn."""

from __future__ import annotations

import asyncio
import io
import re
import tempfile
from pathlib import Path

from helpers import SIZE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.samples import SamplesScreen

PIECES = ["\x1b", "\x1b[2J", "\x1b]52;c;aGk=\x07", "\x1b[31m", "\x9b2J", "\x85", "\x90", "\u202e", "\u2066", "\u200f",
          "\x00", "\x07", "\x7f", "\r", "\n", "\t", "[bold]", "[/]", "[/bold]", "[/INST]", "[link=x]", "\\[", "é", "界", "🙂"]
HOSTILE = st.lists(st.one_of(st.sampled_from(PIECES), st.characters(exclude_categories=("Cs",))), max_size=12).map("".join)
RAW = re.compile("[\x1b\x80-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f]")


def drawn(app: AuditApp) -> str:
    """The characters of the current screen as drawn (styles and cursor moves left out)."""
    console = Console(width=SIZE[0], height=SIZE[1], file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text(styles=False)


async def show(db: Path) -> list[str]:
    app = AuditApp(load_settings(model="tiny", pack="", db=str(db)), load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        frames = [drawn(app)]
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SamplesScreen)
        frames.append(drawn(app))
    return frames


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=HOSTILE, prompt=HOSTILE, completion=HOSTILE)
def test_hostile_text_never_reaches_the_screen_raw(name, prompt, completion):
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "s.db"
        store = Store(db)
        prompt_id = store.add_prompt(store.create_session(f"x{name}"), prompt or "p", [1, 2])  # a blank name is refused
        store.add_completion(prompt_id, completion, [3], seed=0, params={})
        store.close()
        for frame in asyncio.run(show(db)):
            assert not RAW.search(frame), repr(RAW.findall(frame))
