"""Export a session's report: a dialog asks for the folder, the file name and the formats (md, html,
json). Every target is checked before anything is written (never the database, an SQLite file, a
folder or a file that is not an earlier auditui report: `store.reports.check_export`); an earlier
report standing at a target is overwritten only when confirmed, and otherwise the dialog comes back
with the next free name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from auditui.errors import AuditError
from auditui.tui.guard import guard_call
from auditui.tui.screens.dialogs import AskForm, Confirm

FIELDS = ("folder", "file name (without extension)", "formats (md html json)")


def free_name(folder: Path, name: str, formats: tuple[str, ...]) -> str:
    """`name`, or `name-2`, `name-3` ... : the first under which no file of `formats` exists in `folder`."""
    candidate, n = name, 1
    while any((folder / f"{candidate}.{fmt}").exists() for fmt in formats):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def export_dialog(screen: Any, session_id: int, folder: str = "", name: str = "", formats: str = "md html json") -> None:
    """Ask where and how to export the session's report, then write it (see the module docstring)."""
    store = screen.store
    values = (folder or str(store.path.parent), name or f"{store.path.stem}-session{session_id}", formats)
    screen.app.push_screen(AskForm("Export the session's report", list(zip(FIELDS, values, strict=True))),
                           guard_call(screen, lambda answer: _chosen(screen, session_id, answer)))


def _chosen(screen: Any, session_id: int, answer: dict[str, str] | None) -> None:
    from auditui.store.reports import FORMATS, check_export

    if not answer:
        return
    folder, name, listed = (answer[field] for field in FIELDS)
    formats = tuple(dict.fromkeys(listed.replace(",", " ").split()))
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise AuditError(f"formats are {', '.join(FORMATS)} (got {listed!r})")
    if "/" in name or "\\" in name:
        raise AuditError("give the file name without a folder (the folder has its own field)")
    base = Path(folder).expanduser()
    targets = {fmt: base / f"{name}.{fmt}" for fmt in formats}
    for fmt, path in targets.items():
        check_export(path, fmt, screen.store.path)
    earlier = [path.name for path in targets.values() if path.exists()]
    if not earlier:
        _write(screen, session_id, targets)
        return

    def decide(yes: bool | None) -> None:
        if yes:
            _write(screen, session_id, targets)
        else:
            export_dialog(screen, session_id, folder, free_name(base, name, formats), listed)

    screen.app.push_screen(Confirm(f"{', '.join(earlier)} already exist in {base} (earlier reports). Overwrite them? "
                                   "(n: choose another name)"), guard_call(screen, decide))


def _write(screen: Any, session_id: int, targets: dict[str, Path]) -> None:
    from auditui.store.reports import render_reports, write_export

    store = screen.store
    next(iter(targets.values())).parent.mkdir(parents=True, exist_ok=True)
    texts = render_reports(store, session_id, tuple(targets))
    written = [write_export(path, texts[fmt], fmt, store.path).name for fmt, path in targets.items()]
    screen.notify(f"wrote {', '.join(written)} in {next(iter(targets.values())).parent}", title="report", markup=False)
