"""Schema of the session database, as forward migrations numbered by `PRAGMA user_version`.

Migration N (1-based) brings a database from user_version N-1 to N. Never edit a released
migration; append a new one.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils


def _v1(db: sqlite_utils.Database) -> None:
    db["sessions"].create({"id": int, "name": str, "created": float, "updated": float, "model_id": str,
                           "pack_id": str, "notes": str}, pk="id", not_null={"name", "created"})
    db["prompts"].create({"id": int, "session_id": int, "text": str, "system": str, "chat": int,
                          "prompt_ids": str, "created": float}, pk="id",
                         foreign_keys=[("session_id", "sessions", "id")], not_null={"session_id", "text"})
    db["completions"].create({"id": int, "session_id": int, "prompt_id": int, "text": str, "token_ids": str,
                              "seed": int, "params": str, "model_id": str, "pack_id": str,
                              "finish_reason": str, "created": float}, pk="id",
                             foreign_keys=[("session_id", "sessions", "id"), ("prompt_id", "prompts", "id")],
                             not_null={"session_id", "prompt_id", "text"})
    db["labels"].create({"completion_id": int, "label": str, "labeller": str, "updated": float},
                        pk="completion_id", foreign_keys=[("completion_id", "completions", "id")])
    db["runs"].create({"id": int, "session_id": int, "kind": str, "status": str, "params": str,
                       "summary": str, "result": str, "error": str, "created": float, "finished": float},
                      pk="id", foreign_keys=[("session_id", "sessions", "id")], not_null={"session_id", "kind"})
    db["blobs"].create({"run_id": int, "name": str, "data": bytes}, pk=("run_id", "name"),
                       foreign_keys=[("run_id", "runs", "id")])
    db["features"].create({"id": int, "session_id": int, "site": str, "latent": int, "source": str,
                           "note": str, "created": float}, pk="id",
                          foreign_keys=[("session_id", "sessions", "id")], not_null={"session_id", "site", "latent"})
    db["prompts"].create_index(["session_id"])
    db["completions"].create_index(["prompt_id"])
    db["completions"].create_index(["session_id"])
    db["runs"].create_index(["session_id", "kind"])
    db["features"].create_index(["session_id", "site", "latent"], unique=True)
    # A pair is a prompt with at least one positive and one negative completion.
    db.create_view("pairs", """
        SELECT p.session_id, p.id AS prompt_id,
               SUM(l.label = 'positive') AS n_positive, SUM(l.label = 'negative') AS n_negative
        FROM prompts p JOIN completions c ON c.prompt_id = p.id JOIN labels l ON l.completion_id = c.id
        GROUP BY p.id HAVING n_positive > 0 AND n_negative > 0""")


def _v2(db: sqlite_utils.Database) -> None:
    """Labels keyed by (completion, labeller), so a judge's label never overwrites a person's;
    completions record the steering plan that produced them (NULL: unsteered) and their run;
    runs get a parent (exact checks, sweeps) and one provenance record; the steering set carries a
    strength and the digest of the SAE its latent belongs to. Plain SQL: sqlite-utils' transform
    would commit the migration's transaction half way."""
    for sql in (
        "DROP VIEW pairs",
        """CREATE TABLE labels_v2 (
               completion_id INTEGER NOT NULL REFERENCES completions(id), label TEXT NOT NULL,
               labeller TEXT NOT NULL, updated FLOAT, PRIMARY KEY (completion_id, labeller))""",
        "INSERT INTO labels_v2 SELECT completion_id, label, COALESCE(labeller, 'user'), updated FROM labels",
        "DROP TABLE labels",
        "ALTER TABLE labels_v2 RENAME TO labels",
        "ALTER TABLE completions ADD COLUMN intervention TEXT",
        "ALTER TABLE completions ADD COLUMN run_id INTEGER REFERENCES runs(id)",
        "ALTER TABLE runs ADD COLUMN parent_id INTEGER REFERENCES runs(id)",
        "ALTER TABLE runs ADD COLUMN provenance TEXT",
        "ALTER TABLE features ADD COLUMN strength FLOAT",
        "ALTER TABLE features ADD COLUMN sae_digest TEXT",
        "CREATE INDEX idx_runs_parent_id ON runs (parent_id)",
        # A pair is a prompt with at least one positive and one negative unsteered completion, as a person labelled them.
        f"CREATE VIEW pairs AS {PAIRS_V2}",
    ):
        db.execute(sql)


PAIRS_V2 = """
    SELECT p.session_id, p.id AS prompt_id,
           SUM(l.label = 'positive') AS n_positive, SUM(l.label = 'negative') AS n_negative
    FROM prompts p JOIN completions c ON c.prompt_id = p.id
         JOIN labels l ON l.completion_id = c.id AND l.labeller = 'user'
    WHERE c.intervention IS NULL
    GROUP BY p.id HAVING n_positive > 0 AND n_negative > 0"""

def _v3(db: sqlite_utils.Database) -> None:
    """A session may name a reference model beside the audited one (model diffing, steering toward);
    every call to an LLM judge is kept: what was asked (rubric and its digest, the text's digest),
    what came back (request id, latency, attempts, raw answer, parsed scores or why not). A finished
    call (scored or unscored) is the cache of (judge model, rubric digest, text digest)."""
    for sql in (
        "ALTER TABLE sessions ADD COLUMN reference_model TEXT",
        """CREATE TABLE judge_calls (
               id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES sessions(id),
               run_id INTEGER REFERENCES runs(id), completion_id INTEGER REFERENCES completions(id),
               judge_model TEXT NOT NULL, base_url TEXT, rubric TEXT NOT NULL, rubric_digest TEXT NOT NULL,
               text_digest TEXT NOT NULL, status TEXT NOT NULL, scores TEXT, raw TEXT, error TEXT,
               request_id TEXT, attempts INTEGER, latency FLOAT, created FLOAT)""",
        "CREATE INDEX idx_judge_calls_key ON judge_calls (judge_model, rubric_digest, text_digest)",
        "CREATE INDEX idx_judge_calls_run ON judge_calls (run_id)",
    ):
        db.execute(sql)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)
