"""Δ-attribution on tiny models, checked against independent per-latent code and real ablations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import Probe, attribution, labelled_session
from scipy.stats import spearmanr

from auditui.engine import Engine
from auditui.engine.attribution import NO_PAIRS, POSITIONS, attribute_batch, feeds, grad_leaf, spearman
from auditui.engine.reference import TokenSeq
from auditui.engine.saes import SAEBank, resolve_pack_dir
from auditui.engine.sites import Site, SiteHooks
from auditui.errors import AuditError
from auditui.progress import Cancelled
from auditui.store.database import Store
from auditui.testing import build_tiny_pack, build_tiny_sae
from auditui.workflows.attribute import attribution_run, check_latents, run_deltas
from auditui.workflows.reference import reference_means

SPEC = [
    ("Is the sky blue?", [("Yes, it is.", "positive"), ("No way!", "negative"), ("Sure thing", "positive")]),
    ("Tell me a joke", [("Why did the chicken", "negative"), ("No.", "positive"), ("Knock knock", "negative")]),
]
SPANS = {  # the chosen positions of each mode, written out independently of the engine
    "prompt": lambda n_prompt, n: range(1, n_prompt),
    "completion": lambda n_prompt, n: range(n_prompt, n - 1),
    "all": lambda n_prompt, n: range(1, n - 1),
}


def make_engine(lm, specs: list[Path], root: Path) -> Engine:
    bank = SAEBank.from_specs([str(s) for s in specs], root, device=lm.device, model=lm.model).attach(lm)
    return Engine(lm, bank, root)


@pytest.fixture(scope="module")
def engine_for(loaded, tiny_models, tmp_path_factory):
    """Tiny engine per family: its tiny pack plus an attn_z SAE at layer 1."""
    cache: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"attr-{family}")
            sites = [Site(0, "resid_pre"), Site(1, "attn_z"), Site(1, "attn_out"), Site(1, "mlp_out"),
                     Site(2, "resid_post")]
            pack = build_tiny_pack(tiny_models[family], root / "pack", d_sae=128, sites=sites)
            cache[family] = make_engine(loaded(family), [pack], root)
        return cache[family]
    return get


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "s.db")


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


def completion_loss(logits: torch.Tensor, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """-log p(completion | prompt) for one sequence, from full logits [T, vocab]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    positions = torch.arange(n_prompt - 1, ids.shape[0] - 1)
    return -logp[positions, ids[n_prompt:]].sum()


def per_latent_deltas(lm, site: Site, seq: TokenSeq, directions: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """δ_{i,t} [n, T] by autograd on a scalar coefficient per position along each d_i, one latent at a time."""
    ids = torch.tensor(seq.ids)
    with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as hooks:
        lm.model(ids[None])
    acts = hooks.acts[site][0].double()  # [T, width]
    out = []
    for d in directions:
        coef = torch.zeros(len(seq), requires_grad=True)
        with SiteHooks(lm.model, edits={site: lambda h, pos, d=d, coef=coef: h + coef[None, :, None] * d}):
            loss = completion_loss(lm.model(ids[None]).logits[0], ids, seq.n_prompt)
        (grad,) = torch.autograd.grad(loss, coef)  # dL/d(a_t·d_i) = g_t·d_i
        out.append(-grad.double() * ((acts - mean.double()) @ d.double()))
    return torch.stack(out)


@pytest.mark.parametrize("family,site_texts", [
    ("llama", ["1/attn_out", "1/mlp_out", "2/resid_post"]),
    ("gpt_neox", ["1/attn_z", "1/attn_out", "1/mlp_out"]),  # parallel block: attn and mlp side by side
    ("gemma2", ["0/resid_pre", "2/resid_post"]),
])
def test_all_latents_at_once_equal_a_per_latent_loop(family, site_texts, engine_for):
    engine = engine_for(family)
    lm = engine.lm
    sites = [Site.parse(s) for s in site_texts]
    encode = lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    seqs = [TokenSeq(ids=tuple(encode(p) + encode(c)), n_prompt=len(encode(p)), completion_id=i)
            for i, (p, c) in enumerate([("Is the sky blue?", "Yes, it is."), ("Hi", "Hello there, friend"),
                                        ("Tell me a joke", "No.")])]
    gen = torch.Generator().manual_seed(4)
    means = {s: 0.3 * torch.randn(lm.site_width(s.kind), generator=gen) for s in sites}
    latents = [0, 31, 127]
    got = {positions: attribute_batch(engine, seqs, sites, means, positions) for positions in POSITIONS}
    for site in sites:
        sae = engine.bank.sae(site)
        directions = unit_rows(sae.W_dec.detach()[latents])
        for row, seq in enumerate(seqs):
            deltas = per_latent_deltas(lm, site, seq, directions, means[site])  # [latents, T]
            with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as hooks:
                lm.model(torch.tensor([seq.ids]))
            for positions, scores in got.items():
                span = list(SPANS[positions](seq.n_prompt, len(seq)))
                expected = deltas[:, span].mean(dim=1)
                assert expected.abs().max() > 1e-4, "vacuous: no attribution at all"
                attr, act = scores[site]
                torch.testing.assert_close(attr[row, latents].double(), expected, rtol=1e-3, atol=1e-6)
                act_span = list(range(seq.n_prompt, len(seq)))  # Δ-act: every completion token
                codes = sae.encode(hooks.acts[site][0, act_span]).mean(dim=0)
                torch.testing.assert_close(act[row], codes, rtol=1e-4, atol=1e-5)


def test_backward_stops_at_the_earliest_needed_site(engine_for):
    engine = engine_for("llama")
    lm = engine.lm
    calls = {0: 0, 2: 0}
    handles = [lm.model.get_submodule(f"{lm.adapter.layers}.{layer}").register_full_backward_hook(
        lambda *args, layer=layer: calls.__setitem__(layer, calls[layer] + 1)) for layer in calls]
    try:
        seq = TokenSeq(ids=tuple(range(40, 60)), n_prompt=12, completion_id=0)
        attribute_batch(engine, [seq], [Site(2, "resid_post")], {Site(2, "resid_post"): torch.zeros(lm.d_model)})
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {0: 0, 2: 1}


def test_grad_leaf_is_a_site_every_other_site_depends_on():
    s = Site.parse
    assert grad_leaf([s("1/mlp_out"), s("1/attn_out")], parallel=False) == s("1/attn_out")
    assert grad_leaf([s("1/mlp_out"), s("1/attn_out")], parallel=True) == s("1/resid_pre")
    assert grad_leaf([s("3/resid_post"), s("1/mlp_out")], parallel=True) == s("1/mlp_out")
    assert grad_leaf([s("2/resid_post"), s("2/attn_z"), s("2/attn_out")], parallel=False) == s("2/attn_z")
    assert feeds(s("1/resid_post"), s("2/resid_pre"), False) and not feeds(s("2/resid_pre"), s("1/resid_post"), False)
    assert not feeds(s("1/mlp_out"), s("1/attn_out"), False)


def test_attribution_matches_mean_ablation_where_the_model_is_near_linear(engine_for, store, tmp_path):
    """Decoder rows almost orthogonal to every (a_t - ā) at the prompt positions: the ablation moves the
    activation only a little along a direction the loss still has a gradient in, so ΔL is first order."""
    base = engine_for("llama")
    lm, site = base.lm, Site(1, "resid_post")
    session_id = labelled_session(store, lm, SPEC)
    mean = reference_means(store, base, session_id, [site]).means[site]
    deviations = []
    for prompt in store.prompts(session_id):
        with torch.no_grad(), SiteHooks(lm.model, reads=[site]) as hooks:
            lm.model(torch.tensor([prompt["prompt_ids"]]))
        deviations.append(hooks.acts[site][0, 1:] - mean)
    _, singular, vh = torch.linalg.svd(torch.cat(deviations))
    null = vh[int((singular > 1e-5 * singular[0]).sum()):]  # directions no prompt position varies along
    gen = torch.Generator().manual_seed(1)
    n_latents, eta = 8, 0.01  # relative error of first order ~ eta (0.2 gives ~25%)
    along = unit_rows(torch.randn(n_latents, null.shape[0], generator=gen) @ null)
    directions = unit_rows(along + eta * unit_rows(torch.randn(n_latents, lm.d_model, generator=gen)))
    sae = build_tiny_sae("standard", lm.d_model, n_latents, site.hook_name)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
    sae.save_model(tmp_path / "near-linear")
    engine = make_engine(lm, [tmp_path / "near-linear"], tmp_path)
    run_id = attribution(engine, store, session_id, [site], top_k=n_latents, check=n_latents)
    rows = attribution_run(store, run_id)["result"]["rows"]
    assert len(rows) == n_latents and all(r["exact"] is not None for r in rows)
    for row in rows:
        assert abs(row["exact"]) > 1e-5, row
        assert (row["delta_attr"] > 0) == (row["exact"] > 0), row
        assert abs(row["delta_attr"] - row["exact"]) <= 0.05 * abs(row["exact"]), row
    assert attribution_run(store, run_id)["result"]["spearman"] > 0.9


def test_delta_attribution_is_antisymmetric_in_the_labels(engine_for, store):
    engine = engine_for("llama")
    session_id = labelled_session(store, engine.lm, SPEC)
    sites = [Site(1, "mlp_out"), Site(2, "resid_post")]
    first = attribution(engine, store, session_id, sites, top_k=10, positions="completion")
    for completion in store.completions(session_id=session_id):
        store.set_label(completion["id"], {"positive": "negative", "negative": "positive"}[completion["label"]])
    second = attribution(engine, store, session_id, sites, top_k=10, positions="completion")
    before, after = run_deltas(store, first), run_deltas(store, second)
    assert set(before) == {"1/mlp_out|attr", "1/mlp_out|act", "2/resid_post|attr", "2/resid_post|act"}
    for name, vector in before.items():
        assert vector.abs().max() > 1e-4, name
        torch.testing.assert_close(after[name], -vector, rtol=1e-5, atol=1e-7)
    rows = [r for r in store.run(second)["result"]["rows"] if r["site"] == "2/resid_post"]
    assert [r["latent"] for r in rows] == before["2/resid_post|attr"].argsort()[:10].tolist()


UNEVEN = [  # 2 positive + 1 negative, then 1 positive + 3 negative; the rest is outside every pair
    ("Is the sky blue?", [("Yes, it is.", "positive"), ("Sure thing", "positive"), ("No way!", "negative"),
                          ("Maybe", "unlabelled")]),
    ("Tell me a joke", [("No.", "positive"), ("Why did the chicken", "negative"), ("Knock knock", "negative"),
                        ("Not now", "negative")]),
    ("Say something nice", [("You are great", "positive")]),
]


def test_delta_weights_each_prompt_equally_with_uneven_label_counts(engine_for, store):
    """Δ by hand from one completion at a time: mean within each label per prompt, positive minus
    negative, then the mean over the prompts that have both labels."""
    engine = engine_for("llama")
    sites = [Site(1, "mlp_out"), Site(2, "resid_post")]
    session_id = labelled_session(store, engine.lm, UNEVEN)
    run_id = attribution(engine, store, session_id, sites, top_k=5, positions="all", batch_size=3)
    means = reference_means(store, engine, session_id, sites).means  # the run's stored ā
    per_prompt, pooled = [], {"positive": [], "negative": []}
    for prompt in store.prompts(session_id):
        scores: dict[str, list] = {"positive": [], "negative": []}
        for c in store.completions(prompt_id=prompt["id"]):
            if c["label"] in scores:
                seq = TokenSeq(ids=tuple(prompt["prompt_ids"] + c["token_ids"]), n_prompt=len(prompt["prompt_ids"]),
                               completion_id=c["id"])
                one = attribute_batch(engine, [seq], sites, means, "all")
                scores[c["label"]].append({(site, i): one[site][i][0] for site in sites for i in (0, 1)})
        if scores["positive"] and scores["negative"]:
            per_prompt.append({key: torch.stack([s[key] for s in scores["positive"]]).mean(0)
                               - torch.stack([s[key] for s in scores["negative"]]).mean(0)
                               for key in scores["positive"][0]})
            for label in pooled:
                pooled[label] += scores[label]
    assert [len(pooled["positive"]), len(pooled["negative"])] == [3, 4]
    got = run_deltas(store, run_id)
    for site in sites:
        for i, name in enumerate(("attr", "act")):
            expected = torch.stack([d[(site, i)] for d in per_prompt]).mean(0)  # [d_sae]
            assert expected.abs().max() > 1e-4, (site, name)
            torch.testing.assert_close(got[f"{site}|{name}"], expected, rtol=1e-4, atol=1e-6)
            by_completion = (torch.stack([s[(site, i)] for s in pooled["positive"]]).mean(0)
                             - torch.stack([s[(site, i)] for s in pooled["negative"]]).mean(0))
            assert (by_completion - expected).abs().max() > 1e-3 * expected.abs().max()  # weighting matters
    weights = {int(k): v for k, v in store.run(run_id)["result"]["weights"].items()}
    ids = {c["text"]: c["id"] for c in store.completions(session_id=session_id)}
    assert weights == pytest.approx({ids["Yes, it is."]: 1 / 4, ids["Sure thing"]: 1 / 4, ids["No way!"]: -1 / 2,
                                     ids["No."]: 1 / 2, ids["Why did the chicken"]: -1 / 6,
                                     ids["Knock knock"]: -1 / 6, ids["Not now"]: -1 / 6})


def test_pairs_without_both_labels_are_refused(engine_for, store):
    engine = engine_for("llama")
    only_positive = [("Is the sky blue?", [("Yes", "positive"), ("No", "unlabelled")]),
                     ("Tell me a joke", [("No.", "negative")])]
    for spec in (only_positive, [("Hi", [("Hello", "unlabelled")])]):
        session_id = labelled_session(store, engine.lm, spec)
        with pytest.raises(AuditError, match=f"^{NO_PAIRS}$"):
            attribution(engine, store, session_id, [Site(1, "mlp_out")])
        assert store.runs(session_id, "attribution") == []


def test_bad_requests_are_one_line_errors(engine_for, store):
    engine = engine_for("llama")
    session_id = labelled_session(store, engine.lm, SPEC)
    with pytest.raises(AuditError, match="no SAE for site 2/mlp_out"):
        attribution(engine, store, session_id, [Site(2, "mlp_out")])
    with pytest.raises(AuditError, match="unknown positions 'middle'"):
        attribution(engine, store, session_id, [Site(1, "mlp_out")], positions="middle")


def test_reference_mean_is_the_mean_of_the_session_texts_and_is_reused(engine_for, store, tmp_path):
    engine = engine_for("gpt2")
    lm = engine.lm
    session_id = labelled_session(store, lm, SPEC)
    sites = [Site(1, "mlp_out"), Site(2, "resid_post")]
    reference = reference_means(store, engine, session_id, sites)
    rows = {site: [] for site in sites}
    for prompt in store.prompts(session_id):
        for i, completion in enumerate(store.completions(prompt_id=prompt["id"])):
            ids = prompt["prompt_ids"] + completion["token_ids"]
            first = 1 if i == 0 else len(prompt["prompt_ids"])  # each prompt counted once
            with torch.no_grad(), SiteHooks(lm.model, reads=sites) as hooks:
                lm.model(torch.tensor([ids]))
            for site in sites:
                rows[site].append(hooks.acts[site][0, first:])
    for site in sites:
        torch.testing.assert_close(reference.means[site], torch.cat(rows[site]).mean(dim=0), rtol=1e-5, atol=1e-6)
    runs = store.runs(session_id, "reference_mean")
    again = reference_means(store, engine, session_id, [Site(2, "resid_post"), Site(0, "resid_pre")])
    assert again.runs[Site(2, "resid_post")] == runs[0]["id"] and again.runs[Site(0, "resid_pre")] != runs[0]["id"]
    assert len(store.runs(session_id, "reference_mean")) == 2
    text = tmp_path / "ref.txt"
    text.write_text("A different text entirely, about rivers and mountains. " * 10)
    from_file = reference_means(store, engine, session_id, sites, text_file=text)
    assert not torch.allclose(from_file.means[sites[0]], reference.means[sites[0]])
    assert reference_means(store, engine, session_id, sites, text_file=text).runs == from_file.runs
    store.add_completion(store.prompts(session_id)[0]["id"], "New", [78, 101, 119], 9, {})
    assert reference_means(store, engine, session_id, sites).runs[sites[0]] not in {r["id"] for r in runs}


def test_cancel_marks_the_run_and_a_stopped_check_keeps_the_result(engine_for, store):
    engine = engine_for("llama")
    session_id = labelled_session(store, engine.lm, SPEC)
    site = Site(1, "mlp_out")
    with pytest.raises(Cancelled):
        attribution(engine, store, session_id, [site], progress=Probe(stop=lambda events: True))
    cancelled = store.runs(session_id, "attribution")[-1]["id"]
    assert store.run(cancelled)["status"] == "cancelled" and store.run(cancelled)["result"] is None

    def checked(events) -> list:
        return [done for done, _, message in events if message.startswith("exact check")]
    run_id = attribution(engine, store, session_id, [site], top_k=5, check=4,
                         progress=Probe(stop=lambda events: len(checked(events)) >= 2))
    run = attribution_run(store, run_id)
    assert run["status"] == "done" and run["result"]["n_checked"] == 2
    assert any("stopped after 2 of 4" in note for note in run["summary"]["notes"])


def test_check_latents_beyond_the_top_k_and_spearman(engine_for, store):
    engine = engine_for("llama")
    session_id = labelled_session(store, engine.lm, SPEC)
    site = Site(2, "resid_post")
    run_id = attribution(engine, store, session_id, [site], top_k=3, positions="all")
    attr = run_deltas(store, run_id)["2/resid_post|attr"]
    order = attr.argsort()
    far, top = int(order[0]), order[-3:].tolist()  # the lowest Δ-attr latent; the top 3 (in the stored rows)
    rows = check_latents(store, engine, run_id, [("2/resid_post", far), *((site, i) for i in top)])
    assert {r["latent"] for r in rows} == {far, *top} and all(r["exact"] is not None for r in rows)
    result = attribution_run(store, run_id)["result"]
    far_row = next(r for r in result["rows"] if r["latent"] == far)
    assert far_row["rank"] == attr.shape[0] and far_row["delta_attr"] == pytest.approx(float(attr[far]))
    expected = spearmanr([r["delta_attr"] for r in rows], [r["exact"] for r in rows]).statistic  # 4 points
    assert result["n_checked"] == 4 and result["spearman"] == pytest.approx(expected)
    assert result["sites"]["2/resid_post"]["spearman"] == pytest.approx(expected)
    assert "Spearman" in attribution_run(store, run_id)["summary"]["headline"]
    with pytest.raises(AuditError, match="did not attribute site 1/mlp_out"):
        check_latents(store, engine, run_id, [(Site(1, "mlp_out"), 0)])
    with pytest.raises(AuditError, match="latents 0..127"):
        check_latents(store, engine, run_id, [(site, 500)])


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: average ranks [1.5, 1.5, 3] vs [1, 2, 3] -> Pearson = 0.866...
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(3 ** 0.5 / 2)
    # ties on both sides, in reversed order: ranks [1, 2.5, 2.5, 4] against [4, 2.5, 2.5, 1]
    assert spearman([1, 2, 2, 3], [9, 4, 4, 0]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None and spearman([1, 1], [1, 2]) is None


@pytest.mark.slow
def test_smollm2_attribution_tracks_exact_ablation(smollm2, tmp_path):
    """Spearman(attribution, exact ablation) over the top 20 latents on SmolLM2 (demo pack if built)."""
    from platformdirs import user_cache_dir

    lm = smollm2
    try:
        pack = resolve_pack_dir("demo", Path(user_cache_dir("auditui")))
    except AuditError:
        pack = build_tiny_pack(Path(lm.source), tmp_path / "pack", d_sae=2048, sites=[Site(12, "resid_post")])
    engine = make_engine(lm, [pack], tmp_path)
    site = Site(12, "resid_post") if Site(12, "resid_post") in engine.bank else engine.bank.sites[len(engine.bank) // 2]
    store = Store(tmp_path / "s.db")
    session_id = store.create_session("smollm2", model_id=lm.model_id)
    prompts = ["Should I trust everything I read online?", "Write one sentence about the ocean.",
               "Is it fine to skip breakfast?", "Give me advice for a job interview."]
    torch.manual_seed(0)
    for prompt in prompts:
        prompt_ids = lm.prompt_ids(prompt)
        prompt_id = store.add_prompt(session_id, prompt, prompt_ids=prompt_ids)
        out = lm.model.generate(torch.tensor([prompt_ids] * 4), do_sample=True, max_new_tokens=24,
                                pad_token_id=lm.tokenizer.pad_token_id)
        for i, row in enumerate(out[:, len(prompt_ids):].tolist()):
            tokens = [t for t in row if t != lm.tokenizer.eos_token_id]
            completion_id = store.add_completion(prompt_id, lm.tokenizer.decode(tokens), tokens, i, {})
            store.set_label(completion_id, "positive" if i % 2 == 0 else "negative")
    run_id = attribution(engine, store, session_id, [site], top_k=20, check=20)
    result = attribution_run(store, run_id)["result"]
    print(f"\nSmolLM2 {site} ({pack.name}): Spearman over top {result['n_checked']} = {result['spearman']:.3f}")
    for row in result["rows"][:20]:
        print(f"  #{row['latent']:>6} attr {row['delta_attr']:+.4g} exact {row['exact']:+.4g} {row['logit_lens'][:4]}")
    assert result["n_checked"] == 20 and result["spearman"] > 0.3
