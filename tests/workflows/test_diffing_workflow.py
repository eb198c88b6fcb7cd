"""Model diffing as a run: a direction planted in one layer of the audited model tops the ranking,
the within-model baseline (random labels) does not find it; both models recorded; the attribution
column; the reference model of a session."""

from __future__ import annotations

import random

import pytest
from helpers import attribution
from sae_lens import SAE

from auditui.config import load_settings
from auditui.engine.sampling import SamplingParams
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.store import Store
from auditui.testing import build_planted_model, build_tiny_model
from auditui.workflows.diffing import (
    DIFF_KIND,
    DiffRequest,
    attribution_with_diff,
    diff_activation,
    diff_deltas,
    load_models,
    load_reference,
    session_reference,
    set_reference_model,
)
from auditui.workflows.engine import open_engine
from auditui.workflows.sample import SampleRequest, sample

SITE = Site(2, "resid_post")  # read one layer after the planted edit
PLANT_LAYER, LATENT, SCALE = 1, 5, 4.0  # residual norms of the tiny gpt2 are ~23
PROMPTS = ["The river rose in the spring", "Tell me a joke about cats", "def parse(text):", "Once upon a time"]


@pytest.fixture(scope="module")
def planted(tiny_models, tiny_packs, tmp_path_factory):
    """(audited dir, reference dir, pack): the tiny gpt2 with SCALE * d_LATENT added at layer 1's MLP output."""
    sae = SAE.load_from_disk(tiny_packs["gpt2"] / f"{SITE.kind}_{SITE.layer}")
    direction = sae.W_dec[LATENT].detach() / sae.W_dec[LATENT].detach().norm()
    audited = build_planted_model(tiny_models["gpt2"], tmp_path_factory.mktemp("planted") / "tiny-gpt2-planted",
                                  PLANT_LAYER, direction, SCALE)
    return audited, tiny_models["gpt2"], tiny_packs["gpt2"]


@pytest.fixture
def setup(planted, tmp_path):
    """(store, audited engine, reference model, session): 4 prompts x 6 on-policy completions of the audited model."""
    audited, reference, pack = planted
    settings = load_settings(model=str(audited), pack=str(pack), db=str(tmp_path / "s.db"), device="cpu",
                             dtype="float32")
    engine = open_engine(settings)
    store = Store(settings.db)
    session_id = store.create_session("planted")
    params = SamplingParams(temperature=1.0, max_new_tokens=12, chat=False)
    for i, prompt in enumerate(PROMPTS):
        sample(store, engine.lm, session_id, SampleRequest(prompt, 6, params, seed=10 * i, batch_size=6))
    return store, engine, load_reference(settings, str(reference), engine.lm), session_id


def _random_labels(store, session_id, seed):
    rng = random.Random(seed)
    for prompt in store.prompts(session_id):
        labels = ["positive"] * 3 + ["negative"] * 3
        rng.shuffle(labels)
        for row, label in zip(store.completions(prompt_id=prompt["id"]), labels):
            store.set_label(row["id"], label)


def test_planted_latent_tops_model_diffing_not_the_within_model_baseline(setup):
    store, engine, reference, session_id = setup
    within_ranks = []
    for seed in range(3):
        _random_labels(store, session_id, seed)
        run_id = attribution(engine, store, session_id, [SITE], top_k=10)
        diff_id = diff_activation(store, engine, reference, session_id, DiffRequest(sites=(SITE,), top_k=10))
        result = store.run(diff_id)["result"]
        top = result["rows"][0]
        assert (top["latent"], top["rank"]) == (LATENT, 1)
        assert top["delta_act"] > 2 * result["rows"][1]["delta_act"]
        assert result["sites"][str(SITE)]["attribution_run"] == run_id
        within_ranks.append(top["within_rank"])
    assert min(within_ranks) > 1, within_ranks


def test_the_run_records_both_models_and_the_attribution_gets_a_model_diffing_column(setup, tmp_path):
    store, engine, reference, session_id = setup
    _random_labels(store, session_id, 0)
    run_id = attribution(engine, store, session_id, [SITE, Site(1, "mlp_out")], top_k=6)
    diff_id = diff_activation(store, engine, reference, session_id, DiffRequest(top_k=6), attribution_run=run_id)
    run = store.run(diff_id)
    assert run["kind"] == DIFF_KIND and run["status"] == "done" and run["parent_id"] == run_id
    assert run["params"]["sites"] == [str(s) for s in engine.bank.sites]  # default: every site with an SAE
    assert run["params"]["model_id"] == "tiny-gpt2-planted" and run["params"]["reference_model_id"] == "tiny-gpt2"
    assert run["provenance"]["model_id"] == "tiny-gpt2-planted"
    assert run["provenance"]["reference_model"] == {"model_id": "tiny-gpt2", "model_source": reference.source,
                                                    "device": "cpu", "dtype": "float32"}
    assert run["provenance"]["saes"] == engine.sae_digests(engine.bank.sites)
    sites = run["result"]["sites"]
    assert sites[str(SITE)]["attribution_run"] == run_id and sites["0/resid_pre"]["attribution_run"] is None
    assert sites["0/resid_pre"]["overlap_attr"] is None and 0 <= sites[str(SITE)]["overlap_attr"] <= 6
    assert any(f"attribution run {run_id} did not attribute" in note and "0/resid_pre" in note and str(SITE) not in note
               for note in run["result"]["notes"])
    deltas = diff_deltas(store, diff_id)
    for row in run["result"]["rows"]:
        assert row["delta_act"] == pytest.approx(float(deltas[row["site"]][row["latent"]]), abs=1e-6)
        assert row["delta_act"] == pytest.approx(row["audited"] - row["reference"], abs=1e-5)
    assert deltas["0/resid_pre"].abs().max() < 1e-5  # before the planted layer both models agree
    merged = attribution_with_diff(store, run_id)
    assert merged["result"]["diff_run"] == diff_id and "Δ-act models" in merged["summary"]["table"]["columns"]
    for row in merged["result"]["rows"]:
        assert row["delta_diff"] == pytest.approx(float(deltas[row["site"]][row["latent"]]))
        assert row["diff_rank"] >= 1
    assert "; with model-diffing Δ-activation: 2/resid_post " in merged["summary"]["headline"]
    for site in (str(SITE), "1/mlp_out"):  # the same two top-6 sets, seen from either run
        assert merged["result"]["sites"][site]["overlap_diff"] == sites[site]["overlap_attr"]
    assert "delta_diff" not in store.run(run_id)["result"]["rows"][0]  # the attribution run itself is untouched


def test_texts_from_a_file_or_the_packs_held_out_windows(setup, planted, tmp_path):
    import shutil

    from auditui.engine.corpus import Source, load_source, token_sequences
    from auditui.engine.packs import WorkDir, save_atomic

    store, engine, reference, session_id = setup
    text = tmp_path / "t.txt"
    text.write_text("The committee met on Tuesday to discuss the budget of the new library. " * 8)
    run = store.run(diff_activation(store, engine, reference, session_id, DiffRequest((SITE,), 3, text_file=str(text))))
    assert run["params"]["source"] == "file" and run["result"]["source"] == str(text.resolve())
    assert run["result"]["rows"][0]["latent"] == LATENT
    with pytest.raises(AuditError, match="keeps no held-out corpus"):
        diff_activation(store, engine, reference, session_id, DiffRequest((SITE,), held_out=True))
    pack = tmp_path / "pack"
    shutil.copytree(planted[2], pack)
    docs = load_source(Source("t", "python", loader=lambda: [text.read_text()] * 4), tmp_path)
    corpus = token_sequences(engine.lm.tokenizer, [docs], 256, 128, 32, 0.0, 0)
    save_atomic(corpus.__dict__, WorkDir(pack).corpus)  # where a pack build leaves it
    settings = load_settings(model=engine.lm.source, pack=str(pack), device="cpu", dtype="float32")
    held = open_engine(settings)
    run = store.run(diff_activation(store, held, reference, session_id, DiffRequest((SITE,), 3, held_out=True)))
    assert run["params"]["source"] == "held_out" and run["result"]["n_texts"] == len(corpus.held_out)
    assert run["result"]["rows"][0]["latent"] == LATENT
    with pytest.raises(AuditError, match="either a text file or the held-out"):
        DiffRequest(held_out=True, text_file=str(text)).validate()


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatched")
    return {"vocabulary": build_tiny_model("gpt2", root / "vocab", extra_tokens=3),
            "d_model 32": build_tiny_model("gpt2", root / "width", d_model=32),
            "2 layers": build_tiny_model("gpt2", root / "depth", n_layers=2)}


def test_a_session_names_a_compatible_reference_model_and_refuses_others(planted, mismatched, tmp_path):
    audited, reference, _pack = planted
    settings = load_settings(model=str(audited), db=str(tmp_path / "s.db"), device="cpu", dtype="float32")
    store = Store(settings.db)
    session_id = store.create_session("s")
    with pytest.raises(AuditError, match="names no reference model"):
        session_reference(store, session_id)
    for what, path in mismatched.items():
        with pytest.raises(AuditError) as refused:
            load_models(settings, str(path))
        message = str(refused.value)
        assert "\n" not in message and "needs the same tokenizer, width and depth" in message
        assert what.split()[0] in message or ("tokenizer" in message and what == "vocabulary")
    assert store.session(session_id)["reference_model"] is None
    models = load_models(settings, str(reference))
    set_reference_model(store, session_id, *models, str(reference))
    assert session_reference(store, session_id) == str(reference.resolve())
    assert store.session(session_id)["model_id"] == "tiny-gpt2-planted"
    other = store.create_session("other", model_id="someone-else")
    with pytest.raises(AuditError, match="audits someone-else, not tiny-gpt2-planted"):
        set_reference_model(store, other, *models, str(reference))
    assert store.session(other)["reference_model"] is None
