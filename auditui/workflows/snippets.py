"""Where a latent fires in the session's own texts (top-activating snippets, per-token values)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditui.engine.labels import top_snippets
from auditui.engine.sites import Site
from auditui.progress import QUIET, Progress
from auditui.workflows.reference import session_sequences

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store


def session_snippets(store: Store, engine: Engine, session_id: int, site: Site | str, latent: int,
                     k: int = 8, before: int = 24, after: int = 8, progress: Progress = QUIET) -> list[dict]:
    site = Site.parse(site) if isinstance(site, str) else site
    return top_snippets(engine, session_sequences(store, session_id), site, latent, k=k, before=before, after=after,
                        progress=progress)
