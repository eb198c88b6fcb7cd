"""The export dialog: folder, name and formats asked; an earlier report is overwritten only when
confirmed (no: the dialog comes back with a free name); a foreign file is refused before any write."""

from __future__ import annotations

from helpers import SIZE
from textual.widgets import Input

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.dialogs import AskForm, Confirm


def read(path) -> str:
    return path.read_text(encoding="utf-8")


async def test_export_asks_and_never_silently_overwrites(tmp_path, tiny_models):
    settings = load_settings(model=str(tiny_models["llama"]), pack="", db=str(tmp_path / "s.db"))
    store = Store(settings.db)
    session_id = store.create_session("first name")
    store.add_prompt(session_id, "a prompt", [1, 2])
    stem = f"s-session{session_id}"
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, AskForm)
        assert [field.value for field in app.screen.query(Input)] == [str(tmp_path), stem, "md html json"]
        await pilot.press("enter", "enter", "enter")
        await pilot.pause()
        first = {fmt: read(tmp_path / f"{stem}.{fmt}") for fmt in ("md", "html", "json")}
        assert all("first name" in text for text in first.values())
        store.rename_session(session_id, "second name")
        await pilot.press("e", "enter", "enter", "enter")  # the same names again: asked, not overwritten
        await pilot.pause()
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")  # choose another name: the dialog comes back with a free one
        await pilot.pause()
        assert isinstance(app.screen, AskForm) and app.screen.query_one("#field-1", Input).value == f"{stem}-2"
        await pilot.press("enter", "enter", "enter")
        await pilot.pause()
        assert {fmt: read(tmp_path / f"{stem}.{fmt}") for fmt in first} == first
        assert "second name" in read(tmp_path / f"{stem}-2.md")
        await pilot.press("e", "enter", "enter", "enter", "y")  # confirmed: the earlier report is replaced
        await pilot.pause()
        assert "second name" in read(tmp_path / f"{stem}.html")
        (tmp_path / "mine.md").write_text("my own notes\n", encoding="utf-8")
        await pilot.press("e", "enter", *["backspace"] * 20, *"mine", "enter", "enter")  # a foreign file there
        await pilot.pause()
        assert read(tmp_path / "mine.md") == "my own notes\n" and not (tmp_path / "mine.html").exists()
        assert any("is not an earlier auditui md report" in n.message for n in app._notifications)
        app.screen.query_one("#sessions").focus()
        await pilot.press("e")
        await pilot.pause()
        app.screen.query_one("#field-0", Input).value = str(tmp_path / "out" / "reports")  # a new folder
        app.screen.query_one("#field-2", Input).value = "json"
        app.screen.query_one("#field-2", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert "second name" in read(tmp_path / "out" / "reports" / f"{stem}.json")
        assert not (tmp_path / "out" / "reports" / f"{stem}.md").exists()
