"""Two models in the TUI (issue 19 item 4): the session header and the Sessions list name the reference model;
the Attribution screen switches its baseline column to model-diffing Δ-activation, computing the diff run when
the shown attribution run has none."""

from __future__ import annotations

import pytest
from helpers import SIZE, cells, labelled_session, wait_idle
from sae_lens import SAE
from textual.widgets import DataTable

from auditui.config import load_settings
from auditui.engine.model import load_model
from auditui.store import Store
from auditui.testing import build_planted_model
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.samples import SamplesScreen
from auditui.workflows.diffing import DIFF_KIND, diff_deltas, set_reference_model

SITE, LATENT = "2/resid_post", 5
SPEC = [("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative")]),
        ("Tell me a joke", [("Why did the chicken", "negative"), ("No.", "positive"), ("Knock", "positive")])]


@pytest.fixture(scope="module")
def planted(tiny_models, tiny_packs, tmp_path_factory):
    """(audited dir, reference dir, pack): the tiny gpt2 with a direction planted at layer 1, and its original."""
    sae = SAE.load_from_disk(tiny_packs["gpt2"] / "resid_post_2")
    direction = sae.W_dec[LATENT].detach() / sae.W_dec[LATENT].detach().norm()
    audited = build_planted_model(tiny_models["gpt2"], tmp_path_factory.mktemp("tui-diff") / "tiny-gpt2-planted", 1,
                                  direction, 4.0)
    return audited, tiny_models["gpt2"], tiny_packs["gpt2"]


def two_model_db(tmp_path, planted, reference: bool = True):
    """(settings, store, session id): labelled completions of the audited model, its reference model named."""
    audited, original, pack = planted
    settings = load_settings(model=str(audited), pack=str(pack), db=str(tmp_path / "s.db"), device="cpu", dtype="float32")
    store = Store(settings.db)
    lm = load_model(str(audited), device="cpu", dtype="float32")
    session_id = labelled_session(store, lm, SPEC, name="diffing")
    if reference:
        set_reference_model(store, session_id, lm, load_model(str(original), device="cpu", dtype="float32"),
                            str(original))
    return settings, store, session_id


def columns(app) -> list[str]:
    return [str(column.label) for column in app.screen.query_one("#ranked", DataTable).columns.values()]


def shown(app) -> list[tuple[int, str, str]]:
    return [(int(row[2]), row[5], row[6]) for row in cells(app.screen.query_one("#ranked", DataTable))]


async def test_the_session_header_and_list_show_both_models(tmp_path, planted):
    settings, store, session_id = two_model_db(tmp_path, planted)
    plain = store.create_session("one model", model_id="tiny-gpt2")
    app = AuditApp(settings, load_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        rows = {row[0]: row[-1] for row in cells(app.screen.query_one("#sessions", DataTable))}
        assert rows == {str(session_id): "tiny-gpt2-planted vs reference tiny-gpt2", str(plain): "tiny-gpt2"}
        app.push_screen(SamplesScreen(session_id))
        await pilot.pause()
        assert (app.screen.title, app.screen.sub_title) == ("diffing", "tiny-gpt2-planted vs reference tiny-gpt2")


async def test_attribution_switches_its_baseline_to_model_diffing(tmp_path, planted):
    settings, store, session_id = two_model_db(tmp_path, planted)
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        app.screen.query_one("#param-sites").value = SITE
        app.screen.query_one("#param-top").value = "5"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        run = store.runs(session_id, "attribution")[-1]
        within = [(r["latent"], f"{r['delta_act']:+.3g}", str(r["act_rank"])) for r in run["result"]["rows"]]
        assert columns(app)[5:7] == ["Δ-act", "act#"] and shown(app) == within
        await pilot.press("m")  # no diff run yet: one is computed against the reference model, a child run
        await wait_idle(app, pilot)
        [child] = store.child_runs(run["id"], DIFF_KIND)
        assert child["status"] == "done" and child["params"]["reference_model_id"] == "tiny-gpt2"
        delta = diff_deltas(store, child["id"])[SITE]  # audited minus reference mean activation
        ranks = sorted(range(delta.shape[0]), key=lambda i: -float(delta[i]))
        models = [(latent, f"{float(delta[latent]):+.3g}", str(ranks.index(latent) + 1)) for latent, *_ in within]
        assert columns(app)[5:7] == ["Δ-act models", "diff#"] and shown(app) == models
        assert "Δ-act models" in app.screen.title
        await pilot.press("o")  # another tail keeps the model-diffing column
        await wait_idle(app, pilot)
        assert columns(app)[5] == "Δ-act models"
        assert all(value == f"{float(delta[latent]):+.3g}" for latent, value, _ in shown(app))
        await pilot.press("o", "o", "m")  # back to the top +Δ tail and the within-model baseline
        await wait_idle(app, pilot)
        assert columns(app)[5:7] == ["Δ-act", "act#"] and shown(app) == within
        await pilot.press("m")  # the stored diff run: no second one
        await wait_idle(app, pilot)
        assert shown(app) == models and len(store.child_runs(run["id"], DIFF_KIND)) == 1
    app = AuditApp(settings, load_engine=False)  # reopened without a model: the column comes from the store
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        await pilot.press("m")
        await pilot.pause()
        assert columns(app)[5] == "Δ-act models" and shown(app) == models


async def test_without_a_reference_model_the_baseline_stays_and_says_how(tmp_path, planted):
    settings, store, session_id = two_model_db(tmp_path, planted, reference=False)
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        app.screen.query_one("#param-sites").value = SITE
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        await pilot.press("m")
        await wait_idle(app, pilot)
        assert columns(app)[5] == "Δ-act" and not store.runs(session_id, DIFF_KIND)
        assert any(f"auditui session reference {session_id} MODEL" in str(n.message) for n in app._notifications)
