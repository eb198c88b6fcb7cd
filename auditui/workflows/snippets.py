"""Where a latent fires: in the session's own texts (top-activating snippets, per-token values), and its
whole page over the loaded pack's held-out corpus (`engine.latent_page`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditui.engine.diffing import held_out_sequences
from auditui.engine.labels import top_snippets
from auditui.engine.latent_page import latent_page as engine_latent_page
from auditui.engine.reference import text_sequences
from auditui.engine.sites import Site
from auditui.errors import AuditError
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


def latent_page(store: Store, engine: Engine, session_id: int, feature: str, k: int = 8,
                progress: Progress = QUIET) -> dict:
    """The latent's page (`auditui.engine.latent_page`) over the loaded pack's held-out windows and the
    session's unsteered texts; each text where it fires carries its completion's label ("prompt" for a
    prompt without completions), and `corpus.source` names where the snippets come from."""
    pack, notes = engine.bank.pack, []
    corpus = []
    if pack is None:
        notes.append("no SAE pack is loaded, so there is no held-out corpus: only the session's texts are read")
    else:
        try:
            corpus = held_out_sequences(pack.path)
        except AuditError as exc:
            notes.append(str(exc))
    texts = text_sequences(store.prompts(session_id), store.completions(session_id=session_id, steered=False))
    page = engine_latent_page(engine, feature, corpus, texts, k=k, progress=progress)
    labels = {c["id"]: c["label"] for c in store.completions(session_id=session_id)}
    for text in page["texts"]:
        text["label"] = labels.get(text["completion_id"], "prompt")
    page["corpus"]["source"] = f"pack {pack.name} held-out" if corpus else "none"
    page["notes"] = notes + page["notes"]
    return page
