"""A targeted dictionary (issue 18): SAEs trained on a session's texts plus a pack's corpus slice, built as a
pack through the same trainer and export, recorded as a run, used beside the base pack."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_SOURCES, attribution, labelled_session, tiny_plan
from typer.testing import CliRunner

from auditui.cli import app
from auditui.config import load_settings
from auditui.engine.corpus import TokenCorpus
from auditui.engine.packs import build_pack
from auditui.engine.reference import TokenSeq
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site, SiteHooks
from auditui.engine.targeted import targeted_corpus
from auditui.errors import AuditError
from auditui.store import Store
from auditui.workflows.engine import open_engine
from auditui.workflows.reference import session_sequences
from auditui.workflows.targeted import TARGETED_KIND, TargetedRequest, build_targeted

SITE = Site(2, "resid_post")
WORDS = ["orca", "krill", "baleen", "pod", "breach", "fluke", "blowhole", "plankton"]
SPEC = [(f"Tell me about item {i}.", [(" ".join(WORDS[(i + j) % 8] for j in range(12)), "positive"),
                                      ("It is a plain thing of no interest at all.", "negative")]) for i in range(8)]


def test_windows_keep_every_session_token_and_the_share():
    seqs = [TokenSeq(ids=tuple(range(1, 2 + n)), n_prompt=1) for n in (5, 9, 3, 7, 6, 4, 8, 2, 10)]
    corpus = TokenCorpus(train=torch.arange(4000).reshape(20, 200) + 100, held_out=torch.arange(400).reshape(2, 200) + 100,
                         train_sources=["x"] * 20, provenance={})
    mixed = targeted_corpus(seqs, corpus, train_tokens=600, share=0.5, pad_id=0, seed=1)
    assert mixed.seq_len == 11  # the longest sequence
    session = [i for i, s in enumerate(mixed.train_sources) if s == "session"]
    rows = {tuple(mixed.train[i, :mixed.train_lengths[i]].tolist()) for i in session}
    train = [seq for i, seq in enumerate(seqs) if i % 8 != 7]  # the 8th is held out
    assert rows == {seq.ids for seq in train}
    assert all((mixed.train[i, mixed.train_lengths[i]:] == 0).all() for i in session)  # padding after each text
    tokens = mixed.provenance["session"]["train_tokens"]
    assert tokens == mixed.provenance["session"]["epochs"] * sum(len(s) for s in train) >= 300
    assert mixed.provenance["corpus"]["train_tokens"] == 300 - 300 % 11 + 11 * (300 % 11 > 0)  # ceil(300 / 11) windows
    assert mixed.held_out_lengths.tolist()[-1] == len(seqs[7]) and mixed.held_out_lengths.tolist()[0] == 11
    with pytest.raises(AuditError, match="between 0 and 1"):
        targeted_corpus(seqs, corpus, 600, share=1.0)


def _fve(sae, acts: torch.Tensor) -> float:
    """Fraction of variance explained over [n, d] activations, by an independent encode/decode."""
    with torch.no_grad():
        recon = sae.decode(sae.encode(acts))
    return float(1 - (recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())


def session_acts(lm, store, session_id) -> torch.Tensor:
    rows = []
    for seq in session_sequences(store, session_id):
        with torch.no_grad(), SiteHooks(lm.model, reads=[SITE]) as hooks:
            lm.model(torch.tensor([seq.ids]))
        rows.append(hooks.acts[SITE][0, 1:].float())  # position 0 (the sink) never trains
    return torch.cat(rows)


def test_a_targeted_dictionary_fits_the_session_and_is_used_beside_the_base_pack(tmp_path, tiny_models, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUDITUI_CACHE_DIR", str(cache))
    base = build_pack(tiny_plan("base", model=str(tiny_models["llama"]), layers=(2,)), cache, "cpu", "float32",
                      sources=TINY_SOURCES)
    settings = load_settings(model=str(tiny_models["llama"]), pack="base", db=str(tmp_path / "s.db"), device="cpu",
                             dtype="float32", cache_dir=str(cache))
    engine = open_engine(settings)
    store = Store(settings.db)
    sid = labelled_session(store, engine.lm, SPEC)
    run_id = build_targeted(store, engine.lm, sid, TargetedRequest("whales-t", (SITE,), "base", d_sae=64, k=4,
                                                                  train_tokens=30_000, share=0.75), cache)
    run = store.run(run_id)
    assert run["kind"] == TARGETED_KIND and run["status"] == "done"
    manifest = json.loads((cache / "packs" / "whales-t" / "pack.json").read_text())
    targeted = manifest["targeted"]
    assert targeted["session_id"] == sid and targeted["base_pack"] == "base" and list(manifest["saes"]) == [str(SITE)]
    used = manifest["corpus"]
    assert used["session"]["train_tokens_used"] > 2 * used["corpus"]["train_tokens_used"] > 0  # share 0.75
    own = SAEBank.from_specs(["whales-t"], cache).attach(engine.lm)
    acts = session_acts(engine.lm, store, sid)
    fitted, general = _fve(own.sae(SITE), acts), _fve(engine.bank.sae(SITE), acts)
    assert fitted > general + 0.1, (fitted, general)  # it represents the session's texts better than the pack
    first = attribution(engine, store, sid, [SITE], top_k=5)
    targeted_engine = open_engine(settings.with_overrides(pack="whales-t"))
    second = attribution(targeted_engine, store, sid, [SITE], top_k=5)
    digests = [store.run(r)["provenance"]["saes"][str(SITE)] for r in (first, second)]
    assert digests == [engine.bank.digest(SITE), own.digest(SITE)] and digests[0] != digests[1]
    assert [store.run(r)["provenance"]["pack"] for r in (first, second)] == ["base", "whales-t"]
    store.close()
    again = CliRunner().invoke(app, ["pack", "targeted", "whales-t", "--sites", str(SITE), "--session", str(sid),
                                     "--model", str(tiny_models["llama"]), "--db", settings.db, "--base", str(base)])
    assert again.exit_code == 2 and again.output.strip().splitlines() == [
        "error: pack whales-t already exists; choose another name or pass --force to replace it"]
