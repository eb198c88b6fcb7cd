"""Deactivation test (seed 001, 5.2): the rescale edit against hand-edited states, and a planted chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditui.engine import Engine
from auditui.engine.deactivation import deactivation_summary, deactivation_test, rescale
from auditui.engine.flow import text_ids
from auditui.engine.model import load_model
from auditui.engine.saes import SAEBank, write_pack_manifest
from auditui.engine.sites import Site, SiteHooks
from auditui.testing import build_tiny_model, build_tiny_sae

TEXT = "Flow graphs trace features across layers."


def numpy_params(sae) -> dict[str, np.ndarray]:
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    return {name: getattr(sae, name).detach().numpy().astype(np.float64) for name in names}


def standard_codes(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """A standard (ReLU) SAE's activations, by hand."""
    return np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0.0)


def run(lm, ids: list[int], reads: list[Site], edits: dict | None = None) -> dict[Site, torch.Tensor]:
    with torch.no_grad(), SiteHooks(lm.model, reads=reads, edits=edits) as hooks:
        lm.model(torch.tensor([ids]))
    return hooks.acts


def test_rescale_edit_equals_a_hand_edited_hidden_state(loaded, tmp_path):
    lm = loaded("llama")
    site, later = Site(1, "resid_post"), Site(2, "resid_post")
    sae = build_tiny_sae("standard", lm.d_model, 96, site.hook_name, seed=11)
    with torch.no_grad():  # decoder rows of norm 0.5..3: the edit must use a * W_dec[j], not a * unit row
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 96).unsqueeze(1))
    sae.save_model(tmp_path / "sae")
    bank = SAEBank.from_specs([str(tmp_path / "sae")], tmp_path)
    p = numpy_params(sae)
    ids = text_ids(lm, TEXT)
    pos = 6
    clean = run(lm, ids, [site, later])
    h = clean[site][0].numpy().astype(np.float64)  # [seq, d_model]
    a = standard_codes(p, h[pos])
    latents = [int(j) for j in np.argsort(-a)[:3]]
    assert a[latents].min() > 0
    for r in (0.0, 2.5):
        hand = h.copy()
        hand[pos] += (r - 1.0) * (a[latents] @ p["W_dec"][latents])
        edited = run(lm, ids, [site, later], {site: rescale(site, [latents], pos, r).edit(bank)})
        np.testing.assert_allclose(edited[site][0].numpy(), hand, atol=1e-4)
        assert not np.allclose(edited[site][0].numpy()[pos], h[pos], atol=1e-2)
        hand_tensor = torch.tensor(hand, dtype=torch.float32).unsqueeze(0)
        reference = run(lm, ids, [later], {site: lambda _h, _pos, t=hand_tensor: t})
        torch.testing.assert_close(edited[later], reference[later], atol=1e-4, rtol=1e-4)
    # r = 1 is a no-op
    same = run(lm, ids, [site], {site: rescale(site, [latents], pos, 1.0).edit(bank)})
    torch.testing.assert_close(same[site], clean[site], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def planted_chain(tmp_path_factory):
    """A tiny llama whose layer-2 attention and MLP write nothing along u, and SAEs where
    2/resid_post/9 = u is fed only by its exact predecessor 1/resid_post/6 = u."""
    root = tmp_path_factory.mktemp("chain")
    lm = load_model(str(build_tiny_model("llama", root / "model", seed=3)), device="cpu", dtype="float32")
    ids = text_ids(lm, TEXT)
    pos = len(ids) - 2
    h1 = run(lm, ids, [Site(1, "resid_post")])[Site(1, "resid_post")][0, pos]
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(lm.d_model, generator=gen)
    u = u / u.norm() * torch.sign(u @ h1)  # u . h1 > 0: the predecessor fires
    project = torch.eye(lm.d_model) - torch.outer(u, u)
    block = lm.model.model.layers[2]
    with torch.no_grad():
        block.self_attn.o_proj.weight.copy_(project @ block.self_attn.o_proj.weight)
        block.mlp.down_proj.weight.copy_(project @ block.mlp.down_proj.weight)
    saved = {}
    for i, (site, planted) in enumerate([(Site(1, "resid_post"), 6), (Site(2, "resid_post"), 9),
                                         (Site(2, "mlp_out"), None), (Site(2, "attn_out"), None)]):
        sae = build_tiny_sae("standard", lm.d_model, 32, site.hook_name, seed=20 + i)
        if planted is not None:
            with torch.no_grad():
                sae.W_dec[planted] = u
                sae.W_enc[:, planted] = u
                sae.b_enc[planted] = 0.0
        saved[site] = root / "pack" / f"{site.kind}_{site.layer}"
        sae.save_model(saved[site])
    write_pack_manifest(root / "pack", "chain", "tiny", saved)
    bank = SAEBank.from_specs([str(root / "pack")], root / "cache", model=lm.model).attach(lm)
    return Engine(lm, bank, root / "cache"), ids, pos, u


def test_r0_on_the_exact_predecessor_turns_the_target_off(planted_chain):
    engine, ids, pos, u = planted_chain
    lm = engine.lm
    clean = run(lm, ids, [Site(1, "resid_post"), Site(2, "resid_post"), Site(2, "mlp_out")])
    z_hand = float(u @ clean[Site(2, "resid_post")][0, pos])  # target = relu(u . h2), b_enc = b_dec = 0
    assert z_hand == pytest.approx(float(u @ clean[Site(1, "resid_post")][0, pos]), abs=1e-4) and z_hand > 0.1
    result = deactivation_test(engine, "2/resid_post/9", ids, pos, r=0.0)
    assert result["z_old"] == pytest.approx(z_hand, abs=1e-4)
    assert result["predecessors"]["R"][0]["feature"] == "1/resid_post/6"
    assert result["predecessors"]["R"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["predecessors"]["M"]) == 5 and result["groups"]["top1"].startswith("From RES")
    rows = {(row["method"], row["set"]): row for row in result["rows"]}
    assert rows[("top1", "RES")]["change"] == pytest.approx(1.0, abs=1e-4)
    assert rows[("top1", "RES")]["z_new"] == pytest.approx(0.0, abs=1e-4 * z_hand)
    assert {m for m, _ in rows} == {"top1", "top5", "random"} and {s for _, s in rows} >= {"RES", "MLP", "ATT"}
    # the batched MLP row equals one pass with a hand edit at mlp_out(2)
    mlp = rows[("top1", "MLP")]
    latent = int(mlp["features"][0].rsplit("/", 1)[1])
    p = numpy_params(engine.bank.sae(Site(2, "mlp_out")))
    h_m = clean[Site(2, "mlp_out")][0].numpy().astype(np.float64)
    a = standard_codes(p, h_m[pos])[latent]
    h_m[pos] -= a * p["W_dec"][latent]
    hand = torch.tensor(h_m, dtype=torch.float32).unsqueeze(0)
    edited = run(lm, ids[:pos + 1], [Site(2, "resid_post")], {Site(2, "mlp_out"): lambda _h, _s: hand[:, :pos + 1]})
    z_new = max(float(u @ edited[Site(2, "resid_post")][0, pos]), 0.0)
    assert mlp["z_new"] == pytest.approx(z_new, abs=1e-4)
    assert mlp["change"] == pytest.approx(1 - z_new / z_hand, abs=1e-4)
    # seeded: the same seed gives the same random picks; the summary renders every row
    assert deactivation_test(engine, "2/resid_post/9", ids, pos, seed=0)["rows"] == result["rows"]
    summary = deactivation_summary(result)
    assert len(summary["table"]["rows"]) == len(result["rows"]) and "largest change 1.000" in summary["headline"]


def test_inactive_target_reports_instead_of_dividing_by_zero(planted_chain):
    engine, ids, pos, _ = planted_chain
    site = Site(2, "resid_post")
    h2 = run(engine.lm, ids, [site])[site][0, pos]
    codes = engine.bank.sae(site).encode(h2).detach()
    off = int(torch.nonzero(codes == 0)[0])
    result = deactivation_test(engine, f"2/resid_post/{off}", ids, pos)
    assert result["active"] is False and result["rows"] == [] and "inactive" in result["notes"][-1]
