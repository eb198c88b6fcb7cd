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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1]
SCHEMA_VERSION = len(MIGRATIONS)
