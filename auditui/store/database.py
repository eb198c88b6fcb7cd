"""Store: one SQLite file holding many sessions, through sqlite-utils.

* WAL mode; one connection per thread (connections never cross threads).
* Every write is its own committed transaction, made when the user acts.
* The schema version lives in `PRAGMA user_version`; older files are migrated forward in one
  transaction, newer ones are refused untouched.
* A newer schema, a corrupt file or an unwritable location raise AuditError (one line).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from auditui.errors import AuditError
from auditui.store.schema import MIGRATIONS, SCHEMA_VERSION
from auditui.text import check_text

LABELS = ("positive", "negative", "unlabelled")
JUDGE_CALL_COLUMNS = ("run_id", "completion_id", "judge_model", "base_url", "rubric", "rubric_digest", "text_digest",
                      "status", "raw", "error", "request_id", "attempts", "latency")
PERSON = "user"  # the labeller of a person's labels; a judge labels as "judge:<model>"


def _now() -> float:
    return time.time()


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _loads(value: str | None) -> Any:
    return None if value in (None, "") else json.loads(value)


def _check_id(value: int, what: str) -> None:
    """Ids beyond SQLite's 64-bit integers are refused with a message, not an OverflowError."""
    if not -(2**63) <= int(value) < 2**63:
        raise AuditError(f"no {what} {value}: ids are 64-bit integers")


@contextmanager
def database_errors(path: Path) -> Iterator[None]:
    """Turn SQLite failures inside the block (damaged file, read-only place, lock) into one-line AuditErrors."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        reason = str(exc)
        if "readonly" in reason or "unable to open" in reason:
            raise AuditError(f"cannot write session database {path}: {reason} "
                             "(is the directory read-only? pass --db elsewhere)") from None
        if "malformed" in reason or "not a database" in reason:
            raise AuditError(f"{path} is not a usable auditui database: {reason}") from None
        raise AuditError(f"session database {path}: {reason}") from None


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._local = threading.local()
        self.damaged: list[str] = []  # rows read with a damaged JSON column (see _decoded)
        self._open_and_migrate()

    # -- connections ---------------------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection (created on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite_utils.Database(self._connect(), execute_plugins=False)
        return db

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 30000")
            return conn
        except (sqlite3.Error, OSError) as exc:
            raise AuditError(f"cannot open session database {self.path}: {exc}") from None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None

    def _open_and_migrate(self) -> None:
        try:
            with database_errors(self.path):
                db = self.db
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise AuditError(f"{self.path} was written by a newer auditui (schema {version} > "
                                     f"{SCHEMA_VERSION}); upgrade auditui to open it")
                if version == 0 and db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                    raise AuditError(f"{self.path} is an SQLite database of another program, not an auditui "
                                     "session database; it is left untouched (pass --db elsewhere)")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise AuditError(f"cannot use WAL journaling for {self.path} (got {mode})")
                if version < SCHEMA_VERSION:
                    self._migrate()
        except AuditError:
            self.close()
            raise

    def _migrate(self) -> None:
        """All pending migrations and the new version in one transaction (another process may race us)."""
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One IMMEDIATE transaction: it waits for other writers (busy timeout) instead of failing when
        a read snapshot cannot be upgraded, and commits every statement inside together, or none."""
        with database_errors(self.path):
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.commit()

    def integrity_check(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]

    # -- sessions ------------------------------------------------------------------------------
    def create_session(self, name: str, model_id: str = "", pack_id: str = "") -> int:
        check_text(name, "the session name")
        if not name.strip():
            raise AuditError("a session needs a name")
        with self._write() as db:
            now = _now()
            return db["sessions"].insert({"name": name.strip(), "created": now, "updated": now,
                                          "model_id": model_id, "pack_id": pack_id, "notes": ""}).last_pk

    def sessions(self) -> list[dict]:
        return list(self.db.query("""
            SELECT s.*, (SELECT COUNT(*) FROM prompts p WHERE p.session_id = s.id) AS n_prompts,
                   (SELECT COUNT(*) FROM completions c WHERE c.session_id = s.id) AS n_completions,
                   (SELECT COUNT(*) FROM runs r WHERE r.session_id = s.id) AS n_runs
            FROM sessions s ORDER BY s.updated DESC, s.id DESC"""))

    def session(self, session_id: int) -> dict:
        _check_id(session_id, "session")
        rows = list(self.db.query("SELECT * FROM sessions WHERE id = ?", [session_id]))
        if not rows:
            raise AuditError(f"no session {session_id} in {self.path}")
        return rows[0]

    def latest_session_id(self) -> int | None:
        row = self.db.execute("SELECT id FROM sessions ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def resolve_session(self, session_id: int | None) -> int:
        """The given session, or the most recently used one; a clear error when there is none."""
        if session_id is not None:
            return int(self.session(session_id)["id"])
        latest = self.latest_session_id()
        if latest is None:
            raise AuditError(f"no session in {self.path} yet; create one with: auditui session new NAME")
        return latest

    def touch_session(self, session_id: int, **fields: Any) -> None:
        with self._write() as db:
            db["sessions"].update(session_id, {"updated": _now(), **fields})

    def rename_session(self, session_id: int, name: str) -> None:
        check_text(name, "the session name")
        if not name.strip():
            raise AuditError("a session needs a name")
        self.session(session_id)
        self.touch_session(session_id, name=name.strip())

    def delete_session(self, session_id: int) -> None:
        self.session(session_id)
        with self._write() as db:
            for sql in (
                "DELETE FROM blobs WHERE run_id IN (SELECT id FROM runs WHERE session_id = ?)",
                "DELETE FROM judge_calls WHERE session_id = ?",
                "DELETE FROM runs WHERE session_id = ?",
                "DELETE FROM labels WHERE completion_id IN (SELECT id FROM completions WHERE session_id = ?)",
                "DELETE FROM completions WHERE session_id = ?",
                "DELETE FROM prompts WHERE session_id = ?",
                "DELETE FROM features WHERE session_id = ?",
                "DELETE FROM sessions WHERE id = ?",
            ):
                db.execute(sql, [session_id])

    # -- prompts and completions ---------------------------------------------------------------
    def add_prompt(self, session_id: int, text: str, prompt_ids: list[int] | None = None,
                   system: str | None = None, chat: bool = True) -> int:
        self.session(session_id)
        with self._write() as db:
            pk = db["prompts"].insert({"session_id": session_id, "text": text, "system": system,
                                       "chat": int(chat), "prompt_ids": _json(prompt_ids),
                                       "created": _now()}).last_pk
            db["sessions"].update(session_id, {"updated": _now()})
            return pk

    def prompts(self, session_id: int) -> list[dict]:
        rows = self.db.query("SELECT * FROM prompts WHERE session_id = ? ORDER BY id", [session_id])
        return [self._decoded("prompts", row, ("prompt_ids",)) for row in rows]

    def prompt(self, prompt_id: int) -> dict:
        _check_id(prompt_id, "prompt")
        rows = list(self.db.query("SELECT * FROM prompts WHERE id = ?", [prompt_id]))
        if not rows:
            raise AuditError(f"no prompt {prompt_id}")
        return self._decoded("prompts", rows[0], ("prompt_ids",))

    def delete_empty_prompt(self, prompt_id: int) -> bool:
        """Remove a prompt that has no completion (e.g. its sampling was cancelled at once)."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM completions WHERE prompt_id = ? LIMIT 1", [prompt_id]).fetchone():
                return False
            db.execute("DELETE FROM prompts WHERE id = ?", [prompt_id])
            return True

    def add_completion(self, prompt_id: int, text: str, token_ids: list[int], seed: int,
                       params: dict, model_id: str = "", pack_id: str = "", finish_reason: str = "",
                       intervention: dict | None = None, run_id: int | None = None) -> int:
        """A completion; `intervention` is the steering plan that produced it (None: unsteered)."""
        prompt = self.prompt(prompt_id)
        with self._write() as db:
            return db["completions"].insert({
                "session_id": prompt["session_id"], "prompt_id": prompt_id, "text": text,
                "token_ids": _json(token_ids), "seed": seed, "params": _json(params), "model_id": model_id,
                "pack_id": pack_id, "finish_reason": finish_reason, "created": _now(),
                "intervention": _json(intervention), "run_id": run_id}).last_pk

    def completions(self, session_id: int | None = None, prompt_id: int | None = None,
                    steered: bool | None = None) -> list[dict]:
        """Completions by session and/or prompt; steered False/True: only unsteered/steered ones."""
        where, args = [], []
        if session_id is not None:
            where.append("c.session_id = ?")
            args.append(session_id)
        if prompt_id is not None:
            where.append("c.prompt_id = ?")
            args.append(prompt_id)
        if steered is not None:
            where.append(f"c.intervention IS {'NOT ' if steered else ''}NULL")
        return self._completion_rows(" AND ".join(where), args)

    def completion(self, completion_id: int) -> dict:
        _check_id(completion_id, "completion")
        rows = self.completions_by_ids([completion_id])
        if not rows:
            raise AuditError(f"no completion {completion_id}")
        return rows[0]

    def completions_by_ids(self, ids: list[int]) -> list[dict]:
        if not ids:
            return []
        return self._completion_rows(f"c.id IN ({','.join('?' * len(ids))})", list(ids))

    def _completion_rows(self, where: str, args: list[Any]) -> list[dict]:
        """Completions (with a person's label) matching an SQL condition on `c`, decoded, by id."""
        sql = ("SELECT c.*, COALESCE(l.label, 'unlabelled') AS label, l.labeller FROM completions c "
               f"LEFT JOIN labels l ON l.completion_id = c.id AND l.labeller = '{PERSON}'"
               + (f" WHERE {where}" if where else "") + " ORDER BY c.id")
        return [self._decoded("completions", row, ("token_ids", "params", "intervention"))
                for row in self.db.query(sql, args)]

    def labels(self, completion_id: int) -> dict[str, str]:
        """Every labeller's label of a completion: {labeller: label}."""
        return {row["labeller"]: row["label"] for row in self.db.query(
            "SELECT labeller, label FROM labels WHERE completion_id = ? ORDER BY labeller", [completion_id])}

    def set_label(self, completion_id: int, label: str, labeller: str = PERSON) -> None:
        """Label a completion as `labeller` sees it; other labellers' labels are kept."""
        aliases = {"pos": "positive", "+": "positive", "neg": "negative", "-": "negative",
                   "none": "unlabelled", "0": "unlabelled"}
        label = aliases.get(label, label)
        if label not in LABELS:
            raise AuditError(f"unknown label {label!r}; use positive/pos/+, negative/neg/- or none/0")
        completion = self.completion(completion_id)
        with self._write() as db:
            db["labels"].upsert({"completion_id": completion_id, "label": label, "labeller": labeller,
                                 "updated": _now()}, pk=("completion_id", "labeller"))
            db["sessions"].update(completion["session_id"], {"updated": _now()})

    def pairs(self, session_id: int) -> list[dict]:
        """Prompts with both labels (a person's, unsteered completions only):
        {prompt_id, positive: [completion ids], negative: [...]}."""
        pairs: dict[int, dict] = {}
        for row in self.db.query(f"""
                SELECT c.prompt_id, c.id, l.label FROM completions c
                JOIN labels l ON l.completion_id = c.id AND l.labeller = '{PERSON}'
                WHERE c.prompt_id IN (SELECT prompt_id FROM pairs WHERE session_id = ?)
                  AND l.label IN ('positive', 'negative') AND c.intervention IS NULL
                ORDER BY c.prompt_id, c.id""", [session_id]):
            pair = pairs.setdefault(row["prompt_id"], {"prompt_id": row["prompt_id"], "positive": [], "negative": []})
            pair[row["label"]].append(row["id"])
        return list(pairs.values())

    # -- runs (results of attribution, flow, steering, heads, judge ...) -----------------------
    def start_run(self, session_id: int, kind: str, params: dict, provenance: dict | None = None,
                  parent_id: int | None = None) -> int:
        self.session(session_id)
        if parent_id is not None:
            self.run(parent_id)
        with self._write() as db:
            pk = db["runs"].insert({"session_id": session_id, "kind": kind, "status": "running",
                                    "params": _json(params), "provenance": _json(provenance),
                                    "parent_id": parent_id, "created": _now()}).last_pk
            db["sessions"].update(session_id, {"updated": _now()})
            return pk

    def finish_run(self, run_id: int, result: Any, summary: Any = None, status: str = "done") -> None:
        """Record a run's result; status "cancelled" keeps what was computed before the stop."""
        with self._write() as db:
            db["runs"].update(run_id, {"status": status, "result": _json(result), "summary": _json(summary),
                                       "finished": _now()})

    def fail_run(self, run_id: int, error: str, status: str = "failed") -> None:
        with self._write() as db:
            db["runs"].update(run_id, {"status": status, "error": error, "finished": _now()})

    def runs(self, session_id: int, kind: str | None = None) -> list[dict]:
        sql = "SELECT * FROM runs WHERE session_id = ?" + (" AND kind = ?" if kind else "") + " ORDER BY id"
        args: list[Any] = [session_id] + ([kind] if kind else [])
        return [self._run_row(row) for row in self.db.query(sql, args)]

    def child_runs(self, run_id: int, kind: str | None = None) -> list[dict]:
        sql = "SELECT * FROM runs WHERE parent_id = ?" + (" AND kind = ?" if kind else "") + " ORDER BY id"
        return [self._run_row(row) for row in self.db.query(sql, [run_id] + ([kind] if kind else []))]

    def run(self, run_id: int) -> dict:
        _check_id(run_id, "run")
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        if not rows:
            raise AuditError(f"no run {run_id}")
        return self._run_row(rows[0])

    def _run_row(self, row: dict) -> dict:
        return self._decoded("runs", row, ("params", "summary", "result", "provenance"))

    def _decoded(self, table: str, row: dict, columns: tuple[str, ...]) -> dict:
        """A row with its JSON columns decoded; a damaged value reads as None and is named in `damaged`."""
        out = dict(row)
        for column in columns:
            try:
                out[column] = _loads(row[column])
            except ValueError:
                out[column] = None
                note = f"{table} row {row['id']}: {column} is damaged (not JSON); shown as empty"
                if note not in self.damaged:
                    self.damaged.append(note)
        return out

    def put_blob(self, run_id: int, name: str, data: bytes) -> None:
        with self._write() as db:
            db["blobs"].upsert({"run_id": run_id, "name": name, "data": data}, pk=("run_id", "name"))

    def get_blob(self, run_id: int, name: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM blobs WHERE run_id = ? AND name = ?", [run_id, name]).fetchone()
        return row[0] if row else None

    # -- judge calls: the record of every call, and the cache of finished ones -------------------
    def add_judge_calls(self, session_id: int, calls: list[dict]) -> list[int]:
        """Store judge calls (JUDGE_CALL_COLUMNS; scores as a dict) in one transaction; their ids."""
        self.session(session_id)
        now = _now()
        with self._write() as db:
            return [db["judge_calls"].insert({**{k: call.get(k) for k in JUDGE_CALL_COLUMNS}, "session_id": session_id,
                                              "scores": _json(call.get("scores")), "created": now}).last_pk
                    for call in calls]

    def cached_judge_call(self, judge_model: str, rubric_digest: str, text_digest: str) -> dict | None:
        """The newest finished (scored or unscored) call for this key, or None: transport errors are not cached."""
        rows = list(self.db.query("""
            SELECT * FROM judge_calls WHERE judge_model = ? AND rubric_digest = ? AND text_digest = ?
              AND status IN ('scored', 'unscored') ORDER BY id DESC LIMIT 1""", [judge_model, rubric_digest, text_digest]))
        call = self._decoded("judge_calls", rows[0], ("scores",)) if rows else None
        return None if call and call["status"] == "scored" and call["scores"] is None else call  # damaged: ask again

    def judge_calls(self, session_id: int, run_id: int | None = None) -> list[dict]:
        sql = "SELECT * FROM judge_calls WHERE session_id = ?" + (" AND run_id = ?" if run_id is not None else "")
        args: list[Any] = [session_id] + ([run_id] if run_id is not None else [])
        return [self._decoded("judge_calls", row, ("scores",)) for row in self.db.query(sql + " ORDER BY id", args)]

    # -- features chosen for later steps (e.g. a steering set) ---------------------------------
    def add_feature(self, session_id: int, site: str, latent: int, source: str, note: str = "",
                    strength: float | None = None, sae_digest: str = "") -> int:
        """Add a latent to the session's steering set (once per site and latent)."""
        self.session(session_id)
        with self._write() as db:
            existing = db.execute("SELECT id FROM features WHERE session_id = ? AND site = ? AND latent = ?",
                                  [session_id, site, latent]).fetchone()
            if existing:
                return existing[0]
            return db["features"].insert({"session_id": session_id, "site": site, "latent": latent,
                                          "source": source, "note": note, "strength": strength,
                                          "sae_digest": sae_digest, "created": _now()}).last_pk

    def remove_feature(self, feature_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM features WHERE id = ?", [feature_id])

    def features(self, session_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM features WHERE session_id = ? ORDER BY site, latent",
                                  [session_id]))
