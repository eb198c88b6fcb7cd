"""The session store: durability under kill -9, refusal of unusable files, migrations, atomic writes."""

from __future__ import annotations

import ctypes
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import auditui.store.database as database
from auditui.errors import AuditError
from auditui.store import Store
from auditui.store.schema import MIGRATIONS, SCHEMA_VERSION

TABLES = {"sessions", "prompts", "completions", "labels", "runs", "blobs", "features"}
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


def _filled_store(path: Path, n: int = 3) -> Store:
    store = Store(path)
    session_id = store.create_session("audit")
    prompt_id = store.add_prompt(session_id, "hello", [1, 2, 3])
    for i in range(n):
        store.add_completion(prompt_id, f"completion {i}", [i, i + 1], seed=i, params={"temperature": 1.0})
    return store


# -- durability ---------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys
    from auditui.store import Store
    store = Store(sys.argv[1])
    session_id = store.create_session("kill")
    prompt_id = store.add_prompt(session_id, "p", [1, 2, 3])
    i = 0
    while True:
        cid = store.add_completion(prompt_id, f"completion {i} " + "x" * 3000, list(range(i % 50)), seed=i,
                                   params={"i": i})
        if i % 5 == 0:
            store.set_label(cid, "pos" if i % 2 else "neg")
        print(cid, i, flush=True)
        i += 1
""")


def test_kill_9_while_writing_loses_nothing_reported_committed(tmp_path):
    path = tmp_path / "kill.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    lines = []
    while len(lines) < 400:
        line = child.stdout.readline()
        assert line, "the writer died before it was killed"
        lines.append(line)
    child.send_signal(signal.SIGKILL)
    rest = child.stdout.read()
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    lines += rest.splitlines(keepends=True)
    reported = [tuple(map(int, line.split())) for line in lines if line.endswith("\n")]

    with _raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = Store(path)
    assert store.integrity_check() == "ok"
    rows = {c["id"]: c for c in store.completions()}
    for cid, i in reported:
        assert rows[cid]["text"] == f"completion {i} " + "x" * 3000 and rows[cid]["seed"] == i
        assert rows[cid]["token_ids"] == list(range(i % 50)) and rows[cid]["params"] == {"i": i}
        if i % 5 == 0:
            assert rows[cid]["label"] == ("positive" if i % 2 else "negative")
    assert len(rows) >= len(reported) >= 400


# -- files that cannot be used: one line, exit 2, nothing lost ----------------------------------
def _drop_file_capabilities() -> None:
    """In the child: a root process loses the capabilities that let it ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _cli_error(args: list[str], tmp_path: Path, obey_file_modes: bool = False) -> str:
    """Run the real entry point; assert one `error:` line on stderr and exit code 2; return the line."""
    env = {**os.environ, "AUDITUI_CONFIG": str(tmp_path / "config.toml"),
           "AUDITUI_CACHE_DIR": str(tmp_path / "cache")}
    # Root ignores file modes; without these capabilities it obeys them like any user (CI runs as root).
    drop = _drop_file_capabilities if obey_file_modes and os.geteuid() == 0 else None
    proc = subprocess.run([sys.executable, "-m", "auditui", *args], capture_output=True, text=True, env=env,
                          preexec_fn=drop, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "newer.db"
    _filled_store(path).close()
    with _raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    line = _cli_error(["session", "list", "--db", str(path)], tmp_path)
    assert "newer auditui" in line and str(path) in line
    with pytest.raises(AuditError, match="newer auditui"):
        Store(path)
    assert path.read_bytes() == before
    with _raw(path) as conn:
        assert conn.execute("SELECT name FROM sessions").fetchall() == [("audit",)]
    conn.close()


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = path.read_bytes()
    line = _cli_error(["session", "list", "--db", str(path)], tmp_path)
    assert "not a usable auditui database" in line
    assert path.read_bytes() == before


def test_a_damaged_database_gives_one_line_and_is_not_written(tmp_path):
    path = tmp_path / "damaged.db"
    _filled_store(path, n=200).close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[page:] = bytes((i * 7919) % 251 for i in range(len(data) - page))  # every page after the header page
    path.write_bytes(bytes(data))
    for args in (["session", "list"], ["session", "show"], ["report", "--format", "json"]):
        line = _cli_error([*args, "--db", str(path)], tmp_path)
        assert "malformed" in line or "not a usable" in line
    assert path.read_bytes() == bytes(data)


def test_a_read_only_directory_gives_one_line_and_loses_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "sessions.db"
    _filled_store(path).close()
    before = path.read_bytes()
    folder.chmod(0o555)
    try:
        line = _cli_error(["session", "list", "--db", str(path)], tmp_path, obey_file_modes=True)
        assert "read-only" in line or "readonly" in line
        line = _cli_error(["session", "new", "x", "--db", str(folder / "new.db")], tmp_path, obey_file_modes=True)
        assert str(folder / "new.db") in line
        assert sorted(p.name for p in folder.iterdir()) == ["sessions.db"]
    finally:
        folder.chmod(0o755)
    assert path.read_bytes() == before
    assert [s["name"] for s in Store(path).sessions()] == ["audit"]


# -- migrations ---------------------------------------------------------------------------------
def _tables(path: Path) -> set[str]:
    with _raw(path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    return names


def test_an_empty_file_is_migrated_to_the_current_schema(tmp_path):
    path = tmp_path / "v0.db"
    path.write_bytes(b"")
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    assert TABLES <= _tables(path)
    session_id = Store(path).create_session("after migration")  # reopening migrates nothing again
    assert Store(path).session(session_id)["name"] == "after migration"


def test_a_new_migration_upgrades_an_old_file_and_keeps_its_data(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    _filled_store(path).close()

    def add_colour(db):  # a hypothetical next schema version
        db["sessions"].add_column("colour", str)

    monkeypatch.setattr(database, "MIGRATIONS", [*MIGRATIONS, add_colour])
    monkeypatch.setattr(database, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    session = store.sessions()[0]
    assert session["name"] == "audit" and session["n_completions"] == 3 and "colour" in session


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "v0.db"

    def broken(db):
        db.execute("CREATE TABLE sessions (x)")  # already created by v1: fails mid-way

    monkeypatch.setattr(database, "MIGRATIONS", [*MIGRATIONS, broken])
    monkeypatch.setattr(database, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(AuditError, match="already exists"):
        Store(path)
    with _raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()
    assert not TABLES & _tables(path)  # v1's tables were rolled back with the failed step


# -- the store's API ----------------------------------------------------------------------------
def test_a_multi_statement_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "s.db"
    store = _filled_store(path)
    session_id = store.latest_session_id()
    with _raw(path) as conn:  # the last statement of delete_session will fail
        conn.execute("CREATE TRIGGER keep BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'kept'); END")
    conn.close()
    with pytest.raises(AuditError, match="kept"):
        store.delete_session(session_id)
    assert len(store.prompts(session_id)) == 1 and len(store.completions(session_id)) == 3


def test_sessions_labels_pairs_runs_and_features(tmp_path):
    store = Store(tmp_path / "s.db")
    with pytest.raises(AuditError, match="session new"):
        store.resolve_session(None)
    first = store.create_session("first")
    second = store.create_session("second")
    assert store.resolve_session(None) == second
    prompt_id = store.add_prompt(first, "p", [5, 6])
    assert store.resolve_session(None) == first  # adding to a session makes it the most recent
    ids = [store.add_completion(prompt_id, f"c{i}", [i], seed=10 + i, params={}) for i in range(3)]
    store.set_label(ids[0], "+")
    assert store.pairs(first) == []
    store.set_label(ids[1], "neg")
    store.set_label(ids[2], "pos")
    assert store.pairs(first) == [{"prompt_id": prompt_id, "positive": [ids[0], ids[2]], "negative": [ids[1]]}]
    store.set_label(ids[1], "none")
    assert store.pairs(first) == [] and store.completion(ids[1])["label"] == "unlabelled"
    with pytest.raises(AuditError, match="unknown label"):
        store.set_label(ids[0], "maybe")
    with pytest.raises(AuditError, match="no completion"):
        store.set_label(999, "pos")

    run_id = store.start_run(first, "attribution", {"site": "1/resid_post"})
    store.put_blob(run_id, "scores", b"\x00\x01")
    store.finish_run(run_id, {"top": [1, 2]}, {"headline": "two latents"})
    failed = store.start_run(first, "flow", {})
    store.fail_run(failed, "out of memory")
    runs = store.runs(first)
    assert [(r["kind"], r["status"]) for r in runs] == [("attribution", "done"), ("flow", "failed")]
    assert runs[0]["summary"] == {"headline": "two latents"} and runs[1]["error"] == "out of memory"
    assert store.get_blob(run_id, "scores") == b"\x00\x01"
    assert store.add_feature(first, "1/resid_post", 7, "attribution") == store.add_feature(
        first, "1/resid_post", 7, "flow")

    store.rename_session(first, "  renamed ")
    assert store.session(first)["name"] == "renamed"
    store.delete_session(first)
    assert [s["id"] for s in store.sessions()] == [second]
    with _raw(tmp_path / "s.db") as conn:
        for table in ("prompts", "completions", "labels", "runs", "blobs", "features"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    conn.close()


def test_each_thread_uses_its_own_connection(tmp_path):
    store = Store(tmp_path / "s.db")
    session_id = store.create_session("threads")
    prompt_id = store.add_prompt(session_id, "p")
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(50):
                store.add_completion(prompt_id, f"{k}-{i}", [i], seed=i, params={})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(c["text"] for c in store.completions(session_id)) == sorted(
        f"{k}-{i}" for k in range(4) for i in range(50))


def test_a_v1_database_made_by_wave_1_migrates_in_place_and_keeps_every_row(tmp_path):
    """tests/data/v1_session.db was written by the wave-1 code (CLI: session new, sample, label,
    attribute --check, flow --save, flow deactivate --save, a steering-set feature)."""
    import shutil

    path = tmp_path / "v1.db"
    shutil.copy(Path(__file__).parent.parent / "data" / "v1_session.db", path)
    before = sqlite3.connect(path)
    assert before.execute("PRAGMA user_version").fetchone()[0] == 1
    rows = {table: before.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("sessions", "prompts", "completions", "labels", "runs", "blobs", "features")}
    pairs = before.execute("SELECT * FROM pairs ORDER BY prompt_id").fetchall()
    before.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert store.integrity_check() == "ok"
    after = store.db.conn
    for table, old in rows.items():
        width = len(old[0])  # v2 only appends columns (labels: the same columns, a wider key)
        new = [row[:width] for row in after.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()]
        assert sorted(new) == sorted(old), table
    assert after.execute("SELECT * FROM pairs ORDER BY prompt_id").fetchall() == pairs
    assert all(c["intervention"] is None for c in store.completions(1))
    assert [p["prompt_id"] for p in store.pairs(1)] == [1, 2]
    # a judge's label now sits beside the person's instead of replacing it
    store.set_label(1, "negative", labeller="judge:echo")
    assert store.labels(1) == {"judge:echo": "negative", "user": "positive"}
    assert store.completion(1)["label"] == "positive"
    run = store.run(store.start_run(1, "attribution_check", {}, {"model_id": "m"}, parent_id=2))
    assert run["parent_id"] == 2 and run["provenance"] == {"model_id": "m"}
    assert [r["id"] for r in store.child_runs(2)] == [run["id"]]
