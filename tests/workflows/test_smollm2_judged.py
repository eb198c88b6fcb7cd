"""Slow tier: judged steering on SmolLM2 with a real pack (demo, else late, else quick).

The judge is a rule on a real loopback HTTP server (tests/judge_servers.Scripted): behaviour = how
much of the text belongs to a word family, coherence = 5 minus the word-trigram repetition. A
deterministic judge lets the tests assert what the curves must show; `test_smollm2_as_its_own_judge`
measures the offline judge a user gets (llm-katan serving SmolLM2) and its failure rate.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers import attribution, user_pack, word_family_latent
from judge_servers import Scripted

from auditui.engine import Engine
from auditui.engine.saes import SAEBank
from auditui.engine.sampling import SamplingParams, sample_completions
from auditui.judge.client import Judge, JudgeConfig
from auditui.judge.local import free_port, katan_args, serving
from auditui.judge.rubrics import load_rubric
from auditui.store import Store
from auditui.workflows.judge import Grading, JudgeRequest, judge_run
from auditui.workflows.steer import PlanSource, plan_for
from auditui.workflows.sweep import SweepRequest, sweep
from auditui.workflows.validate import ValidateRequest, validate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # minutes of CPU generation and grading
TEXT = re.compile(r'Text:\n"""\n(.*)\n"""', re.S)
PARAMS = SamplingParams(temperature=0.8, max_new_tokens=24)


def family_judge(family: set[str]):
    def answer(messages: list[dict]) -> str:
        words = re.findall(r"[a-z]+", TEXT.search(messages[-1]["content"]).group(1).lower())
        share = sum(any(w.startswith(f[:4]) for f in family) for w in words if len(w) >= 4) / max(1, len(words))
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        repetition = 0.0 if len(grams) < 2 else 1 - len(set(grams)) / len(grams)
        return json.dumps({"behaviour": min(5, round(20 * share)), "coherence": round(5 * (1 - repetition))})
    return answer


@pytest.fixture(scope="module")
def engine(smollm2, tmp_path_factory):
    pack = user_pack()
    root = tmp_path_factory.mktemp("engine")
    bank = SAEBank.from_specs([str(pack)], root, device=smollm2.device, model=smollm2.model).attach(smollm2)
    return Engine(smollm2, bank, root)


def _session(store: Store, engine: Engine, prompts: list[str], n: int, label) -> int:
    lm = engine.lm
    session_id = store.create_session("judged", model_id=lm.model_id)
    for p, prompt in enumerate(prompts):
        ids = lm.prompt_ids(prompt)
        prompt_id = store.add_prompt(session_id, prompt, prompt_ids=ids)
        for sample in sample_completions(lm, ids, n, PARAMS, seed=100 * p):
            completion_id = store.add_completion(prompt_id, sample.text, sample.token_ids, sample.seed, {},
                                                 model_id=lm.model_id)
            store.set_label(completion_id, label(sample.text))
    return session_id


def test_smollm2_sweep_rises_out_of_the_random_band(engine, tmp_path):
    site = max(s for s in engine.bank.sites if s.kind == "resid_post")
    latent, family = word_family_latent(engine.lm, engine.bank, site)
    store = Store(tmp_path / "s.db")
    session_id = _session(store, engine, ["Tell me about your day."], 4, lambda text: "unlabelled")
    plan = plan_for(store, session_id, PlanSource(typed=f"{site}/{latent}:add:1"), fold=True, scope="generated")
    request = SweepRequest(plan, "Write a short note to a friend.", Grading(load_rubric("behaviour"), ("words",)),
                           strengths=(1, 2, 4, 6, 8, 12), n=8, params=PARAMS, seed=0, band=8)
    started = time.perf_counter()
    with Scripted([family_judge(family)]) as server:
        run = store.run(sweep(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule", concurrency=8))))
    seconds = time.perf_counter() - started
    result = run["result"]
    points, band = result["curves"][0]["points"], result["band"]["points"]
    print(f"\nsweep {site}/{latent} family {sorted(family)} ({engine.bank.pack.name} pack): "
          f"{len(result['completion_ids'])} completions judged in {seconds:.0f} s")
    for point, edge in zip(points, band, strict=True):
        print(f"  s={point['strength']:>4g} behaviour {point['behaviour']['mean']:.3f} score {point['score']['mean']:.3f} "
              f"band {edge['score'] and round(edge['score']['low'], 3)}..{edge['score'] and round(edge['score']['high'], 3)} "
              f"real {point['real']} perplexity {point['perplexity']:.1f}")
    print(f"  best strength {result['best']['strength']:g}: {result['best']['chosen_score']:.3f} on half the seeds, "
          f"{result['best']['reported_score']['mean']:.3f} on the other half")
    assert run["status"] == "done" and len(result["completion_ids"]) == 8 * (1 + 6 * 9)
    assert any(p["real"] for p in points)  # the family latent leaves the random band somewhere
    assert max(p["behaviour"]["mean"] for p in points[1:]) > points[0]["behaviour"]["mean"]


def test_smollm2_top_attribution_latents_against_the_random_band(engine, tmp_path):
    """Seed 003's comparison on a session labelled by a rule (the text names a colour)."""
    site = max(s for s in engine.bank.sites if s.kind == "resid_post")
    colours = {"blue", "red", "green", "yellow", "purple", "orange", "pink", "black", "white"}
    store = Store(tmp_path / "s.db")
    session_id = _session(store, engine, ["Describe the sky in one sentence.", "Describe a garden in one sentence."], 8,
                          lambda text: "positive" if colours & set(re.findall(r"[a-z]+", text.lower())) else "negative")
    attr_run = attribution(engine, store, session_id, [site], top_k=10)
    request = ValidateRequest(attr_run, "Describe your room in one sentence.", Grading(load_rubric("behaviour"), ("c",)),
                              k=5, strength=4.0, n=4, band=8, params=PARAMS, seed=0)
    with Scripted([family_judge(colours)]) as server:
        run = store.run(validate(store, engine, session_id, request, Judge(JudgeConfig(server.url, "rule", concurrency=8))))
    counts = run["result"]["leaving_band"]
    print(f"\nvalidate at {site}: {run['summary']['headline']}; overlap of the sets {run['result']['overlap']}")
    for row in run["summary"]["table"]["rows"]:
        print("  ", row)
    assert run["status"] == "done" and counts["attribution"]["latents"] == counts["activation"]["latents"] == 5


def test_smollm2_as_its_own_judge(engine, smollm2_cache, tmp_path):
    """The offline judge a user gets: llm-katan's transformers backend over the cached SmolLM2 directory."""
    store = Store(tmp_path / "s.db")
    session_id = _session(store, engine, ["Tell me about your day."], 6, lambda text: "unlabelled")
    model_dir = Path(engine.lm.source)
    port = free_port()
    started = time.perf_counter()
    with serving(katan_args(str(model_dir), "smollm2-judge", port, max_tokens=48,
                            stats_file=tmp_path / "stats.json"), port, timeout=300) as url:
        run = store.run(judge_run(store, engine, session_id, JudgeRequest(
            Grading(load_rubric("behaviour"), ("talks about the weather",))),
            Judge(JudgeConfig(url, "smollm2-judge", concurrency=1, max_tokens=48, timeout=120))))
    result = run["result"]
    print(f"\nSmolLM2 as judge: {result['counts']}, failure rate {result['failure_rate']:.0%}, "
          f"{time.perf_counter() - started:.0f} s")
    assert result["counts"]["texts"] == 6 and result["counts"]["errors"] == 0
    assert result["failure_rate"] == result["counts"]["unscored"] / 6
