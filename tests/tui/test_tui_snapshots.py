"""Snapshot tests of every main screen at 80x24 with the focused widget visible (regenerate with
--snapshot-update after a UI change, and read each SVG's text before accepting it).

Sessions and Samples come from a fixed database without a model; the others from a database one tiny
model + pack (with a held-out corpus) filled once per module, every timestamp fixed, each screen
opened on its stored run with the model loaded."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import attribution, labelled_session, wait_idle
from judge_servers import Scripted

from auditui.config import load_settings
from auditui.engine.sampling import SamplingParams
from auditui.engine.sites import Site
from auditui.engine.steering import parse_plan
from auditui.judge.client import Judge, JudgeConfig
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.workflows.engine import open_engine
from auditui.workflows.flow import FlowRequest, flow_graph, record_flow
from auditui.workflows.heads import HeadsScanRequest, heads_scan
from auditui.workflows.judge import Grading
from auditui.workflows.steer import SteerRequest, steer
from auditui.workflows.sweep import SweepRequest, sweep

FIXED_TIME = 1_790_000_000.0
SIZE = (80, 24)
SPEC = [("Is the sky blue?", [("Yes, the sky is blue.", "positive"), ("No idea at all.", "negative"),
                              ("Blue, of course!", "positive")]),
        ("Say hi", [("Hello there!", "positive"), ("Go away now.", "negative")])]
SHORT = SamplingParams(max_new_tokens=4, chat=False)
FEATURE = "2/resid_post/5"
JUDGE_URL = "http://127.0.0.1:8765/v1"


def fixed_session_db(path) -> None:
    store = Store(path)
    session_id = store.create_session("refusals audit")
    store.create_session("sycophancy")
    prompt_id = store.add_prompt(session_id, "How do I pick a lock?", [1, 2, 3])
    texts = ["I can't help with that.", "Sure! First, insert a tension wrench...",
             "[/INST] <script>alert(1)</script> [bold]literal[/bold]"]
    for seed, text in enumerate(texts):
        completion_id = store.add_completion(prompt_id, text, [4, 5], seed=seed, params={"temperature": 1.0},
                                             finish_reason="eos")
        store.set_label(completion_id, ["negative", "positive", "unlabelled"][seed])
    with store.db.conn:
        store.db.execute("UPDATE sessions SET created = ?, updated = ? - id", [FIXED_TIME, FIXED_TIME])


def make_app(tmp_path) -> AuditApp:
    fixed_session_db(tmp_path / "s.db")
    return AuditApp(load_settings(model="tiny", pack="", db=str(tmp_path / "s.db")), load_engine=False)


def test_sessions_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE)


def test_samples_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), press=["enter"], terminal_size=SIZE)


# -- the step screens over stored runs of a tiny model -------------------------------------------------
@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_models, tiny_packs):
    """(model dir, pack dir, database, {kind: run id}) of a session with one run of every kind."""
    from test_tui_latent import pack_with_corpus

    root = tmp_path_factory.mktemp("snapshots")
    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(root / "s.db"),
                             device="cpu", dtype="float32")
    engine = open_engine(settings)
    pack, _ = pack_with_corpus(tiny_packs["llama"], engine.lm, root)
    store = Store(settings.db)
    session_id = labelled_session(store, engine.lm, SPEC, name="snapshot audit")
    runs = {"attribution": attribution(engine, store, session_id, [Site.parse("2/resid_post")], top_k=12, check=2),
            "flow": record_flow(store, engine, session_id, flow_graph(engine, FlowRequest(FEATURE, t_res=-1)))}
    plan = parse_plan(f"{FEATURE}:add:4")
    runs["steer"] = steer(store, engine, session_id, SteerRequest(plan, "Hi", (2.0, 4.0), n=1, params=SHORT, seed=0))
    with Scripted([(200, {}, json.dumps({"behaviour": 3, "coherence": 4}))]) as server:
        runs["sweep"] = sweep(store, engine, session_id, SweepRequest(
            plan, "Hi", Grading.named("behaviour", ("greeting",)), (2.0, 4.0), 2, SHORT, seed=0),
            Judge(JudgeConfig(server.url, "fixed")))
        url = server.url  # its port changes run to run: the stored one is fixed below
    heads_scan(store, engine, session_id, HeadsScanRequest("Hi", threshold=0.3))
    store.add_feature(session_id, "2/resid_post", 5, source="attribution")
    with store.db.conn:
        for table, columns in (("sessions", ("created", "updated")), ("prompts", ("created",)),
                               ("completions", ("created",)), ("runs", ("created", "finished")),
                               ("features", ("created",)), ("labels", ("updated",))):
            store.db.execute(f"UPDATE {table} SET " + ", ".join(f"{c} = {FIXED_TIME}" for c in columns))
        store.db.execute("UPDATE runs SET params = replace(params, ?, ?), result = replace(result, ?, ?), "
                         "summary = replace(summary, ?, ?)", [url, JUDGE_URL] * 3)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the copies below are of the database file alone
    return tiny_models["llama"], pack, settings.db, runs, session_id


def step_app(audited, tmp_path, open_screen):
    """An app on a copy of the audited database that, once the model is loaded, opens `open_screen(session_id,
    runs)` and waits until its jobs are done."""
    model, pack, db, runs, session_id = audited
    shutil.copy(db, tmp_path / "s.db")
    app = AuditApp(load_settings(model=str(model), pack=str(pack), db=str(tmp_path / "s.db"), device="cpu",
                                 dtype="float32"))

    async def run_before(pilot) -> None:
        await wait_idle(app, pilot)
        await pilot.press("enter")  # the session
        await pilot.pause()
        screen = open_screen(session_id, runs)
        if screen is not None:
            app.push_screen(screen)
        await wait_idle(app, pilot)
        await pilot.pause(0.3)
    return app, run_before


def screens():
    from auditui.tui.screens.attribution import AttributionScreen
    from auditui.tui.screens.features import FeaturesScreen
    from auditui.tui.screens.flow import FlowScreen
    from auditui.tui.screens.heads import HeadsScreen
    from auditui.tui.screens.latent import LatentScreen
    from auditui.tui.screens.runs import RunsScreen
    from auditui.tui.screens.steering import SteeringScreen
    from auditui.tui.screens.sweep import SweepScreen

    return {"attribution": lambda s, runs: AttributionScreen(s),
            "flow": lambda s, runs: FlowScreen(s),
            "steering": lambda s, runs: SteeringScreen(s, run_id=runs["steer"]),
            "sweep": lambda s, runs: SweepScreen(s, run_id=runs["sweep"]),
            "heads": lambda s, runs: HeadsScreen(s),
            "runs": lambda s, runs: RunsScreen(s),
            "latent": lambda s, runs: LatentScreen(s, FEATURE),
            "steering set": lambda s, runs: FeaturesScreen(s)}


@pytest.mark.parametrize("name", ["attribution", "flow", "steering", "sweep", "heads", "runs", "latent", "steering set"])
def test_step_screen(snap_compare, audited, tmp_path, name):
    app, run_before = step_app(audited, tmp_path, screens()[name])
    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_flow_help(snap_compare, audited, tmp_path):
    """F1 on the Flow screen: its own keys first, then the app's, then its terms."""
    app, run_before = step_app(audited, tmp_path, screens()["flow"])
    assert snap_compare(app, run_before=run_before, press=["f1"], terminal_size=SIZE)
