"""Attention heads as runs: scan, pair decomposition and alignment are stored with params and provenance;
refused requests store nothing; the stored terms sum to the stored relative score; a stop is a cancelled run."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import Probe

from auditui.engine import Engine
from auditui.engine.heads import align_pair, capture_states, decompose, heads_for_direction, omega_svd
from auditui.engine.labels import logit_lens_tokens
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import Cancelled
from auditui.store.database import Store
from auditui.workflows.heads import (
    ALIGN_KIND,
    PAIR_KIND,
    SCAN_KIND,
    HeadsAlignRequest,
    HeadsPairRequest,
    HeadsScanRequest,
    decomposition,
    heads_align,
    heads_pair,
    heads_scan,
    scan_result,
    top_aligned_latent,
)

TEXT = "the cat sat on the mat because it was warm, and then it slept."


@pytest.fixture
def engine(loaded, tiny_packs, tmp_path):
    lm = loaded("llama")
    bank = SAEBank.from_specs([str(tiny_packs["llama"])], tmp_path).attach(lm)
    return Engine(lm=lm, bank=bank, cache_dir=tmp_path / "cache")


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "s.db")


def test_scan_pair_and_align_runs_are_stored_with_provenance(engine, store):
    lm, bank = engine.lm, engine.bank
    session_id = store.create_session("heads")
    request = HeadsScanRequest(TEXT, threshold=0.2, top=4, per_head=2)
    scanned = heads_scan(store, engine, session_id, request)
    run = store.run(scanned.run_id)
    assert (run["kind"], run["status"]) == (SCAN_KIND, "done") and run["session_id"] == session_id
    assert run["params"] == {"model": lm.model_id, "pack": bank.pack.name, **dataclasses.asdict(request)}
    assert run["provenance"]["model_id"] == lm.model_id and run["provenance"]["saes"] == {}
    assert run["provenance"]["pack"] == bank.pack.name and run["provenance"]["seeds"] == [0]
    assert store.session(session_id)["model_id"] == lm.model_id
    assert run["result"] == json.loads(json.dumps(scanned.result)) and run["summary"] == scanned.summary
    assert (engine.cache_dir / "heads").is_dir() and list((engine.cache_dir / "heads").glob("omega-*.safetensors"))
    # kept hits: the 4 sparsest overall and the 2 sparsest of every head, sparsest first
    result = scan_result(run["result"])
    ids = lm.prompt_ids(TEXT, chat=False)
    assert result.token_ids == ids and len(run["result"]["tokens"]) == len(ids)
    assert [h.sparsity for h in result.hits] == sorted(h.sparsity for h in result.hits)
    for layer in range(lm.n_layers):
        for head in range(lm.n_heads):
            mine = [h for h in result.hits if (h.layer, h.head) == (layer, head)]
            assert len(mine) >= min(2, result.counts[layer][head])
    assert result.n_hits == sum(map(sum, result.counts)) > len(result.hits)
    assert len(scanned.summary["table"]["rows"]) == 4
    assert any("computed and cached" in note for note in scanned.summary["notes"])
    again = heads_scan(store, engine, session_id, request)
    assert any("read from the cache" in note for note in again.summary["notes"])
    assert again.result["hits"] == scanned.result["hits"]

    # one pair of layer 1 (fed by 0/resid_post), its query counted from the end
    hit = next(h for h in result.hits if h.layer == 1)
    pair = heads_pair(store, engine, session_id, HeadsPairRequest(TEXT, 1, hit.head, hit.query - len(ids), hit.key,
                                                                   align=2))
    run = store.run(pair.run_id)
    assert (run["kind"], run["status"]) == (PAIR_KIND, "done")
    assert (run["params"]["query"], run["params"]["key"]) == (hit.query, hit.key)
    assert run["provenance"]["saes"] == {"0/resid_post": bank.digest(Site(0, "resid_post"))}
    stored = run["result"]
    assert sum(stored["terms"]) == pytest.approx(stored["relative"], abs=1e-5)
    assert stored["sparsity"] == pytest.approx(hit.sparsity, abs=1e-6) and stored["n_recon"] == hit.n_recon
    svd = omega_svd(lm.model)
    direct = decompose(capture_states(lm, ids), svd, 1, hit.head, hit.query, hit.key)
    assert decomposition(stored).terms == pytest.approx(direct.terms, abs=1e-6)
    assert stored["site"] == "0/resid_post" and [a["k"] for a in stored["alignments"]] == direct.ranked()[:2]
    first = stored["alignments"][0]
    expected = align_pair(svd, 1, hit.head, first["k"], bank.output_decoder(Site(0, "resid_post")), top=5)
    assert [m["latent"] for m in first["query"]] == [m.latent for m in expected.query]
    latent = first["query"][0]["latent"]
    assert first["labels"][str(latent)] == logit_lens_tokens(lm, bank.output_decoder(Site(0, "resid_post"))[[latent]], k=5)[0]
    assert len(first["p_values"]["query"]) == 5 and all(0 < p <= 1 for p in first["p_values"]["key"])
    assert stored["query_token"] == run["result"]["query_token"] and pair.summary["headline"].startswith("head L1H")
    best = max(first["query"] + first["key"], key=lambda m: abs(m["cos"]))
    assert top_aligned_latent(stored) == ("0/resid_post", best["latent"])

    # alignment of a singular pair of layer 0 (fed by 0/resid_pre), and of a latent
    aligned = heads_align(store, engine, session_id, HeadsAlignRequest(layer=0, head=3, k=1, top=3))
    run = store.run(aligned.run_id)
    assert (run["kind"], run["status"]) == (ALIGN_KIND, "done") and run["result"]["site"] == "0/resid_pre"
    assert run["provenance"]["saes"] == {"0/resid_pre": bank.digest(Site(0, "resid_pre"))}
    expected = align_pair(svd, 0, 3, 1, bank.output_decoder(Site(0, "resid_pre")), top=3)
    assert [m["latent"] for m in run["result"]["key"]] == [m.latent for m in expected.key]
    assert len(aligned.summary["table"]["rows"]) == 6
    by_latent = heads_align(store, engine, session_id, HeadsAlignRequest(feature="2/resid_post/7"))
    run = store.run(by_latent.run_id)
    assert run["params"]["feature"] == "2/resid_post/7" and run["result"]["feature"] == "2/resid_post/7"
    expected = heads_for_direction(svd, bank.decoder(Site(2, "resid_post"))[7])
    assert [(m["layer"], m["head"], m["k"], m["side"]) for m in run["result"]["matches"]] == [
        (m.layer, m.head, m.k, m.side) for m in expected.matches]
    assert len(run["result"]["matches"]) == 10 and len(run["result"]["label"]) == 5
    assert [r["kind"] for r in store.runs(session_id)] == [SCAN_KIND, SCAN_KIND, PAIR_KIND, ALIGN_KIND, ALIGN_KIND]


def test_refused_requests_store_nothing(engine, store, loaded, tmp_path):
    session_id = store.create_session("refused")
    refused = [
        (heads_scan, HeadsScanRequest(""), "give a text"),
        (heads_scan, HeadsScanRequest(TEXT, threshold=0), "threshold must be in (0, 1]"),
        (heads_scan, HeadsScanRequest(TEXT, threshold=1.5), "threshold must be in (0, 1]"),
        (heads_scan, HeadsScanRequest(TEXT, threshold=float("nan")), "threshold must be in (0, 1]"),
        (heads_scan, HeadsScanRequest(TEXT, top=0), "top must be in 1.."),
        (heads_scan, HeadsScanRequest("t"), "needs at least two"),
        (heads_pair, HeadsPairRequest(TEXT, 3, 0, 5, 1), "layer 3 is out of range"),
        (heads_pair, HeadsPairRequest(TEXT, 0, 4, 5, 1), "head 4 is out of range"),
        (heads_pair, HeadsPairRequest(TEXT, 0, 0, 500, 1), "query token 500 is outside"),
        (heads_pair, HeadsPairRequest(TEXT, 0, 0, -500, 1), "query token -500 is outside"),
        (heads_pair, HeadsPairRequest(TEXT, 0, 0, 0, 0), "the query must be token 1 or later"),
        (heads_pair, HeadsPairRequest(TEXT, 0, 0, 3, 5), "key 5 comes after query 3"),
        (heads_pair, HeadsPairRequest(TEXT, 0, 0, 3, 1, align=-1), "align must be in 0..64"),
        (heads_align, HeadsAlignRequest(), "give a layer and a head"),
        (heads_align, HeadsAlignRequest(layer=0, head=0, feature="1/resid_post/3"), "not both"),
        (heads_align, HeadsAlignRequest(layer=0, head=0, k=16), "singular index k 16 is out of range"),
        (heads_align, HeadsAlignRequest(layer=-1, head=0), "layer -1 is out of range"),
        (heads_align, HeadsAlignRequest(feature="1/resid_post"), "cannot read feature"),
        (heads_align, HeadsAlignRequest(feature="1/resid_post/128"), "out of range for 1/resid_post"),
        (heads_align, HeadsAlignRequest(feature="1/attn_z/3"), "no SAE at 1/attn_z"),
    ]
    for step, request, message in refused:
        with pytest.raises(AuditError, match=message.replace("(", r"\(").replace(")", r"\)")):
            step(store, engine, session_id, request)
    bare = Engine(lm=engine.lm, bank=SAEBank([], device="cpu"), cache_dir=engine.cache_dir)
    with pytest.raises(AuditError, match=r"no residual SAE feeds layer 1: the bank has no 1/resid_pre nor 0/resid_post"):
        heads_align(store, bare, session_id, HeadsAlignRequest(layer=1, head=0))
    gemma = loaded("gemma2")
    windowed = next(layer for layer in range(gemma.n_layers) if gemma.model.config.layer_types[layer] == "sliding_attention")
    long_text = "abcdefghij" * 8  # 80 byte tokens; the tiny Gemma-2's window is 64
    with pytest.raises(AuditError, match="outside layer .* sliding window of 64"):
        heads_pair(store, Engine(lm=gemma, bank=SAEBank([], device="cpu"), cache_dir=tmp_path / "g"), session_id,
                   HeadsPairRequest(long_text, windowed, 0, 79, 1))
    assert store.runs(session_id) == [] and store.session(session_id)["model_id"] == ""

    # a pair without a residual SAE for its layer is still decomposed, with a note instead of latents
    outcome = heads_pair(store, bare, session_id, HeadsPairRequest(TEXT, 1, 0, 10, 4))
    assert outcome.result["alignments"] == [] and outcome.result["site"] is None
    assert any("no residual SAE feeds layer 1" in note for note in outcome.summary["notes"])
    assert store.run(outcome.run_id)["provenance"]["saes"] == {}


def test_unsaved_and_cancelled_runs(engine, store):
    session_id = store.create_session("stops")
    unsaved = heads_scan(None, engine, None, HeadsScanRequest(TEXT))
    assert unsaved.run_id is None and unsaved.result["n_hits"] > 0 and store.runs(session_id) == []
    probe = Probe(stop=lambda events: any(message == "forward pass" for _, _, message in events))
    with pytest.raises(Cancelled):
        heads_scan(store, engine, session_id, HeadsScanRequest(TEXT), probe)
    runs = store.runs(session_id)
    assert [(r["kind"], r["status"]) for r in runs] == [(SCAN_KIND, "cancelled")] and runs[0]["result"] is None
    assert [message for _, _, message in probe.events][:2] == ["Ω SVD of every head", "forward pass"]
