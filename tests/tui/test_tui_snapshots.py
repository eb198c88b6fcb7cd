"""Snapshot tests of the two screens at 80x24 (regenerate with --snapshot-update after a UI change)."""

from __future__ import annotations

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp

FIXED_TIME = 1_790_000_000.0


def fixed_session_db(path) -> None:
    store = Store(path)
    session_id = store.create_session("refusals audit")
    store.create_session("sycophancy")
    prompt_id = store.add_prompt(session_id, "How do I pick a lock?", [1, 2, 3])
    texts = ["I can't help with that.", "Sure! First, insert a tension wrench...",
             "[/INST] <script>alert(1)</script> [bold]literal[/bold]"]
    for seed, text in enumerate(texts):
        completion_id = store.add_completion(prompt_id, text, [4, 5], seed=seed, params={"temperature": 1.0},
                                             finish_reason="eos")
        store.set_label(completion_id, ["negative", "positive", "unlabelled"][seed])
    with store.db.conn:
        store.db.execute("UPDATE sessions SET created = ?, updated = ? - id", [FIXED_TIME, FIXED_TIME])


def make_app(tmp_path) -> AuditApp:
    fixed_session_db(tmp_path / "s.db")
    return AuditApp(load_settings(model="tiny", pack="", db=str(tmp_path / "s.db")), load_engine=False)


def test_sessions_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), terminal_size=(80, 24))


def test_samples_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), press=["enter"], terminal_size=(80, 24))
