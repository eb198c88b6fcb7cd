"""Sweeps: the curve, the random band and the split-half best strength, recomputed by hand from the
stored completions and a rule-based judge on a real loopback HTTP server."""

from __future__ import annotations

import json
import re
import statistics

import pytest
from helpers import tiny_audit
from judge_servers import Scripted

from auditui.engine.sampling import SamplingParams
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.judge.client import Judge, JudgeConfig
from auditui.judge.rubrics import load_rubric
from auditui.workflows.judge import Grading
from auditui.workflows.steer import PlanSource, plan_for
from auditui.workflows.sweep import SweepRequest, sweep

GRADING = Grading(load_rubric("behaviour"), ("long texts",))
GREEDYISH = SamplingParams(temperature=1.0, max_new_tokens=6, chat=False)
TEXT = re.compile(r'Text:\n"""\n(.*)\n"""', re.S)


def rule(text: str) -> tuple[int, int]:
    """(behaviour, coherence) of the rule judge; an 'x' in the text makes it answer garbage."""
    return len(text) % 6, 5 - len(set(text)) % 3


def answer(messages: list[dict]) -> str:
    text = TEXT.search(messages[-1]["content"]).group(1)
    if "x" in text:
        return "no idea"
    behaviour, coherence = rule(text)
    return json.dumps({"behaviour": behaviour, "coherence": coherence})


@pytest.fixture
def setup(tmp_path, tiny_models, tiny_packs):
    return tiny_audit(tmp_path, tiny_models["llama"], tiny_packs["llama"],
                      [("Hello there", [("Hi!", "positive"), ("Go away", "negative")])])


def _expected(rows: list[dict], direction: str) -> tuple[list[float], list[float]]:
    behaviour, score = [], []
    for row in rows:
        if "x" in row["text"]:
            continue
        b, c = rule(row["text"])
        behaviour.append(b / 5)
        score.append((b / 5 if direction == "toward" else 1 - b / 5) * c / 5)
    return behaviour, score


@pytest.mark.parametrize("direction", ["toward", "away"])
def test_sweep_curve_band_and_best_strength_match_the_stored_texts(setup, direction):
    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1, 1/mlp_out/3:add:1"))
    request = SweepRequest(plan, "Once upon a time", GRADING, strengths=(0, 10, 40), n=4, params=GREEDYISH, seed=11,
                           band=3, direction=direction)
    with Scripted([answer]) as server:
        run = store.run(sweep(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule", concurrency=4))))
        asked = server.count
    result = run["result"]
    assert run["status"] == "done" and result["strengths"] == [0.0, 10.0, 40.0]
    rows = {r["id"]: r for r in store.completions_by_ids(result["completion_ids"])}
    assert len(rows) == 4 * (1 + 2 * (1 + 3)) and asked == len({r["text"] for r in rows.values()})

    def group(curve: str | None, band: int | None, strength: float) -> list[dict]:
        return [r for r in rows.values() if (r["intervention"] is None) == (strength == 0) and (
            strength == 0 or (r["intervention"]["strength"] == strength and r["intervention"].get("curve") == curve
                              and r["intervention"].get("band") == band))]

    for point in result["curves"][0]["points"]:
        texts = group("plan", None, point["strength"])
        assert len(texts) == 4 and sorted(r["seed"] for r in texts) == [11, 12, 13, 14]
        behaviour, score = _expected(texts, direction)
        assert point["behaviour"]["n"] == len(behaviour) and point["unscored"] == 4 - len(behaviour)
        if behaviour:
            assert point["behaviour"]["mean"] == pytest.approx(statistics.fmean(behaviour))
            assert point["score"]["mean"] == pytest.approx(statistics.fmean(score))
    for edge in result["band"]["points"][1:]:
        means = [statistics.fmean(s) for i in range(3)
                 if (s := _expected(group(None, i, edge["strength"]), direction)[1])]
        assert edge["score"]["median"] == pytest.approx(statistics.median(means))
        assert edge["score"]["low"] >= min(means) - 1e-9 and edge["score"]["high"] <= max(means) + 1e-9
    band_latents = [[f["feature"] for f in p["features"]] for p in result["band"]["plans"]]
    assert all(set(b).isdisjoint({"2/resid_post/5", "1/mlp_out/3"}) for b in band_latents)
    assert [b[0].rsplit("/", 1)[0] for b in band_latents] == ["2/resid_post"] * 3  # same sites, same order
    best = result["best"]
    chosen = {s: _expected([r for r in group("plan", None, s) if r["seed"] in (11, 13)], direction)[1]
              for s in (0.0, 10.0, 40.0)}
    assert best["strength"] == max((statistics.fmean(v), s) for s, v in chosen.items() if v)[1]
    held_out = _expected([r for r in group("plan", None, best["strength"]) if r["seed"] in (12, 14)], direction)[1]
    if held_out:
        assert best["reported_score"]["mean"] == pytest.approx(statistics.fmean(held_out))
    assert [f["coefficient"] for f in best["plan"]["features"]] == [best["strength"]] * 2
    assert store.pairs(session_id) == [{"prompt_id": 1, "positive": [1], "negative": [2]}]  # steered rows never pair
    assert "sweep" in run["summary"]["headline"] and len(run["summary"]["table"]["rows"]) == 3


def test_a_repeated_sweep_asks_the_judge_nothing_and_compare_layers_adds_curves(setup):
    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1, 1/mlp_out/3:add:1"))
    request = SweepRequest(plan, "Once upon a time", GRADING, strengths=(20,), n=2, params=GREEDYISH, seed=5,
                           compare_layers=True)
    with Scripted([answer]) as server:
        judge = Judge(JudgeConfig(server.url, "rule"))
        first = store.run(sweep(store, engine, session_id, request, judge))
        count = server.count
        second = store.run(sweep(store, engine, session_id, request, judge))
        assert server.count == count  # same seeds, same texts: all cached
    assert [c["label"] for c in first["result"]["curves"]] == [
        "plan", "single @ 1", "cumulative @ 1", "single @ 2", "cumulative @ 2"]
    assert second["result"]["counts"]["calls"] == 0 and second["result"]["counts"]["cached"] == 2 * 6
    assert second["result"]["curves"] == first["result"]["curves"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"strengths": (0,)}, "other than 0"), ({"n": 1}, "at least 2"), ({"direction": "up"}, "toward or away"),
    ({"band": 100}, "band"), ({"n": 1000, "band": 8}, "at most"), ({"prompt": " "}, "prompt"),
])
def test_bad_sweeps_are_refused_before_sampling(setup, changes, message):
    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1"))
    request = SweepRequest(**{"plan": plan, "prompt": "Hi", "grading": GRADING, **changes})
    with Scripted([answer]) as server:
        with pytest.raises(AuditError, match=message):
            sweep(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule")))
    assert store.runs(session_id) == []


def test_validation_steers_each_top_latent_alone_against_random_latents(setup):
    from helpers import attribution

    from auditui.workflows.validate import ValidateRequest, validate

    store, engine, session_id = setup
    attr_run = attribution(engine, store, session_id, [Site.parse("2/resid_post")], top_k=3)
    request = ValidateRequest(attr_run, "Once upon a time", GRADING, k=3, strength=30.0, n=3, band=4,
                              params=GREEDYISH, seed=2)
    with Scripted([answer]) as server:
        run = store.run(validate(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule"))))
    result = run["result"]
    assert run["parent_id"] == attr_run and run["status"] == "done"
    attr = store.run(attr_run)["result"]
    assert [r["latent"] for r in result["sets"]["attribution"]] == [
        r["latent"] for r in sorted(attr["rows"], key=lambda r: r["rank"])][:3]
    assert [r["latent"] for r in result["sets"]["activation"]] == attr["sites"]["2/resid_post"]["act_top"][:3]
    rows = store.completions_by_ids(result["completion_ids"])
    band = set(run["params"]["band_latents"])
    assert len(band) == 4 and band.isdisjoint(r["latent"] for s in result["sets"].values() for r in s)

    def mean_behaviour(chosen: list[dict]) -> float | None:
        values = _expected(chosen, "toward")[0]
        return statistics.fmean(values) if values else None

    base = mean_behaviour([r for r in rows if r["intervention"] is None])
    for latent_row in result["sets"]["attribution"] + result["sets"]["activation"]:
        feature = f"2/resid_post/{latent_row['latent']}"
        for direction, sign in (("toward", 1), ("away", -1)):
            steered = [r for r in rows if r["intervention"] and r["intervention"]["plan"]["features"][0]["feature"] == feature
                       and r["intervention"]["strength"] == sign * 30.0]
            assert len(steered) == 3
            mean = mean_behaviour(steered)
            delta = latent_row[direction]["delta_behaviour"]
            assert delta is None if mean is None or base is None else delta == pytest.approx(mean - base)
    counts = result["leaving_band"]
    for name in ("attribution", "activation"):
        assert counts[name]["toward"] == sum(bool(r["toward"]["leaves_band"]) for r in result["sets"][name])
    assert "leaving the random band" in run["summary"]["headline"]


def test_reports_draw_the_sweep_and_name_the_judge(setup):
    import xml.etree.ElementTree as ElementTree

    from auditui.store.reports import render_reports

    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1"))
    request = SweepRequest(plan, "Once", GRADING, strengths=(20,), n=2, params=GREEDYISH, seed=5, band=2)
    with Scripted([answer]) as server:
        run_id = sweep(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule")))
        url = server.url
    reports = render_reports(store, session_id)
    svg = reports["html"].split("<figure>")[1].split("</figure>")[0]
    ElementTree.fromstring(svg.split("\n", 1)[1])  # the inline SVG is well-formed
    assert reports["html"].count("<figure>") == 1 and "random latents 5-95%" in svg
    assert f"LLM judges: rule at {url}" in reports["md"] and "sweep curves are drawn in the HTML report" in reports["md"]
    assert json.loads(reports["json"])["runs"][-1]["result"] == store.run(run_id)["result"]


def test_validation_with_a_reference_model_steers_toward_on_it_and_away_on_the_audited(setup, tiny_models, tiny_packs,
                                                                                       tmp_path):
    from helpers import attribution

    from auditui.workflows.validate import ValidateRequest, validate

    store, engine, session_id = setup
    reference = tiny_audit(tmp_path / "ref", tiny_models["llama"], tiny_packs["llama"], [])[1]  # its own engine
    attr_run = attribution(engine, store, session_id, [Site.parse("2/resid_post")], top_k=2)
    request = ValidateRequest(attr_run, "Once upon a time", GRADING, k=2, strength=30.0, n=2, band=2,
                              params=GREEDYISH, seed=2)
    with Scripted([answer]) as server:
        run = store.run(validate(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule")),
                                 reference=reference))
    result = run["result"]
    assert run["params"]["toward_on"] == "reference" and result["toward_on"].startswith("reference")
    rows = store.completions_by_ids([i for i in result["completion_ids"] if i is not None])
    on_reference = [r for r in rows if r["intervention"] and r["intervention"].get("model") == "reference"]
    assert {r["intervention"]["strength"] for r in on_reference} == {None, 30.0}  # its unsteered rows and toward
    audited = [r for r in rows if r not in on_reference]
    assert [r["intervention"] and r["intervention"]["strength"] for r in audited].count(None) == 2  # its unsteered
    assert {r["intervention"]["strength"] for r in audited if r["intervention"]} == {-30.0}  # away only
    base = [rule(r["text"])[0] / 5 for r in on_reference if r["intervention"]["strength"] is None and "x" not in r["text"]]
    for latent_row in result["sets"]["attribution"]:
        steered = [rule(r["text"])[0] / 5 for r in on_reference if r["intervention"]["strength"] == 30.0
                   and r["intervention"]["plan"]["features"][0]["feature"] == f"2/resid_post/{latent_row['latent']}"
                   and "x" not in r["text"]]
        delta = latent_row["toward"]["delta_behaviour"]
        if steered and base:
            assert delta == pytest.approx(statistics.fmean(steered) - statistics.fmean(base))


def test_a_sweep_stopped_at_once_is_cancelled_and_leaves_no_empty_prompt(setup):
    from helpers import Probe

    store, engine, session_id = setup
    prompts = len(store.prompts(session_id))
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1"))
    request = SweepRequest(plan, "Once", GRADING, strengths=(20,), n=2, params=GREEDYISH, seed=5, band=2)
    with Scripted([answer]) as server:
        run = store.run(sweep(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule")),
                              Probe(stop=lambda events: True)))
        assert server.count == 0
    assert run["status"] == "cancelled" and run["result"]["best"] is None
    assert len(store.prompts(session_id)) == prompts


@pytest.mark.parametrize(("typed", "message"), [("2/resid_post/5:rescale:0", "uses rescale"),
                                                 ("2/resid_post/5:add:0", "every coefficient")])
def test_sweeps_refuse_plans_whose_strength_zero_is_not_the_unsteered_model(setup, typed, message):
    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed=typed))
    with pytest.raises(AuditError, match=message):
        SweepRequest(plan, "Hi", GRADING).validate()


def test_a_folded_band_draws_only_latents_that_fire(setup):
    from auditui.workflows.steer import steering_inputs

    store, engine, session_id = setup
    plan = plan_for(store, session_id, PlanSource(typed="2/resid_post/5:add:1"), fold=True)
    request = SweepRequest(plan, "Once", GRADING, strengths=(20,), n=2, params=GREEDYISH, seed=5, band=6)
    with Scripted([answer]) as server:
        run = store.run(sweep(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule"))))
    typical = steering_inputs(store, engine, session_id, [plan]).typical[Site.parse("2/resid_post")]
    latents = [int(p["features"][0]["feature"].rsplit("/", 1)[1]) for p in run["result"]["band"]["plans"]]
    assert len(latents) == 6 and all(typical[x] > 0 for x in latents)
