"""The progress label (issue 16): "stage k/n" when a job has several stages, and sampling says when it saves."""

from __future__ import annotations

import re

from helpers import SIZE, labelled_session, wait_idle
from textual.widgets import ProgressBar

from auditui.config import load_settings
from auditui.engine.model import load_model
from auditui.engine.sampling import SamplingParams
from auditui.store import Store
from auditui.tui.app import AuditApp, stage_of
from auditui.tui.screens.attribution import AttributionScreen
from auditui.workflows.sample import SampleRequest, sample

SPEC = [("Is the sky blue?", [("Yes, it is blue.", "positive"), ("No idea at all.", "negative")])]


def recorded(app) -> list[str]:
    """Every progress label the app shows from now on."""
    labels: list[str] = []
    show = app._set_job

    def record(status):  # type: ignore[no-untyped-def]
        if status is not None:
            labels.append(status[0])
        show(status)
    app._set_job = record
    return labels


def test_stage_of_a_job():
    stages = ("reference mean", "attribution", "exact check")
    assert stage_of(stages, "exact check 2/resid_post") == " · stage 3/3" and stage_of(stages, "attribution") == " · stage 2/3"
    assert stage_of(stages, "loading x") == stage_of(("sampling",), "sampling") == stage_of((), "sampling") == ""


async def test_attribution_shows_its_stages(tmp_path, tiny_models, tiny_packs, loaded):
    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    session_id = labelled_session(Store(settings.db), loaded("llama"), SPEC)
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(AttributionScreen(session_id))
        await pilot.pause()
        for name, value in (("sites", "2/resid_post"), ("top", "3"), ("check", "1")):
            app.screen.query_one(f"#param-{name}").value = value
        labels = recorded(app)
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
    heads = [re.sub(r" [\d.]+/[\d.]+( · ~.*)?$", "", label) for label in labels]  # without the count and ETA
    assert [h for i, h in enumerate(heads) if h not in heads[:i]] == [  # the job's start, then its stages
        "attribution", "attribution · stage 1/3: reference mean", "attribution · stage 2/3",
        "attribution · stage 3/3: exact check 2/resid_post"]


def test_sampling_says_when_it_saves_each_batch(tmp_path, tiny_models):
    """After a batch's last token the progress says "saving" (no count, so no full bar) until its completions are
    stored; the token count never goes back to "sampling" after the last batch is saved."""
    store = Store(tmp_path / "s.db")
    session_id = store.create_session("s")
    events: list[tuple[float, float, str, int]] = []

    class Watch:
        def progress(self, done, total, message=""):  # type: ignore[no-untyped-def]
            events.append((done, total, message, len(store.completions(session_id))))

        def should_stop(self) -> bool:
            return False

    lm = load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")
    result = sample(store, lm, session_id, SampleRequest("go", 5, SamplingParams(max_new_tokens=3), seed=0, batch_size=2),
                    Watch())
    assert len(result.completion_ids) == 5
    saving = [(i, e) for i, e in enumerate(events) if e[2].startswith("saving")]
    assert [(e[:3], e[3]) for _, e in saving] == [((0, 0, "saving 2 completions"), 0), ((0, 0, "saving 2 completions"), 2),
                                                 ((0, 0, "saving 1 completion"), 4)]
    for batch, (i, _) in enumerate(saving):  # just before: the tokens of the batches so far in full
        assert events[i - 1][:3] == (min(5, 2 * (batch + 1)) * 3, 15, "sampling")
    assert saving[-1][0] == len(events) - 1  # nothing claims to be sampling once the last batch is being saved


async def test_the_tui_shows_the_saving_phase(tmp_path, tiny_models):
    settings = load_settings(model=str(tiny_models["llama"]), pack="", db=str(tmp_path / "s.db"))
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("n", "s", "enter")
        await pilot.pause()
        for name, value in (("n", "2"), ("max", "4"), ("seed", "0")):
            app.screen.query_one(f"#param-{name}").value = value
        app.screen.query_one("#prompt").value = "go"
        labels = recorded(app)
        bars: list = []
        show = app._set_job
        app._set_job = lambda status: (show(status), bars.append(app.screen.query_one(ProgressBar).total))
        app.screen.action_sample()
        await wait_idle(app, pilot)
    assert labels[-1] == "sample 2: saving 2 completions" and bars[-2] is None  # an indeterminate bar, not a full one
    assert [label for label in labels if "sampling" in label][-1] == "sample 2: sampling 8/8"
