"""The latent page on a tiny model + pack whose folder holds a held-out corpus (corpus.pt, as a pack build
leaves it): its top snippets are the corpus windows an independent encode ranks first (hidden states
from the model's own output, encoded by the SAE here), with their activations; the session's texts
where it fires carry their labels; histogram, logit lens, neighbours; reachable from every screen."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import SIZE, TEXT, Probe, cells, labelled_session, wait_idle
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.engine.corpus import Source, load_source, token_sequences
from auditui.engine.labels import token_strings
from auditui.engine.packs import WorkDir, save_atomic
from auditui.engine.sites import Site
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.attribution import AttributionScreen
from auditui.tui.screens.features import FeaturesScreen
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.heads import HeadsScreen
from auditui.tui.screens.latent import LatentScreen
from auditui.tui.screens.steering import SteeringScreen
from auditui.workflows.engine import open_engine
from auditui.workflows.snippets import latent_page

SPEC = [("Is the sky blue?", [("Yes, the river rose.", "positive"), ("No idea at all.", "negative")]),
        ("Say hi", [("Hello there, committee!", "unlabelled")])]
SITE = Site(1, "resid_post")


def pack_with_corpus(tiny_pack, lm, tmp_path):
    """A copy of the tiny pack with held-out windows of helpers.TEXT saved where a pack build leaves them."""
    pack = tmp_path / "pack"
    shutil.copytree(tiny_pack, pack)
    docs = load_source(Source("t", "python", loader=lambda: [TEXT[i:] for i in range(0, 200, 9)]), tmp_path)
    corpus = token_sequences(lm.tokenizer, [docs], 512, 512, 32, 0.0, 0)
    save_atomic(corpus.__dict__, WorkDir(pack).corpus)
    return pack, corpus.held_out


def independent_codes(engine, held: torch.Tensor, latent: int) -> torch.Tensor:
    """The latent's activation [windows, tokens] from hidden_states (the model's output, no site hooks)."""
    with torch.no_grad():
        hidden = engine.lm.model(held, output_hidden_states=True).hidden_states[SITE.layer + 1]  # after layer 1
        codes = engine.bank.sae(SITE).encode(hidden.float().reshape(-1, hidden.shape[-1]))
    return codes[:, latent].reshape(held.shape)


@pytest.fixture
def setup(tmp_path, tiny_models, tiny_packs, loaded):
    lm = loaded("llama")
    pack, held = pack_with_corpus(tiny_packs["llama"], lm, tmp_path)
    config = load_settings(model=str(tiny_models["llama"]), pack=str(pack), db=str(tmp_path / "s.db"),
                           device="cpu", dtype="float32")
    engine = open_engine(config)
    store = Store(config.db)
    session_id = labelled_session(store, lm, SPEC)
    codes = {j: independent_codes(engine, held, j) for j in range(engine.bank.sae(SITE).cfg.d_sae)}
    # a latent that fires in many windows but not everywhere, so the ranking means something
    latent = max(codes, key=lambda j: (int((codes[j][:, 1:].max(dim=1).values > 0).sum()) >= 4, -abs(
        float((codes[j][:, 1:] > 0).float().mean()) - 0.3)))
    return config, engine, store, session_id, held, latent, codes[latent]


async def test_latent_page_shows_the_corpus_windows_an_independent_encode_ranks_first(setup):
    config, engine, store, session_id, held, latent, codes = setup
    feature = f"{SITE}/{latent}"
    store.add_feature(session_id, str(SITE), latent, source="test")
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(FeaturesScreen(session_id))
        await pilot.pause()
        await pilot.press("l")  # the steering set's latent opens its page
        await wait_idle(app, pilot)
        screen = app.screen
        assert isinstance(screen, LatentScreen) and screen.page is not None
        page = screen.page
        # the top snippets: the windows whose counted maximum is largest, per an independent encode
        best = codes[:, 1:].max(dim=1)
        order = [int(i) for i in best.values.argsort(descending=True) if best.values[i] > 0][:8]
        assert len(page["snippets"]) == len(order) >= 4
        for snippet, window in zip(page["snippets"], order, strict=True):
            ids = held[window].tolist()
            start, end = snippet["start"], snippet["start"] + len(snippet["tokens"])
            assert snippet["max"] == pytest.approx(float(best.values[window]), rel=1e-4, abs=1e-5)
            assert snippet["position"] == 1 + int(best.indices[window])
            assert snippet["tokens"] == token_strings(engine.lm, ids[start:end])  # from the pack's corpus
            assert snippet["activations"] == pytest.approx(codes[window, start:end].tolist(), rel=1e-4, abs=1e-5)
        table = cells(screen.query_one("#latent", DataTable))
        corpus_rows = [row for row in table if row[0] == "corpus"]
        assert [row[1] for row in corpus_rows] == [f"{s['max']:.3g}" for s in page["snippets"]]
        # the histogram counts every active counted corpus token; the notice gives the density
        active = int((codes[:, 1:] > 0).sum())
        assert sum(page["histogram"]["counts"]) == active == page["corpus"]["n_active"]
        assert page["corpus"]["n_tokens"] == codes[:, 1:].numel()
        notice = str(screen.query_one("#notice", Static).render())
        assert f"{active / codes[:, 1:].numel():.1%}" in notice and "held-out" in notice
        # the session's texts where it fires, with their labels
        labels = {c["id"]: c["label"] for c in store.completions(session_id)}
        marks = {"positive": "+", "negative": "-", "unlabelled": "0"}
        text_rows = [row for row in table if row[0].startswith("#")]
        assert [row[0] for row in text_rows] == [f"#{t['completion_id']} {marks[labels[t['completion_id']]]}"
                                                 for t in page["texts"]]
        # logit lens both ways, neighbours one layer back and forward
        positive, negative = page["lens"]["positive"], page["lens"]["negative"]
        assert len(positive) == len(negative) == 8 and positive[0][1] > 0 > negative[0][1]
        assert {g["relation"] for g in page["neighbours"]} >= {"backward R", "forward R"}
        detail = str(screen.query_one("#detail", Static).render())
        assert "logit lens +" in detail and "histogram" in detail and "held-out window" in detail
        assert positive[0][0].replace("\n", "⏎") in detail
        # Enter on a neighbour row opens that latent's page
        table_widget = screen.query_one("#latent", DataTable)
        table_widget.move_cursor(row=len(table) - 1)
        await pilot.press("enter")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, LatentScreen) and app.screen.feature == screen.rows[-1]["feature"]
    probe = Probe()
    again = latent_page(store, engine, session_id, feature, progress=probe)  # the same page, with progress
    assert again["snippets"] == page["snippets"]
    assert {message for _, _, message in probe.events} == {"held-out corpus", "session texts"}


async def test_every_screen_that_shows_a_latent_opens_its_page(setup):
    config, engine, store, session_id, _, latent, _ = setup
    feature = f"{SITE}/{latent}"
    for screen in (AttributionScreen, FlowScreen, FeaturesScreen, HeadsScreen, SteeringScreen, LatentScreen):
        assert "latent" in {b.action for b in screen.BINDINGS} or screen is LatentScreen
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(FlowScreen(session_id, feature))
        await wait_idle(app, pilot)
        await pilot.press("l")  # the graph's root is the current row
        await wait_idle(app, pilot)
        assert isinstance(app.screen, LatentScreen) and app.screen.feature == feature
        await pilot.press("f")  # and back to its flow graph
        await wait_idle(app, pilot)
        assert isinstance(app.screen, FlowScreen)


async def test_a_pack_without_a_held_out_corpus_says_so(tmp_path, tiny_models, tiny_packs, loaded):
    config = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    store = Store(config.db)
    session_id = labelled_session(store, loaded("llama"), SPEC)
    app = AuditApp(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(LatentScreen(session_id, "1/mlp_out/3"))  # a module latent: residual neighbours
        await wait_idle(app, pilot)
        page = app.screen.page
        assert page["snippets"] == [] and page["corpus"]["source"] == "none"
        assert "keeps no held-out corpus" in str(app.screen.query_one("#detail", Static).render())
        assert {g["relation"] for g in page["neighbours"]} == {"residual before", "residual after"}
