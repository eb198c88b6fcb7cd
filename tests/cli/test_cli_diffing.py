"""`auditui session new|reference --reference-model`, `auditui diff`, `attribute --reference-model`,
`steer --on reference` on tiny models saved to disk; a mismatched reference is one line, exit 2, and
leaves the database byte-identical."""

from __future__ import annotations

import json

import pytest
from helpers import labelled_session
from sae_lens import SAE
from test_cli_sessions import fails, ok

from auditui.engine.model import load_model
from auditui.store import Store
from auditui.testing import build_planted_model, build_tiny_model

SITE, LATENT = "2/resid_post", 5
SPEC = [("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative")]),
        ("Tell me a joke", [("Why did the chicken", "negative"), ("No.", "positive"), ("Knock", "positive")])]


@pytest.fixture(scope="module")
def models(tiny_models, tiny_packs, tmp_path_factory):
    """{audited, reference, pack, vocabulary, width}: a gpt2 with a direction planted at layer 1, its original,
    the pack, and two models a reference may not be (another tokenizer, another width)."""
    root = tmp_path_factory.mktemp("cli-diff")
    sae = SAE.load_from_disk(tiny_packs["gpt2"] / "resid_post_2")
    direction = sae.W_dec[LATENT].detach() / sae.W_dec[LATENT].detach().norm()
    return {"audited": build_planted_model(tiny_models["gpt2"], root / "tiny-gpt2-planted", 1, direction, 4.0),
            "reference": tiny_models["gpt2"], "pack": tiny_packs["gpt2"],
            "vocabulary": build_tiny_model("gpt2", root / "other-vocab", extra_tokens=3),
            "width": build_tiny_model("gpt2", root / "other-width", d_model=32)}


@pytest.fixture
def db(tmp_path, models):
    """A database whose session 1 holds labelled completions of the audited model (no reference yet)."""
    path = tmp_path / "s.db"
    store = Store(path)
    labelled_session(store, load_model(str(models["audited"]), device="cpu", dtype="float32"), SPEC)
    store.close()
    return path


def _engine_args(db, models) -> list:
    return ["--db", db, "--model", models["audited"], "--pack", models["pack"], "--device", "cpu"]


def test_a_session_names_its_reference_model(tmp_path, models):
    db = tmp_path / "r.db"
    made = json.loads(ok("session", "new", "diffing", "--reference-model", models["reference"], "--model",
                         models["audited"], "--device", "cpu", "--db", db, "--json"))
    assert made["reference_model"] == str(models["reference"].resolve()) and made["model_id"] == "tiny-gpt2-planted"
    shown = json.loads(ok("session", "show", str(made["id"]), "--db", db, "--json"))
    assert shown["session"]["reference_model"] == str(models["reference"].resolve())
    assert f"(reference model {models['reference'].resolve()})" in ok("session", "show", "--db", db)
    cleared = json.loads(ok("session", "reference", str(made["id"]), "--clear", "--db", db, "--json"))
    assert cleared["reference_model"] is None
    assert "(no reference model)" in ok("session", "reference", str(made["id"]), "--clear", "--db", db)
    again = json.loads(ok("session", "reference", str(made["id"]), str(models["reference"]), "--model", models["audited"],
                          "--device", "cpu", "--db", db, "--json"))
    assert again["reference_model"] == str(models["reference"].resolve())
    assert "give a reference MODEL or --clear" in fails("session", "reference", str(made["id"]), "--db", db)
    plain = json.loads(ok("session", "new", "plain", "--db", db, "--json"))
    assert plain["reference_model"] is None and plain["model_id"] == ""


def test_a_mismatched_reference_model_is_refused_and_the_database_is_untouched(db, models, tmp_path):
    before = db.read_bytes()
    for what in ("vocabulary", "width"):
        bad = models[what]
        commands = [
            ("session", "new", "x", "--reference-model", bad, "--model", models["audited"], "--device", "cpu", "--db", db),
            ("session", "reference", "1", bad, "--model", models["audited"], "--device", "cpu", "--db", db),
            ("diff", "--site", SITE, "--reference-model", bad, *_engine_args(db, models)),
            ("attribute", "--site", SITE, "--reference-model", bad, *_engine_args(db, models)),
        ]
        for command in commands:
            message = fails(*command)
            assert "needs the same tokenizer, width and depth" in message, message
            assert ("tokenizer than" if what == "vocabulary" else "d_model 32") in message
    assert "model directory not found" in fails("session", "reference", "1", str(tmp_path / "nowhere/"), "--db", db)
    assert "names no reference model" in fails("diff", "--site", SITE, *_engine_args(db, models))
    assert "names no reference model" in fails("steer", "--features", f"{SITE}/{LATENT}:add:4", "--prompt", "Hi",
                                               "--on", "reference", *_engine_args(db, models))
    assert "--on takes audited or reference" in fails("steer", "--features", f"{SITE}/{LATENT}:add:4", "--prompt", "Hi",
                                                      "--on", "both", *_engine_args(db, models))
    assert "no session 9" in fails("session", "reference", "9", models["reference"], "--db", db)
    assert db.read_bytes() == before


def test_diff_ranks_the_planted_latent_first_and_compares_with_the_newest_attribution(db, models):
    ok("session", "reference", "1", models["reference"], "--model", models["audited"], "--device", "cpu", "--db", db)
    alone = json.loads(ok("diff", "--sites", SITE, "--top", "5", *_engine_args(db, models), "--json"))
    assert alone["status"] == "done" and alone["result"]["rows"][0]["latent"] == LATENT
    assert alone["result"]["sites"][SITE]["attribution_run"] is None
    assert alone["provenance"]["model_id"] == "tiny-gpt2-planted"
    assert alone["provenance"]["reference_model"]["model_id"] == "tiny-gpt2"
    attributed = json.loads(ok("attribute", "--site", SITE, "--top", "5", *_engine_args(db, models), "--json"))
    diffed = json.loads(ok("diff", "--site", SITE, "--top", "5", *_engine_args(db, models), "--json"))
    site = diffed["result"]["sites"][SITE]
    assert site["attribution_run"] == attributed["run_id"] and 0 <= site["overlap_attr"] <= 5
    assert site["overlap_within"] == len({r["latent"] for r in diffed["result"]["rows"]}
                                         & set(attributed["result"]["sites"][SITE]["act_top"]))
    top = diffed["result"]["rows"][0]
    assert top["latent"] == LATENT and top["attr_rank"] >= 1 and top["within_rank"] >= 1
    run = Store(db).run(diffed["run_id"])
    assert run["kind"] == "diff_activation" and run["result"] == diffed["result"] and run["parent_id"] is None
    human = ok("diff", "--site", SITE, "--top", "3", *_engine_args(db, models))
    assert "model diffing Δ-activation (audited - reference)" in human and "within #" in human


def test_attribute_with_a_reference_model_adds_the_model_diffing_column(db, models):
    data = json.loads(ok("attribute", "--site", SITE, "--top", "4", "--reference-model", models["reference"],
                         *_engine_args(db, models), "--json"))
    assert "Δ-act models" in data["summary"]["table"]["columns"]
    assert all("delta_diff" in row and row["diff_rank"] >= 1 for row in data["result"]["rows"])
    assert "overlap_diff" in data["result"]["sites"][SITE]
    child = Store(db).run(data["result"]["diff_run"])
    assert child["kind"] == "diff_activation" and child["parent_id"] == data["run_id"]
    assert child["result"]["sites"][SITE]["attribution_run"] == data["run_id"]
    human = ok("attribute", "--site", SITE, "--top", "3", "--reference-model", models["reference"], *_engine_args(db, models))
    assert "Δ-act models" in human and "with model-diffing Δ-activation" in human


def test_steer_on_the_reference_model(db, models):
    ok("session", "reference", "1", models["reference"], "--model", models["audited"], "--device", "cpu", "--db", db)
    steer = ["steer", "--features", f"{SITE}/{LATENT}:add:4", "--prompt", "Once", "-n", "2", "--seed", "0",
             "--max-new-tokens", "4", "--raw", *_engine_args(db, models), "--json"]
    on_reference = json.loads(ok(*steer, "--on", "reference"))
    on_audited = json.loads(ok(*steer))
    assert (on_reference["on"], on_reference["model_id"]) == ("reference", "tiny-gpt2")
    assert (on_audited["on"], on_audited["model_id"]) == ("audited", "tiny-gpt2-planted")
    store = Store(db)
    reference_run, audited_run = store.run(on_reference["run_id"]), store.run(on_audited["run_id"])
    assert reference_run["provenance"]["model_id"] == "tiny-gpt2"
    assert reference_run["provenance"]["model_source"] == str(models["reference"].resolve())
    assert reference_run["provenance"]["saes"] == audited_run["provenance"]["saes"]  # the same SAE
    rows = store.completions_by_ids(on_reference["result"]["completion_ids"])
    assert {r["model_id"] for r in rows} == {"tiny-gpt2"}
    # the reference model's samples, unsteered ones included, stay out of the audited model's data
    assert all(r["intervention"]["model"] == "reference" for r in rows)
    assert [r["intervention"]["plan"] is None for r in rows] == [True, True, False, False]
    assert reference_run["params"]["on"] == "reference" and audited_run["params"]["on"] == "audited"
    unsteered_ids = {c["id"] for c in store.completions(session_id=1, steered=False)}
    assert unsteered_ids.isdisjoint(r["id"] for r in rows)


def test_steer_with_reference_model_sets_it_once_and_refuses_another(db, models):
    steer = ["steer", "--features", f"{SITE}/{LATENT}:add:4", "--prompt", "Once", "-n", "1", "--seed", "0",
             "--max-new-tokens", "3", "--raw", *_engine_args(db, models)]
    data = json.loads(ok(*steer, "--reference-model", models["reference"], "--json"))
    assert (data["on"], data["model_id"]) == ("reference", "tiny-gpt2")
    assert Store(db).session(1)["reference_model"] == str(models["reference"].resolve())
    before = db.read_bytes()
    assert "names the reference model" in fails(*steer, "--reference-model", models["vocabulary"])
    assert db.read_bytes() == before
