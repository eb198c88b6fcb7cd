"""The session's token sequences, and the reference mean ā per site, stored and reused.

`session_sequences(store, session_id)`: every unsteered text of the session once (steered
completions never enter attribution or reference means).

`reference_means(store, engine, session_id, sites, text_file=None) -> Reference`: ā per site over
the session's texts or a text file (`auditui.engine.reference.mean_activations`). Stored as a run of
kind "reference_mean": params {model_id, source, path, digest, sites, n_texts}, result {sites,
tokens: {site: n}}, one blob per site (name = site text, safetensors {"mean": [width] float32}).
A later call with the same model and the same texts (same token-id digest, or same file content)
reuses the stored means and computes only the sites it lacks. `Reference.runs` maps each site to
the run holding its ā; `load_reference(store, runs)` reads them back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from auditui.engine.reference import TokenSeq, check_vocab, file_sequences, mean_activations, sequences_digest, text_sequences
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

REFERENCE_KIND = "reference_mean"


@dataclass
class Reference:
    means: dict[Site, Tensor]  # site -> ā [width] float32 on the engine device
    runs: dict[Site, int]  # site -> id of the reference_mean run holding it
    source: str  # "session" or the text file path
    tokens: dict[Site, int] = field(default_factory=dict)  # positions averaged per site


def session_sequences(store: Store, session_id: int) -> list[TokenSeq]:
    seqs = text_sequences(store.prompts(session_id), store.completions(session_id=session_id, steered=False))
    if not seqs:
        raise AuditError(f"session {session_id} has no prompts yet; add and sample some first")
    return seqs


def reference_texts(engine: Engine, store: Store, session_id: int, text_file: Path | None
                    ) -> tuple[list[TokenSeq], dict]:
    """The session's texts or a text file's windows, and their key {model_id, source, path, digest}."""
    if text_file is None:
        seqs = session_sequences(store, session_id)
        key = {"model_id": engine.lm.model_id, "source": "session", "path": "", "digest": sequences_digest(seqs)}
    else:
        seqs = file_sequences(engine.lm, Path(text_file))
        key = {"model_id": engine.lm.model_id, "source": "file", "path": str(Path(text_file).resolve()),
               "digest": hashlib.sha256(Path(text_file).read_bytes()).hexdigest()}
    check_vocab(engine.lm, seqs)
    return seqs, key


def stored_means(store: Store, session_id: int, key: dict, device: torch.device) -> Reference:
    """The means already stored for `key` (model + texts), site by site."""
    found = Reference(means={}, runs={}, source=key["path"] or key["source"])
    for run in store.runs(session_id, REFERENCE_KIND):
        if run["status"] != "done" or {k: run["params"].get(k) for k in key} != key:
            continue
        for site_text, n_tokens in run["result"]["tokens"].items():
            site = Site.parse(site_text)
            found.means.setdefault(site, _load_mean(store, run["id"], site).to(device))
            found.runs.setdefault(site, run["id"])
            found.tokens.setdefault(site, n_tokens)
    return found


def _load_mean(store: Store, run_id: int, site: Site) -> Tensor:
    data = store.get_blob(run_id, str(site))
    if data is None:
        raise AuditError(f"reference run {run_id} lost its mean for {site}; delete the run and recompute")
    return load_tensors(data)["mean"]


def load_reference(store: Store, runs: dict[str, int], device: torch.device) -> dict[Site, Tensor]:
    """{site text: run id} -> {site: ā [width]} on `device`."""
    return {Site.parse(site): _load_mean(store, run_id, Site.parse(site)).to(device)
            for site, run_id in runs.items()}


def reference_means(store: Store, engine: Engine, session_id: int, sites: list[Site],
                    text_file: Path | str | None = None, batch_size: int = 8,
                    progress: Progress = QUIET) -> Reference:
    """ā for each site: stored ones reused, missing ones computed in one pass and stored."""
    seqs, key = reference_texts(engine, store, session_id, Path(text_file) if text_file else None)
    reference = stored_means(store, session_id, key, engine.lm.device)
    missing = [site for site in dict.fromkeys(sites) if site not in reference.means]
    if not missing:
        return reference
    params = {**key, "sites": [str(s) for s in missing], "n_texts": len(seqs)}
    with recorded_run(store, session_id, REFERENCE_KIND, params, provenance(engine.lm)) as run:
        means, counts = mean_activations(engine.lm, seqs, missing, batch_size, progress)
        for site in missing:
            store.put_blob(run.run_id, str(site), save_tensors({"mean": means[site].cpu().contiguous()}))
        run.done({"sites": [str(s) for s in missing], "tokens": {str(s): counts[s] for s in missing}},
                 {"headline": f"reference mean over {len(seqs)} texts ({key['source']}) "
                              f"at {', '.join(str(s) for s in missing)}"})
    reference.means.update(means)
    reference.runs.update({site: run.run_id for site in missing})
    reference.tokens.update(counts)
    return reference
