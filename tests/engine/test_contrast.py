"""The contrastive direction: against an independent computation, and its Δ-attr against the latents' code path."""

from __future__ import annotations

import pytest
import torch
from helpers import labelled_session

from auditui.engine import Engine
from auditui.engine.attribution import delta_scores
from auditui.engine.contrast import check_contrast_sites, contrast_moments, direction_attr, site_contrast
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site, SiteHooks
from auditui.engine.steering import compile, parse_plan
from auditui.errors import AuditError
from auditui.store.database import Store
from auditui.testing import build_tiny_pack
from auditui.workflows.attribute import pair_plan
from auditui.workflows.contrast import ContrastRequest, contrast, export_directions, run_directions
from auditui.workflows.reference import reference_means

SPEC = [  # uneven label counts: each prompt weighs the same whatever its counts
    ("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative"), ("Sure thing", "positive")]),
    ("Tell me a joke", [("Why did the chicken", "negative"), ("No.", "positive"), ("Knock knock", "negative"),
                        ("A pun", "negative")]),
]
SITES = [Site(1, "mlp_out"), Site(2, "resid_post")]


@pytest.fixture(scope="module")
def engine(loaded, tiny_models, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("contrast")
    pack = build_tiny_pack(tiny_models["llama"], root / "pack", d_sae=128, sites=SITES)
    lm = loaded("llama")
    return Engine(lm, SAEBank.from_specs([str(pack)], root, device=lm.device, model=lm.model).attach(lm), root)


@pytest.fixture
def session(engine, tmp_path):
    store = Store(tmp_path / "s.db")
    return store, labelled_session(store, engine.lm, SPEC)


def independent_direction(lm, site: Site) -> torch.Tensor:
    """Mean over prompts of (mean over positive completions - mean over negative ones) of each completion's
    mean activation over its own tokens, one completion at a time through the chat-free prompt ids."""
    per_prompt = []
    for prompt, completions in SPEC:
        groups: dict[str, list[torch.Tensor]] = {"positive": [], "negative": []}
        p_ids = lm.prompt_ids(prompt, chat=False)
        for text, label in completions:
            ids = p_ids + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as hooks:
                lm.model(torch.tensor([ids]))
            groups[label].append(hooks.acts[site][0, len(p_ids):].double().mean(0))
        per_prompt.append(torch.stack(groups["positive"]).mean(0) - torch.stack(groups["negative"]).mean(0))
    return torch.stack(per_prompt).mean(0)


@pytest.mark.parametrize("positions", ["prompt", "all"])
def test_direction_and_its_attribution_match_independent_code(engine, session, positions):
    store, sid = session
    plan = pair_plan(store, sid, positions)
    means = reference_means(store, engine, sid, SITES).means
    moments = contrast_moments(engine.lm, plan, SITES, means, positions, batch_size=3)
    latents = delta_scores(engine, plan, SITES, means, positions, batch_size=2)
    for site in SITES:
        v, m = moments[site]
        torch.testing.assert_close(v, independent_direction(engine.lm, site), rtol=1e-4, atol=1e-6)
        # a direction equal to an SAE decoder row gets that latent's Δ-attribution, number for number
        attr = latents[site][0].double()
        assert attr.abs().max() > 1e-4, "vacuous"
        torch.testing.assert_close(direction_attr(m, engine.bank.decoder(site)), attr, rtol=1e-3, atol=1e-7)
        summary, d = site_contrast(engine.lm, site, v, m, engine.bank.decoder(site))
        assert summary.norm == pytest.approx(float(v.norm())) and float(d.norm()) == pytest.approx(1.0)
        above = int((attr > summary.delta_attr).sum())
        assert summary.rank == above + 1 and summary.d_sae == 128 and len(summary.logit_lens) == 8
        assert summary.top_latent == int(attr.argmax())


def test_run_export_and_steering_through_plans(engine, session, tmp_path):
    store, sid = session
    run_id = contrast(store, engine, sid, ContrastRequest(sites=tuple(SITES), batch_size=4))
    run = store.run(run_id)
    assert run["kind"] == "contrast" and run["status"] == "done"
    assert set(run["result"]["sites"]) == {"1/mlp_out", "2/resid_post"} and run["result"]["n_prompts"] == 2
    assert run["params"]["saes"] == engine.sae_digests(SITES)
    assert run["summary"]["headline"].startswith("difference-of-means direction over 2 prompts")
    directions = run_directions(store, run_id)
    # exported as one-latent SAEs: attribution of latent 0 is the run's Δ-attr of d
    pack = export_directions(store, run_id, tmp_path / "dirs")
    lm = engine.lm
    bank = SAEBank.from_specs([str(pack)], tmp_path, device=lm.device, model=lm.model).attach(lm)
    as_latent = Engine(lm, bank, tmp_path)
    means = reference_means(store, engine, sid, SITES).means
    scores = delta_scores(as_latent, pair_plan(store, sid), SITES, means)
    for site in SITES:
        torch.testing.assert_close(bank.decoder(site)[0], directions[site])
        assert float(scores[site][0][0]) == pytest.approx(run["result"]["sites"][str(site)]["delta_attr"], rel=1e-3)
    # steering: "add s" moves every token by s·d at the site
    site = SITES[1]
    edits = compile(parse_plan(f"{site}/0:add:3"), bank)
    ids = torch.tensor([lm.prompt_ids("Hello there", chat=False)])
    with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as plain:
        lm.model(ids)
    with torch.no_grad(), SiteHooks(lm.model, reads=[site], edits=edits) as steered:
        lm.model(ids)
    torch.testing.assert_close(steered.acts[site] - plain.acts[site], 3 * directions[site].expand_as(plain.acts[site]),
                               rtol=1e-4, atol=1e-4)


def test_refusals(engine, session):
    store, sid = session
    with pytest.raises(AuditError, match="at least one site"):
        check_contrast_sites([])
    with pytest.raises(AuditError, match="d_model sites"):
        check_contrast_sites([Site(1, "attn_z")])
    with pytest.raises(AuditError, match="both a positive and a negative"):
        contrast(store, engine, store.create_session("empty"), ContrastRequest(sites=(SITES[0],)))
