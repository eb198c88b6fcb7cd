"""Flow graphs: scores against numpy, transition tables, a planted graph, classes, groups, export."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from auditui.engine import Engine
from auditui.engine.flow import (
    FlowGraph,
    Thresholds,
    build_flow_graph,
    classify,
    graph_summary,
    layer_rows,
    predecessor_groups,
    step_scores,
    text_ids,
    to_dot,
    to_mermaid,
)
from auditui.engine.saes import SAEBank, write_pack_manifest
from auditui.engine.sites import Site, SiteHooks
from auditui.engine.transitions import TransitionCache
from auditui.errors import AuditError
from auditui.store.database import Store
from auditui.testing import build_tiny_pack, build_tiny_sae
from auditui.workflows.flow import record_flow


def make_engine(lm, specs: list[Path], cache: Path) -> Engine:
    bank = SAEBank.from_specs([str(s) for s in specs], cache, device=lm.device, model=lm.model).attach(lm)
    return Engine(lm, bank, cache)


def unit_decoders(pack_dir: Path) -> dict[str, np.ndarray]:
    """Unit decoder rows per site, read from the pack files with numpy only."""
    manifest = json.loads((pack_dir / "pack.json").read_text())
    out = {}
    for site, entry in manifest["saes"].items():
        w_dec = load_file(str(pack_dir / entry["path"] / "sae_weights.safetensors"))["W_dec"].astype(np.float64)
        out[site] = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return out


def numpy_top(decoders: dict[str, np.ndarray], src: str, latent: int, dst: str, k: int) -> list[tuple[int, float]]:
    cos = decoders[dst] @ decoders[src][latent]
    order = np.argsort(-cos)[:k]
    return [(int(j), float(cos[j])) for j in order]


def test_scores_equal_numpy_cosines(tiny_packs, loaded, tmp_path):
    lm = loaded("llama")
    engine = make_engine(lm, [tiny_packs["llama"]], tmp_path)
    dec = unit_decoders(tiny_packs["llama"])
    cases = [("backward", "2/resid_post", {"R": "1/resid_post", "M": "2/mlp_out", "A": "2/attn_out"}),
             ("backward", "0/resid_post", {"R": "0/resid_pre", "M": "0/mlp_out", "A": "0/attn_out"}),
             ("forward", "1/resid_post", {"R": "2/resid_post", "M": "2/mlp_out", "A": "2/attn_out"}),
             ("forward", "0/resid_pre", {"R": "0/resid_post", "M": "0/mlp_out", "A": "0/attn_out"})]
    for direction, site, modules in cases:
        for latent in (0, 17, 127):
            step = step_scores(engine, f"{site}/{latent}", k=3, direction=direction)
            assert step.missing == {}
            for module, dst in modules.items():
                expected = numpy_top(dec, site, latent, dst, 3)
                got = [(m.feature.latent, m.score) for m in step.matches[module]]
                assert [j for j, _ in got] == [j for j, _ in expected], (direction, site, latent, module)
                np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
                assert all(str(m.feature.site) == dst for m in step.matches[module])
                assert step.scores[module] == pytest.approx(expected[0][1], abs=1e-5)


def test_attn_z_scores_use_the_w_o_projection(tiny_models, loaded, tmp_path):
    """With only an attn_z SAE at a layer, s^(A) compares with its decoder projected through W_O."""
    lm = loaded("llama")
    width = lm.n_heads * lm.d_head
    sae_dirs = []
    for i, (hook, d_in) in enumerate([("blocks.1.hook_resid_post", lm.d_model), ("blocks.1.attn.hook_z", width)]):
        build_tiny_sae("standard", d_in, 48, hook, seed=40 + i).save_model(tmp_path / f"sae{i}")
        sae_dirs.append(tmp_path / f"sae{i}")
    engine = make_engine(lm, sae_dirs, tmp_path / "cache")
    weights = load_file(str(tiny_models["llama"] / "model.safetensors"))
    w_o = weights["model.layers.1.self_attn.o_proj.weight"].astype(np.float64)  # [d_model, width]
    z_dec = load_file(str(sae_dirs[1] / "sae_weights.safetensors"))["W_dec"].astype(np.float64) @ w_o.T
    z_dec /= np.linalg.norm(z_dec, axis=1, keepdims=True)
    res = load_file(str(sae_dirs[0] / "sae_weights.safetensors"))["W_dec"].astype(np.float64)
    f = res[9] / np.linalg.norm(res[9])
    step = step_scores(engine, "1/resid_post/9", k=2)
    assert step.matches["A"][0].feature.site == Site(1, "attn_z")
    expected = np.sort(z_dec @ f)[::-1][:2]
    np.testing.assert_allclose([m.score for m in step.matches["A"]], expected, atol=1e-5)
    assert step.missing == {"R": "no SAE at 0/resid_post nor 1/resid_pre", "M": "no SAE at 1/mlp_out"}


def test_transition_tables_are_chunked_exact_and_cached_on_disk(tiny_models, tiny_packs, loaded, tmp_path):
    lm = loaded("llama")
    engine = make_engine(lm, [tiny_packs["llama"]], tmp_path)
    dec = unit_decoders(tiny_packs["llama"])
    src, dst = Site(2, "resid_post"), Site(1, "resid_post")
    cache = TransitionCache(engine.bank, tmp_path / "flow", chunk_bytes=4 * 128 * 7)  # 7 rows per chunk
    table = cache.table(src, dst)
    cos = dec["2/resid_post"] @ dec["1/resid_post"].T  # [128, 128]
    expected_idx = np.argsort(-cos, axis=1)[:, :5]
    assert table.indices.shape == (128, 5)
    np.testing.assert_array_equal(table.indices.numpy(), expected_idx)
    np.testing.assert_allclose(table.values.numpy(), np.take_along_axis(cos, expected_idx, 1), atol=1e-5)
    files = list((tmp_path / "flow").glob("*.safetensors"))
    assert [f.name for f in files] == [cache.path(src, dst, 5).name]
    assert engine.bank.digest(src)[:16] in files[0].name and files[0].name.endswith("-k5.safetensors")
    # a fresh cache finds the table on disk without building it; lookups slice it for any k <= 5
    fresh = TransitionCache(engine.bank, tmp_path / "flow")
    on_disk = fresh.cached(src, dst, 1)
    assert on_disk is not None and torch.equal(on_disk.indices, table.indices)
    assert fresh.top(src, dst, 3, 2) == table.row(3, 2)
    assert fresh.cached(dst, src) is None
    # another SAE at the same site (other weights) gets another file
    other_pack = build_tiny_pack(tiny_models["llama"], tmp_path / "other", seed=5)
    other = make_engine(lm, [other_pack], tmp_path)
    assert TransitionCache(other.bank, tmp_path / "flow").path(src, dst, 5) != cache.path(src, dst, 5)


def test_an_unwritable_table_cache_warns_once_and_keeps_tables_in_memory(tiny_packs, loaded, tmp_path):
    engine = make_engine(loaded("llama"), [tiny_packs["llama"]], tmp_path)
    dec = unit_decoders(tiny_packs["llama"])
    blocked = tmp_path / "flow"
    blocked.write_text("a file where the cache folder should be")  # mkdir fails as on a read-only disk
    cache = TransitionCache(engine.bank, blocked)
    src, dst, other = Site(2, "resid_post"), Site(1, "resid_post"), Site(0, "resid_post")
    with pytest.warns(RuntimeWarning, match=f"cannot cache transition tables in {blocked}") as caught:
        table = cache.table(src, dst)
        cache.table(src, other)
    assert len(caught) == 1 and not cache.writable
    expected = np.argsort(-(dec["2/resid_post"] @ dec["1/resid_post"].T), axis=1)[:, :5]
    np.testing.assert_array_equal(table.indices.numpy(), expected)
    assert cache.cached(src, dst) is table and blocked.read_text().startswith("a file")
    # a folder that exists but cannot take the file (here: a directory in the way of the temporary file)
    folder = tmp_path / "full"
    spare = TransitionCache(engine.bank, folder)
    spare.path(src, dst, 5).with_suffix(f".{os.getpid()}.tmp").mkdir(parents=True)
    with pytest.warns(RuntimeWarning, match="keeping them in memory"):
        assert torch.equal(spare.table(src, dst).indices, table.indices)
    assert not list(folder.glob("*.safetensors"))


# -- a planted pack: known decoder geometry -------------------------------------------------------
PLANT_SITES = [Site(0, "resid_pre")] + [Site(layer, kind) for layer in range(3)
                                        for kind in ("resid_post", "mlp_out", "attn_out")]


def build_planted_pack(out_dir: Path, d_model: int = 64, d_sae: int = 32) -> Path:
    """Decoders where 2/resid_post/5 = 0.8 * 1/resid_post/7 + 0.6 * 2/mlp_out/3, and a chain below.

    With an orthonormal basis q0..q(d-1): every unplanted row lies in span(q4..), orthogonal to the
    planted rows, so the planted cosines are the only non-zero ones:
        2/resid_post/5 = .8 q0 + .6 q1    2/mlp_out/3 = q1
        1/resid_post/7 = q0               1/resid_post/8 = .8 q0 + .6 q3
        0/resid_post/11 = .9 q0 + sqrt(.19) q2     0/mlp_out/2 = q0     0/resid_pre/4 = q2
    """
    rng = np.random.default_rng(7)
    q = np.linalg.qr(rng.normal(size=(d_model, d_model)))[0].T  # rows: orthonormal basis
    planted = {("2/resid_post", 5): .8 * q[0] + .6 * q[1], ("2/mlp_out", 3): q[1], ("1/resid_post", 7): q[0],
               ("1/resid_post", 8): .8 * q[0] + .6 * q[3], ("0/resid_post", 11): .9 * q[0] + math.sqrt(.19) * q[2],
               ("0/mlp_out", 2): q[0], ("0/resid_pre", 4): q[2]}
    saved = {}
    for i, site in enumerate(PLANT_SITES):
        rows = rng.normal(size=(d_sae, d_model - 4)) @ q[4:]
        for (name, latent), vector in planted.items():
            if name == str(site):
                rows[latent] = vector
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        sae = build_tiny_sae("standard", d_model, d_sae, site.hook_name, seed=i)
        with torch.no_grad():
            sae.W_dec.copy_(torch.tensor(rows, dtype=torch.float32))
            sae.W_enc.copy_(sae.W_dec.T)
        saved[site] = out_dir / f"{site.kind}_{site.layer}"
        sae.save_model(saved[site])
    write_pack_manifest(out_dir, "planted", "tiny-llama", saved)
    return out_dir


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return build_planted_pack(tmp_path_factory.mktemp("planted"))


def edges_of(graph: FlowGraph) -> dict[tuple[str, str], tuple[str, float]]:
    return {(e.source, e.target): (e.module, e.score) for e in graph.edges}


def test_planted_graph_finds_both_predecessors_with_scores_and_classes(planted, loaded, tmp_path):
    engine = make_engine(loaded("llama"), [planted], tmp_path)
    graph = build_flow_graph(engine, "2/resid_post/5", direction="backward")
    assert set(graph.nodes) == {"2/resid_post/5", "2/mlp_out/3", "1/resid_post/7", "0/resid_post/11", "0/mlp_out/2"}
    edges = edges_of(graph)
    assert set(edges) == {("2/mlp_out/3", "2/resid_post/5"), ("1/resid_post/7", "2/resid_post/5"),
                          ("0/resid_post/11", "1/resid_post/7"), ("0/mlp_out/2", "0/resid_post/11")}
    for key, (module, score) in {("2/mlp_out/3", "2/resid_post/5"): ("M", .6),
                                 ("1/resid_post/7", "2/resid_post/5"): ("R", .8),
                                 ("0/resid_post/11", "1/resid_post/7"): ("R", .9),
                                 ("0/mlp_out/2", "0/resid_post/11"): ("M", .9)}.items():
        assert edges[key][0] == module and edges[key][1] == pytest.approx(score, abs=1e-5)
    root = graph.nodes["2/resid_post/5"]
    assert root.scores["R"] == pytest.approx(.8, abs=1e-5) and root.scores["M"] == pytest.approx(.6, abs=1e-5)
    assert abs(root.scores["A"]) < 1e-5  # no attention feature shares a direction: below the module threshold
    assert {n: graph.nodes[n].klass for n in ("2/resid_post/5", "1/resid_post/7", "0/resid_post/11")} == {
        "2/resid_post/5": "processed", "1/resid_post/7": "translated", "0/resid_post/11": "newborn"}
    bottom = graph.nodes["0/resid_post/11"]
    assert bottom.scores["R"] == pytest.approx(math.sqrt(.19), abs=1e-5)
    assert any("backward cut" in n and "0/resid_pre/4" in n and "t^(R)=0.5" in n for n in bottom.notes)
    # a lower cut lets the chain reach the embeddings, whose node has no predecessors and no class
    low = build_flow_graph(engine, "2/resid_post/5", direction="backward", thresholds=Thresholds(cut=0.4))
    assert edges_of(low)[("0/resid_pre/4", "0/resid_post/11")][1] == pytest.approx(math.sqrt(.19), abs=1e-5)
    embed = low.nodes["0/resid_pre/4"]
    assert embed.layer == -1 and embed.klass is None
    assert embed.notes[0] == "s^(R,M,A): nothing before layer 0 (the embeddings)"


def test_planted_graph_forward_top_k_and_layered_view(planted, loaded, tmp_path):
    engine = make_engine(loaded("llama"), [planted], tmp_path)
    forward = build_flow_graph(engine, "1/resid_post/7", direction="forward", label_tokens=2)
    assert edges_of(forward)[("1/resid_post/7", "2/resid_post/5")][1] == pytest.approx(.8, abs=1e-5)
    assert ("2/mlp_out/3", "2/resid_post/5") in edges_of(forward)  # forward nodes carry their predecessors
    assert any("nothing after the last layer (2)" in n for n in forward.nodes["2/resid_post/5"].notes)
    assert all(len(n.label) == 2 for n in forward.nodes.values())
    # k = 2: both residual predecessors of the root (0.8 and 0.64), a DAG meeting again at 0/resid_post/11
    dag = build_flow_graph(engine, "2/resid_post/5", k=2, direction="both")
    edges = edges_of(dag)
    assert edges[("1/resid_post/8", "2/resid_post/5")][1] == pytest.approx(.64, abs=1e-5)
    assert edges[("0/resid_post/11", "1/resid_post/8")][1] == pytest.approx(.72, abs=1e-5)
    assert sum(n.role == "R" for n in dag.nodes.values()) == 4 and len(edges) == 6
    rows = layer_rows(dag)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    top = rows[2]["residual"][0]
    assert top["id"] == "2/resid_post/5" and [m["id"] for m in top["mlp"]] == ["2/mlp_out/3"]
    assert [f["id"] for f in top["from"]] == ["1/resid_post/7", "1/resid_post/8"] and top["attn"] == []
    assert [t["id"] for t in rows[0]["residual"][0]["to"]] == ["1/resid_post/7", "1/resid_post/8"]
    # JSON round trip and the run summary
    again = FlowGraph.from_dict(json.loads(json.dumps(dag.to_dict())))
    assert again.to_dict() == dag.to_dict()
    summary = graph_summary(dag)
    assert summary["headline"].startswith("flow graph of 2/resid_post/5: 4 residual features over layers 0..2")
    assert [row[1] for row in summary["table"]["rows"]] == ["0/resid_post/11", "1/resid_post/7", "1/resid_post/8",
                                                             "2/resid_post/5"]


def test_max_nodes_caps_the_walk(planted, loaded, tmp_path):
    engine = make_engine(loaded("llama"), [planted], tmp_path)
    graph = build_flow_graph(engine, "2/resid_post/5", k=2, direction="backward", max_nodes=2, label_tokens=0)
    assert sum(n.role == "R" for n in graph.nodes.values()) == 2
    assert graph.notes == ["stopped at 2 residual nodes (max_nodes)"]


@pytest.mark.parametrize(("scores", "expected"), [
    ({"R": .7, "M": .1, "A": .2}, "translated"), ({"R": .7, "M": .3, "A": .0}, "processed"),
    ({"R": .5, "M": .0, "A": .25}, "processed"), ({"R": .3, "M": .6, "A": .1}, "newborn"),
    ({"R": .49, "M": .24, "A": .24}, "unexplained"), ({"R": None, "M": .4, "A": None}, "newborn"),
])
def test_classes_follow_thresholds(scores, expected):
    assert classify(scores, Thresholds()) == expected


def test_per_layer_thresholds_override_and_reject_unknown_names():
    thresholds = Thresholds(per_layer={3: {"high_res": 0.8, "cut": 0.6}})
    assert thresholds.at(3).high_res == 0.8 and thresholds.at(3).cut == 0.6 and thresholds.at(4).high_res == 0.5
    assert classify({"R": .7, "M": .0, "A": .0}, thresholds.at(3)) == "unexplained"
    assert Thresholds.from_dict(json.loads(json.dumps(thresholds.to_dict()))) == thresholds
    with pytest.raises(AuditError, match="unknown threshold"):
        Thresholds(per_layer={1: {"hi": 0.2}})


def test_bad_features_and_missing_sites_are_clear(tiny_packs, loaded, tmp_path):
    lm = loaded("llama")
    pack = tiny_packs["llama"]
    engine = make_engine(lm, [pack / "resid_post_0", pack / "resid_post_1", pack / "attn_out_1"], tmp_path)
    for text, message in [("12/resid_post", "cannot read feature"), ("1/resid_post/128", "out of range"),
                          ("2/resid_post/1", "no SAE at 2/resid_post"), ("1/attn_out/3", "not a residual"),
                          ("1/bogus/3", "unknown site kind")]:
        with pytest.raises(AuditError, match=message):
            build_flow_graph(engine, text)
    graph = build_flow_graph(engine, "1/resid_post/4", thresholds=Thresholds(cut=-1.0))
    node = graph.nodes["1/resid_post/4"]
    assert node.scores["M"] is None and "s^(M): no SAE at 1/mlp_out" in node.notes
    assert any("forward walk ends: no SAE at 2/resid_post" in n for n in node.notes)
    bottom = graph.residual_nodes()[0]
    assert bottom.layer == 0 and bottom.scores == {"R": None, "M": None, "A": None} and bottom.klass is None
    assert "backward walk ends: no SAE at 0/resid_pre" in bottom.notes


def test_activation_groups_match_an_independent_pass(tiny_packs, loaded, tmp_path):
    lm = loaded("llama")
    engine = make_engine(lm, [tiny_packs["llama"]], tmp_path)
    ids = text_ids(lm, "The quick brown fox jumps over the lazy dog.")
    features = [f"{layer}/resid_post/{j}" for layer in (1, 2) for j in range(0, 128, 3)]
    records = predecessor_groups(engine, features, ids, token=-3, k=2)
    sites = [Site(layer, kind) for layer in range(3) for kind in ("resid_post", "mlp_out", "attn_out")]
    with torch.no_grad(), SiteHooks(lm.model, reads=sites) as hooks:
        lm.model(torch.tensor([ids]))  # the whole text: later tokens must not matter
    pos = len(ids) - 3
    codes = {str(s): engine.bank.sae(s).encode(hooks.acts[s][0, pos]).detach() for s in sites}

    def act(name: str) -> float:
        site, latent = name.rsplit("/", 1)
        return float(codes[site][int(latent)])
    names = {"R": "RES", "M": "MLP", "A": "ATT"}
    seen = set()
    for record in records:
        assert record["activation"] == pytest.approx(act(record["feature"]), abs=1e-4)
        active = [m for m, preds in record["predecessors"].items() if any(act(p["feature"]) > 0 for p in preds)]
        assert len(record["predecessors"]["R"]) == 2
        if act(record["feature"]) > 0:
            expected = "From " + (" & ".join(names[m] for m in active) if active else "nowhere")
            assert record["group"] == expected
            seen.add(expected)
        else:
            assert record["group"] is None
    assert seen, "no feature was active at that token; the test would be vacuous"


def test_exports_and_stored_run(planted, loaded, tmp_path):
    engine = make_engine(loaded("llama"), [planted], tmp_path)
    graph = build_flow_graph(engine, "2/resid_post/5", k=2)
    dot = to_dot(graph)
    assert dot.startswith('digraph "flow 2/resid_post/5" {') and dot.rstrip().endswith("}")
    for node in graph.nodes:
        assert f'"{node}" [shape=' in dot
    for edge in graph.edges:
        assert f'"{edge.source}" -> "{edge.target}" [label="{edge.score:.2f}"];' in dot
    mermaid = to_mermaid(graph)
    assert mermaid.startswith("flowchart TB\n")
    assert mermaid.count(" -->|") == len(graph.edges) and all(node in mermaid for node in graph.nodes)
    store = Store(tmp_path / "s.db")
    session = store.create_session("flow")
    run_id = record_flow(store, engine, session, graph)
    run = store.run(run_id)
    assert run["kind"] == "flow" and run["status"] == "done" and run["params"]["root"] == "2/resid_post/5"
    assert run["params"]["model"] == "tiny-llama" and run["params"]["pack"] == "planted"
    assert FlowGraph.from_dict(run["result"]).to_dict() == graph.to_dict()
    assert run["summary"]["table"]["columns"][:3] == ["layer", "residual", "class"]


@pytest.mark.slow
def test_smollm2_demo_pack_graph_matches_numpy(smollm2, smollm2_cache, tmp_path):
    """On the real model: the demo pack when it is built, else random SAEs on layers 12-14."""
    from auditui.config import load_settings as settings_for
    from auditui.engine.saes import resolve_pack_dir

    try:
        pack = resolve_pack_dir("demo", settings_for().cache_path)
    except AuditError:
        sites = [Site(layer, kind) for layer in (12, 13, 14) for kind in ("resid_post", "mlp_out", "attn_out")]
        pack = build_tiny_pack(Path(smollm2.source), tmp_path / "pack", d_sae=1024, sites=sites)
    engine = make_engine(smollm2, [pack], tmp_path)
    dec = unit_decoders(pack)
    s_r = (dec["14/resid_post"] @ dec["13/resid_post"].T).max(axis=1)  # [d_sae]
    root = int(np.argmax(s_r))
    graph = build_flow_graph(engine, f"14/resid_post/{root}", direction="backward", label_tokens=3)
    node = graph.nodes[f"14/resid_post/{root}"]
    assert math.isclose(node.scores["R"], float(s_r[root]), abs_tol=1e-5)
    for module, site in (("M", "14/mlp_out"), ("A", "14/attn_out")):
        assert math.isclose(node.scores[module], float((dec[site] @ dec["14/resid_post"][root]).max()), abs_tol=1e-5)
    if s_r[root] >= 0.5:
        previous = int(np.argmax(dec["13/resid_post"] @ dec["14/resid_post"][root]))
        assert f"13/resid_post/{previous}" in graph.nodes and node.label
