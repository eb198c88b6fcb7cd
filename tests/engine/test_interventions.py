"""Interventions: every op against a hand-edited hidden state, token scopes under KV-cached generation,
and equality with the older mean-ablation (attribution) and rescale (deactivation) edits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditui.engine.interventions import OPS, Intervention, mean_projections
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Positions, Site, SiteHooks
from auditui.errors import AuditError
from auditui.testing import build_tiny_sae

SITES = (Site(1, "resid_post"), Site(1, "attn_out"), Site(1, "mlp_out"))  # TopK, JumpReLU, standard SAEs
STRENGTHS = {"rescale": [0.0, 2.5], "add": [3.0, -2.0], "clamp": [0.0, 1.5], "mean_ablate": [1.0, 0.5]}


# -- shared with test_steering.py ------------------------------------------------------------------
@pytest.fixture(scope="session", name="banks")
def banks_fixture(loaded, tiny_packs, tmp_path_factory):
    """SAE banks of the tiny packs by family, decoder rows rescaled to norms 0.5..2 (so an edit that
    confuses the raw decoder row with the unit direction fails)."""
    cache: dict[str, SAEBank] = {}

    def get(family: str) -> SAEBank:
        if family not in cache:
            lm = loaded(family)
            bank = SAEBank.from_specs([str(tiny_packs[family])], tmp_path_factory.mktemp("bank"), model=lm.model)
            bank.attach(lm)
            for site in bank.sites:
                sae = bank.sae(site)
                with torch.no_grad():
                    sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.cfg.d_sae)[:, None])
            cache[family] = bank
        return cache[family]
    return get


def random_prompts(lm, lengths, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(lm.tokenizer), (n,), generator=gen).tolist() for n in lengths]


def run(lm, ids: torch.Tensor, reads, edits=None):
    """(site tensors, logits) of one forward without cache."""
    with torch.no_grad(), SiteHooks(lm.model, reads=reads, edits=edits) as hooks:
        logits = lm.model(ids, use_cache=False).logits
    return hooks.acts, logits


def replacing(tensor: torch.Tensor):
    """An edit that puts a hand-computed tensor in place of the site tensor."""
    return lambda h, pos: tensor.to(h.dtype)


def sae_arrays(bank: SAEBank, site: Site, latents) -> tuple[np.ndarray, np.ndarray]:
    """Raw decoder rows and unit directions [k, width] of latents, float64, from the SAE's weights."""
    raw = bank.sae(site).W_dec.detach().double().numpy()[list(latents)]
    return raw, raw / np.linalg.norm(raw, axis=1, keepdims=True)


def codes(bank: SAEBank, site: Site, h: torch.Tensor, latents) -> np.ndarray:
    """The SAE activations [..., k] of latents on h [..., width] (the definition of a)."""
    with torch.no_grad():
        a = bank.sae(site).encode(h.reshape(-1, h.shape[-1]).float())
    return a[:, list(latents)].double().numpy().reshape(*h.shape[:-1], len(latents))


def hand_edit(op: str, h: np.ndarray, a: np.ndarray, raw: np.ndarray, unit: np.ndarray, s: np.ndarray,
              baseline: np.ndarray | None = None) -> np.ndarray:
    """The module formulas on rows h [n, width] with activations a [n, k] and strengths s [n, k]."""
    if op == "rescale":
        return h + ((s - 1.0) * a) @ raw
    if op == "clamp":
        return h + (s - a) @ raw
    if op == "add":
        return h + s @ unit
    return h + (s * (baseline - h @ unit.T)) @ unit


# -- each op -----------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_each_op_equals_a_hand_edited_hidden_state(family, loaded, banks, op):
    lm, bank = loaded(family), banks(family)
    ids = torch.tensor(random_prompts(lm, (9, 9)))  # two rows, one strength each
    columns = [1, 4, 5, 7]
    for site in SITES:
        clean, _ = run(lm, ids, [site])
        h = clean[site]  # [2, 9, width]
        active = torch.tensor(codes(bank, site, h, range(bank.sae(site).cfg.d_sae)))[0, columns].sum(0)
        latents = active.topk(2).indices.tolist()
        mean = h[:, 1:].mean(dim=(0, 1))
        baseline = mean_projections(bank, site, latents, mean) if op == "mean_ablate" else ()
        iv = Intervention(site, latents, op, torch.tensor(STRENGTHS[op]), set(columns), baseline)
        raw, unit = sae_arrays(bank, site, latents)
        hand = h.double().numpy().copy()
        s = np.repeat(np.array(STRENGTHS[op])[:, None], 2, axis=1)  # [rows, k]
        for row in range(2):
            x = hand[row, columns]
            hand[row, columns] = hand_edit(op, x, codes(bank, site, h[row, columns], latents), raw, unit,
                                           s[[row] * len(columns)], unit @ mean.double().numpy())
        assert np.abs(hand - h.double().numpy()).max() > 1e-2, "the edit must change something"
        edited, logits = run(lm, ids, [site], {site: iv.edit(bank)})
        np.testing.assert_allclose(edited[site].double().numpy(), hand, atol=1e-4)
        _, by_hand = run(lm, ids, [], {site: replacing(torch.tensor(hand, dtype=torch.float32))})
        torch.testing.assert_close(logits, by_hand, atol=1e-4, rtol=1e-4)


# -- token scopes under KV-cached generation ------------------------------------------------------
@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_r0_removes_the_latents_terms_at_every_targeted_token_during_cached_generation(family, loaded, banks,
                                                                                        scope):
    """Left-padded prompts of different lengths, KV cache on: at every token in scope (prompt and
    generated) the site tensor loses exactly sum_j a_j w_j; every other token passes unchanged."""
    lm, bank = loaded(family), banks(family)
    site = Site(1, "mlp_out")
    prompts = random_prompts(lm, (5, 11, 8))
    lengths = [len(p) for p in prompts]
    width, n_new, pad = max(lengths), 5, lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()  # [rows, width]
    latents = [3, 17, 40]
    iv = Intervention(site, latents, "rescale", 0.0, scope)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (own positions, h in, h out)
    before: list[torch.Tensor] = []

    def record_in(h, pos):
        before.append(h.clone())
        return h

    def record_out(h, pos):
        seen.append((pos.token.clone(), before.pop(), h.clone()))
        return h

    with torch.no_grad(), SiteHooks(lm.model, edits={site: [record_in, iv.edit(bank, lengths), record_out]}):
        lm.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          use_cache=True, pad_token_id=pad)
    raw, unit = sae_arrays(bank, site, latents)
    targeted = set()
    for own, h_in, h_out in seen:
        for row, col in np.ndindex(*own.shape):
            t, n_prompt = int(own[row, col]), lengths[row]
            inside = t >= 0 and {"all": True, "prompt": t < n_prompt, "generated": t >= n_prompt}[scope]
            x = h_in[row, col].double().numpy()
            want = hand_edit("rescale", x[None], codes(bank, site, h_in[row, col], latents)[None], raw, unit,
                             np.zeros((1, 3)))[0] if inside else x
            np.testing.assert_allclose(h_out[row, col].double().numpy(), want, atol=1e-5)
            if inside:
                targeted.add((row, t))
    expected = {"all": lambda n: range(n + n_new - 1), "prompt": range, "generated": lambda n: range(n, n + n_new - 1)}
    assert targeted == {(r, t) for r, n in enumerate(lengths) for t in expected[scope](n)}


# -- the edits of the exact check and the deactivation test, written out by hand ------------------
def _positions(start: int, batch: int, seq: int) -> Positions:
    return Positions(start, torch.arange(start, start + seq).expand(batch, seq))


def hand_mean_ablation(h, direction, mean_proj: float, sel, start: int):
    """a_t <- a_t + (ā·d - a_t·d) d at the columns sel [B, columns] (d unit)."""
    chosen = sel[:, start:start + h.shape[1]]
    return h + torch.where(chosen, mean_proj - h.float() @ direction, 0.0)[..., None] * direction


def _dense(codes):
    return codes.to_dense() if codes.is_sparse else codes


def hand_rescale(sae, h, latent_sets: list[list[int]], column: int, r: float, start: int):
    """Row b: h += (r - 1) * (the part of the SAE reconstruction carried by latent_sets[b]) at one column."""
    out, t = h.clone(), column - start
    for b, latents in enumerate(latent_sets):
        if latents:
            x = h[b, t][None]
            with torch.no_grad():  # normalising SAEs pair each encode with one decode: encode twice
                full = sae.decode(_dense(sae.encode(x)))
                kept = _dense(sae.encode(x)).clone()
                kept[:, latents] = 0
                out[b, t] += (r - 1.0) * (full - sae.decode(kept))[0]
    return out


@pytest.mark.parametrize("start", [0, 6])  # a whole pass, and a KV-cached call of later tokens
def test_mean_ablate_equals_the_exact_checks_formula(banks, start):
    bank = banks("llama")
    gen = torch.Generator().manual_seed(1)
    for site in SITES:
        h = 3 * torch.randn(3, 4, bank.decoder(site).shape[1], generator=gen)  # [batch, seq, width]
        sel = torch.rand(3, 12, generator=gen) > 0.4  # [batch, columns]
        mean = torch.randn(h.shape[-1], generator=gen)
        for latent in (0, 77):
            direction = bank.decoder(site)[latent]
            old = hand_mean_ablation(h, direction, float(direction @ mean), sel, start)
            iv = Intervention(site, [latent], "mean_ablate", 1.0, sel, mean_projections(bank, site, [latent], mean))
            new = iv.edit(bank)(h, _positions(start, 3, 4))
            torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)
            assert not torch.equal(new, h)


def _layer_norm_bank(tmp_path, width: int = 64) -> SAEBank:
    """A bank holding one standard SAE that normalises its input at run time (sae-lens layer_norm)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    site = Site(1, "resid_post")
    sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=96, normalize_activations="layer_norm",
                                        metadata=SAEMetadata(hook_name=site.hook_name, model_name="tiny")))
    with torch.no_grad():
        sae.load_state_dict(build_tiny_sae("standard", width, 96, site.hook_name, seed=4).state_dict())
        sae.W_dec.mul_(1.7)
    sae.save_model(tmp_path / "ln")
    return SAEBank.from_specs([str(tmp_path / "ln")], tmp_path)


@pytest.mark.parametrize("start", [0, 5])
def test_rescale_equals_the_deactivation_tests_formula(banks, tmp_path, start):
    """Per-row latent sets at one absolute token: the union of the latents with strength r on a
    row's own latents and 1 elsewhere; also for an SAE with run-time input normalisation."""
    ln_bank = _layer_norm_bank(tmp_path)
    cases = [(banks("llama"), site) for site in SITES] + [(ln_bank, Site(1, "resid_post"))]
    gen = torch.Generator().manual_seed(2)
    for bank, site in cases:
        sae = bank.sae(site)
        h = 4 * torch.randn(3, 3, sae.cfg.d_in, generator=gen)
        token = start + 1
        active = sae.encode(h[:, 1]).detach()  # [3, d_sae]
        sets = [active[0].topk(3).indices.tolist(), [], active[2].topk(2).indices.tolist()]
        union = sorted({j for s in sets for j in s})
        for r in (0.0, 2.5):
            old = hand_rescale(sae, h, sets, token, r, start)
            per_row = [[r if j in s else 1.0 for j in union] for s in sets]
            new = Intervention(site, union, "rescale", per_row, {token}).edit(bank)(h, _positions(start, 3, 3))
            torch.testing.assert_close(new, old, atol=2e-5, rtol=1e-5)
            assert not torch.allclose(new[0, 1], h[0, 1]) and torch.equal(new[1], h[1])


# -- data and errors -----------------------------------------------------------------------------
def test_interventions_are_json_data_and_reject_bad_input(banks):
    bank = banks("llama")
    site = Site(2, "resid_post")
    cases = [Intervention(site, (1, 2), "add", 8.0),
             Intervention(site, [5], "rescale", [0.0, 0.5, 2.0], "generated"),
             Intervention(site, [5, 6], "clamp", [[1.0, 2.0]], {3, 9}),
             Intervention(site, [7], "mean_ablate", 1.0, [[True, False], [False, True]], (0.25,))]
    for iv in cases:
        assert Intervention.from_dict(iv.to_dict()) == iv
        assert hash(iv) == hash(Intervention.from_dict(iv.to_dict()))
    assert cases[2].to_dict()["positions"] == {"columns": [3, 9]}
    with pytest.raises(AuditError, match="unknown intervention"):
        Intervention(site, [1], "boost", 1.0)
    with pytest.raises(AuditError, match="distinct"):
        Intervention(site, [1, 1], "add", 1.0)
    with pytest.raises(AuditError, match="per row and latent"):
        Intervention(site, [1, 2], "add", [[1.0, 2.0, 3.0]])
    with pytest.raises(AuditError, match="baseline"):
        Intervention(site, [1], "mean_ablate", 1.0)
    with pytest.raises(AuditError, match="token positions"):
        Intervention(site, [1], "add", 1.0, "middle")
    with pytest.raises(AuditError, match="finite"):
        Intervention(site, [1], "add", float("nan"))
    with pytest.raises(AuditError, match="prompt length"):
        Intervention(site, [1], "add", 1.0, "prompt").edit(bank)
    h = torch.zeros(2, 3, bank.decoder(site).shape[1])
    with pytest.raises(AuditError, match="3 strengths for a batch of 2"):
        cases[1].edit(bank, [3, 3])(h, _positions(0, 2, 3))
