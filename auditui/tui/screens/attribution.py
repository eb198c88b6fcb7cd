"""Attribution: rank SAE latents by Δ-attribution over the session's labelled pairs (seed 003).

The table shows the latest attribution run of the session (so it is there again tomorrow): rank,
site, latent, Δ-attribution with a bar, Δ-activation and its rank, the exact mean-ablation ΔL once
checked, and logit-lens tokens. `c` checks the selected latent exactly, `v` shows where it fires in
the session's texts (per-token activation highlighting), `f` sends it to the flow screen, `s` adds
it to the steering set.

`o` switches the tail shown: the top latents by signed Δ-attribution (pushing toward the positive
label; the rows the run stored), the most negative ones (pushing toward the negative label) or the
largest |Δ-attribution| with its sign. The other tails come from the run's full Δ vectors (its
"deltas" blob), top_k per site as the run was asked; their logit lens needs the run's SAEs loaded.

`m` switches the baseline column between the within-model Δ-activation (positive minus negative
completions) and the model-diffing Δ-activation (audited minus the session's reference model) of the
run's newest model-diffing child run; with none yet and a reference model named, it computes one.

`d` adds the dictionary-free baseline (issue 18): the difference-of-means direction of each site
(`auditui contrast`) as a pseudo-latent row "Δμ", ranked in the shown tail among the run's latents
by the same Δ-attribution. A contrast run of the session with the same positions and reference is
shown whenever one exists; the CLI steers it (`contrast --export DIR`, then `steer --pack DIR`).
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding

from auditui.errors import AuditError
from auditui.tui.guard import guarded
from auditui.tui.screens.base import StepScreen
from auditui.tui.widgets.params import parse_number
from auditui.tui.widgets.summary import summary_text
from auditui.tui.widgets.tokens import heat

BAR = 10
TAILS = {"positive": "top +Δ", "negative": "top -Δ", "magnitude": "top |Δ|"}
BASELINES = {"within": ("Δ-act", "act#", "delta_act", "act_rank"),  # header, rank header, row keys
             "models": ("Δ-act models", "diff#", "delta_diff", "diff_rank")}


def tail_latents(attr, k: int, tail: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The k latents of a Δ-attribution vector in `tail`: largest, most negative, or largest |Δ|."""
    key = {"positive": attr, "negative": -attr, "magnitude": attr.abs()}[tail]
    return key.topk(min(k, key.shape[0])).indices.tolist()


def tail_rows(store, run: dict, tail: str, engine=None) -> list[dict]:  # type: ignore[no-untyped-def]
    """Result rows of an attribution run's `tail` from its full Δ vectors, the run's exact checks merged;
    labelled by logit lens when `engine` holds the SAE the run used for a site (on the engine thread)."""
    from auditui.engine.attribution import descending_ranks, ranked_rows
    from auditui.engine.diffing import annotate_attribution
    from auditui.engine.sites import Site
    from auditui.workflows.attribute import run_deltas
    from auditui.workflows.diffing import diff_deltas

    deltas, params = run_deltas(store, run["id"]), run["params"]
    exact = {(r["site"], r["latent"]): r["exact"] for r in run["result"]["rows"]}
    rows = []
    for name in params["sites"]:
        site, attr, act = Site.parse(name), deltas[f"{name}|attr"], deltas[f"{name}|act"]
        latents = tail_latents(attr, run["result"]["sites"][name]["top_k"], tail)
        if engine is not None and site in engine.bank and engine.bank.digest(site) == params["saes"].get(name):
            rows += ranked_rows(engine, site, attr, act, latents)
            continue
        attr_ranks, act_ranks = descending_ranks(attr), descending_ranks(act)
        rows += [{"site": name, "latent": i, "rank": int(attr_ranks[i]), "delta_attr": float(attr[i]),
                  "delta_act": float(act[i]), "act_rank": int(act_ranks[i]), "logit_lens": []} for i in latents]
    rows = [{**row, "exact": exact.get((row["site"], row["latent"]))} for row in rows]
    if run["result"].get("diff_run") is not None:  # the model-diffing column, as attribution_with_diff adds it
        sites = {name: dict(info) for name, info in run["result"]["sites"].items()}
        annotate_attribution({"sites": sites, "rows": rows, "notes": []}, diff_deltas(store, run["result"]["diff_run"]),
                             run["result"]["diff_run"])
    return rows


PSEUDO = "Δμ"
TAIL_KEYS = {"positive": lambda x: x, "negative": lambda x: -x, "magnitude": abs}


def contrast_rows(store, run: dict, tail: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """Each site's difference-of-means direction as a pseudo-latent row, from the session's newest contrast
    run with the run's model, positions and reference; its rank in `tail` among the run's full Δ vector."""
    from auditui.workflows.attribute import run_deltas
    from auditui.workflows.contrast import CONTRAST_KIND

    params = run["params"]
    matching = [c for c in store.runs(run["session_id"], CONTRAST_KIND) if c["status"] == "done"
                and (c["params"]["positions"], c["params"]["reference"], c["params"]["model_id"])
                == (params["positions"], params["reference"], params["model_id"])]
    if not matching:
        return []
    newest, deltas, key = matching[-1], run_deltas(store, run["id"]), TAIL_KEYS[tail]
    rows = []
    for name in params["sites"]:
        info = newest["result"]["sites"].get(name)
        if info is not None:
            rank = 1 + int((key(deltas[f"{name}|attr"]) > key(info["delta_attr"])).sum())
            rows.append({"site": name, "latent": PSEUDO, "pseudo": True, "rank": rank, "delta_attr": info["delta_attr"],
                         "delta_act": None, "act_rank": None, "exact": None, "logit_lens": info["logit_lens"],
                         "contrast_run": newest["id"], "norm": info["norm"], "nearest_latent": info["nearest_latent"],
                         "nearest_cosine": info["nearest_cosine"]})
    return rows


def with_pseudo(rows: list[dict], pseudo: list[dict]) -> list[dict]:
    """`rows` with each pseudo row in its site's block, after the rows it outranks... before those it does not."""
    out = list(rows)
    for extra in pseudo:
        block = [i for i, row in enumerate(out) if row["site"] == extra["site"]]
        above = [i for i in block if out[i]["rank"] < extra["rank"]]
        out.insert(above[-1] + 1 if above else (block[0] if block else len(out)), extra)
    return out


def bar(value: float, largest: float) -> Text:
    """A bar of up to BAR cells for |value| / largest; positive and negative in their own colours."""
    cells = round(BAR * abs(value) / largest) if largest > 0 else 0
    return Text("█" * cells, style="green" if value >= 0 else "red")


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3g}"


class AttributionScreen(StepScreen):
    NEEDS_SAES = True
    HELP = ("Δ-attribution: for each completion, δ_i = -(g·d_i)((a-ā)·d_i) averaged over the chosen "
            "positions, positive minus negative per prompt, averaged over prompts. Δ-act: the SAE "
            "activation difference over completion tokens. exact: the real ΔL of mean-ablating the latent.")
    TERMS = (("#", "the latent's rank by Δ-attribution at its site (ranks restart per site)"),
             ("Δ-attr", "mean over prompts of (positive minus negative) attribution: > 0 pushes toward the positive label"),
             ("Δ-act", "the SAE activation difference, positive minus negative completions"),
             ("act#", "the latent's rank by Δ-act at its site (compare with # : the two baselines agree when close)"),
             ("Δ-act models", "m: model diffing, the mean SAE activation in the audited minus the session's reference "
                              "model over the same tokens (a second baseline; diff# its rank)"),
             ("exact", "the real change of the loss when the latent is mean-ablated (c checks it)"),
             ("tail", "o: top +Δ (toward the positive label), top -Δ (toward the negative; steer away) or top |Δ|"),
             ("Δμ", "d: the difference-of-means direction (positive minus negative mean activation, made unit), "
                    "a dictionary-free baseline ranked among the latents by the same Δ-attribution"),
             ("positions", "prompt, completion or all: the tokens the attribution averages over"))
    BINDINGS = [
        Binding("ctrl+r", "run", "Run"),
        Binding("c", "check", "Check exact"),
        Binding("v", "view", "Where it fires"),
        Binding("l", "latent", "Latent page"),
        Binding("f", "flow", "Flow"),
        Binding("s", "steer", "Steer set +"),
        Binding("t", "steering", "Steer top 10"),
        Binding("o", "tail", "Tail +/-/|Δ|"),
        Binding("m", "baseline", "Baseline within/models"),
        Binding("d", "contrast", "Δμ direction"),
        Binding("b", "back", "Back"),
    ]

    TABLE_ID = "ranked"

    def __init__(self, session_id: int, run_id: int | None = None):
        """`run_id`: the run to show on opening (the run history); None: the session's latest."""
        super().__init__(session_id)
        self.run: dict | None = None
        self.tail = "positive"
        self.baseline = "within"
        self.opening = run_id

    def params(self) -> list[tuple]:
        return [("sites", self.default_sites(), 22), ("top", "100", 4, "integer"), ("check", "0", 3, "integer"),
                ("positions", "prompt", 10)]

    def default_sites(self) -> str:
        """The residual site nearest the middle of the model that has an SAE."""
        engine = self.app.jobs.state.get("engine")  # type: ignore[attr-defined]
        if engine is None or not len(engine.bank):
            return ""
        residual = [s for s in engine.bank.sites if s.kind == "resid_post"] or engine.bank.sites
        middle = min(residual, key=lambda s: abs(s.layer - engine.lm.n_layers // 2))
        return str(middle)

    @guarded
    def on_mount(self) -> None:
        self.title = "attribution"
        self.add_columns()
        runs = [r for r in self.store.runs(self.session_id, "attribution") if r["result"]]  # done or partial
        runs = [r for r in runs if r["id"] == self.opening] if self.opening is not None else runs
        if runs:
            self.show_run(runs[-1]["id"])
            params = runs[-1]["params"]  # the controls describe the run the table shows
            self.set_params({"sites": " ".join(params["sites"]), "top": str(params["top_k"]),
                             "check": str(params["check"]), "positions": params["positions"]})
        self.show_damaged()

    def add_columns(self) -> None:
        header, rank, *_ = BASELINES[self.baseline]
        self.table.add_columns("#", "site", "latent", "Δ-attr", "", header, rank, "exact", "tokens")

    # -- running -------------------------------------------------------------------------------
    def request(self):  # type: ignore[no-untyped-def]
        from auditui.engine.sites import Site
        from auditui.workflows.attribute import AttributeRequest

        value = self.param_values()
        sites = tuple(Site.parse(part) for part in value["sites"].replace(",", " ").split())
        if not sites:
            raise AuditError("give at least one site, e.g. 12/resid_post")
        request = AttributeRequest(sites=sites, top_k=int(parse_number(value["top"], int, "top", 1, 100000)),
                                   check=int(parse_number(value["check"], int, "check", 0, 1000)),
                                   positions=value["positions"])
        request.validate()
        return request

    @guarded
    def action_run(self) -> None:
        req = self.request()
        store, session_id = self.store, self.session_id
        known = max((r["id"] for r in store.runs(session_id, "attribution")), default=0)

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.attribute import attribute

            return attribute(store, self.engine(ctx), session_id, req, ctx)

        def stopped(_error: str) -> None:  # a cancelled or failed run is shown as what the store holds
            new = [r["id"] for r in store.runs(session_id, "attribution") if r["id"] > known]
            if new:
                self.show_run(new[-1])

        self.submit("attribution", job, on_done=self.show_run, on_error=stopped,
                    stages=("reference mean", "attribution", "exact check")[:3 if req.check else 2])

    def on_input_submitted(self) -> None:
        self.action_run()

    @guarded
    def show_run(self, run_id: int) -> None:
        """The run with its exact checks; its status in the title when it is not done."""
        from auditui.workflows.diffing import attribution_with_diff

        run = attribution_with_diff(self.store, run_id)
        self.run = run if run["result"] else None
        if self.run is None:
            self.rows = []
            self.table.clear()
            self.title = f"attribution · run {run_id} · {run['status']}"
            self.show_detail(Text(f"run {run_id} {run['status']}: {run['error'] or 'no result'}"))
        elif self.tail == "positive":
            self.show_rows(run["result"]["rows"])
        else:
            store, tail = self.store, self.tail
            engine = self.app.jobs.state.get("engine")  # type: ignore[attr-defined]
            if engine is None:  # no model (yet): the tail without logit lens, read here
                self.show_rows(tail_rows(store, run, tail))
            else:
                self.submit(f"attribution {TAILS[tail]}", lambda ctx: tail_rows(store, run, tail, self.engine(ctx)),
                            on_done=self.show_rows)

    def show_rows(self, rows: list[dict]) -> None:
        """Rows of the shown run (`self.run`) in the table, the cursor kept where it was."""
        run = self.run
        if run is None:
            return
        status = "" if run["status"] == "done" else f" · {run['status']}"
        if run["result"].get("diff_run") is None:
            self.baseline = "within"  # this run has no model-diffing column
        self.rows = with_pseudo(rows, contrast_rows(self.store, run, self.tail))
        largest = max((abs(r["delta_attr"]) for r in self.rows), default=0.0)
        table = self.table
        row_index = table.cursor_row
        table.clear(columns=True)
        self.add_columns()
        *_, value, rank = BASELINES[self.baseline]
        for row in self.rows:
            table.add_row(str(row["rank"]), row["site"], str(row["latent"]), number(row["delta_attr"]),
                          bar(row["delta_attr"], largest), number(row.get(value)), str(row.get(rank) or "-"),
                          number(row["exact"]), Text(" ".join(repr(t)[1:-1] for t in row["logit_lens"][:4])),
                          key=f"{row['site']}/{row['latent']}")
        models = " · Δ-act models" if self.baseline == "models" else ""
        self.title = (f"attribution · run {run['id']} · {run['result']['n_prompts']} prompts · {TAILS[self.tail]}"
                      f"{models}{status}")
        self.show_detail(summary_text(run["summary"]))
        if table.row_count:
            table.move_cursor(row=min(row_index, table.row_count - 1))
            table.focus()

    def action_tail(self) -> None:
        names = list(TAILS)
        self.tail = names[(names.index(self.tail) + 1) % len(names)]
        if self.run is not None:
            self.show_run(self.run["id"])

    @guarded
    def action_baseline(self) -> None:
        """Switch the baseline column; the model-diffing one is computed first when the run has none yet."""
        run = self.run
        if run is None:
            return
        if self.baseline == "models" or run["result"].get("diff_run") is not None:
            self.baseline = "within" if self.baseline == "models" else "models"
            self.show_rows(self.rows)
            return
        spec = self.store.session(self.session_id)["reference_model"]
        if not spec:
            raise AuditError(f"run {run['id']} has no model-diffing Δ-activation and the session names no reference "
                             f"model; set one with: auditui session reference {self.session_id} MODEL")
        store, session_id, settings = self.store, self.session_id, self.app.settings  # type: ignore[attr-defined]

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.engine.sites import Site
            from auditui.workflows.diffing import DiffRequest, diff_activation, load_reference

            engine = self.engine(ctx)
            if ctx.state.get("reference", ("",))[0] != spec:  # loaded once, kept beside the audited model
                ctx.state.pop("reference", None)
                ctx.state["reference"] = (spec, load_reference(settings, spec, engine.lm, ctx))
            request = DiffRequest(sites=tuple(Site.parse(s) for s in run["params"]["sites"]), top_k=run["params"]["top_k"],
                                  batch_size=run["params"].get("batch_size", 8))
            diff_activation(store, engine, ctx.state["reference"][1], session_id, request, ctx, attribution_run=run["id"])
            return run["id"]

        def done(run_id: int) -> None:
            self.baseline = "models"
            self.show_run(run_id)

        self.submit("model diffing", job, on_done=done, stages=("loading", "model diffing"))

    @guarded
    def action_contrast(self) -> None:
        """Compute the difference-of-means direction of the shown run's sites (same positions and reference)."""
        run = self.run
        if run is None:
            return
        from auditui.engine.sites import Site
        from auditui.workflows.contrast import ContrastRequest

        params, store, session_id = run["params"], self.store, self.session_id
        request = ContrastRequest(sites=tuple(Site.parse(s) for s in params["sites"]), positions=params["positions"],
                                  reference=None if params["reference"] == "session" else params["reference"],
                                  batch_size=params.get("batch_size", 8))

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.contrast import contrast

            contrast(store, self.engine(ctx), session_id, request, ctx)
            return run["id"]

        self.submit("difference of means", job, on_done=self.show_run, stages=("reference mean", "contrast"))

    def latent_row(self) -> dict | None:
        """The selected row when it is an SAE latent (the Δμ row is not: say how to use it instead)."""
        row = self.current()
        if row is not None and row.get("pseudo"):
            self.notify(f"{PSEUDO} is the difference-of-means direction, not an SAE latent; steer it with: auditui contrast "
                        f"--session {self.session_id} --export DIR, then auditui steer --pack DIR ({row['site']}/0)",
                        timeout=10, markup=False)
            return None
        return row

    def on_data_table_row_highlighted(self) -> None:
        row = self.current()
        if row is not None and row.get("pseudo"):
            text = Text(f"{row['site']} difference of means ({PSEUDO}, contrast run {row['contrast_run']})  ", style="bold")
            nearest = ("" if row["nearest_latent"] is None
                       else f" · nearest latent {row['nearest_latent']} (cos {row['nearest_cosine']:.2f})")
            text.append(f"Δ-attr {number(row['delta_attr'])} (rank {row['rank']} in {TAILS[self.tail]}) · ‖v‖ "
                        f"{row['norm']:.3g}{nearest}\n")
            text.append("logit lens: " + " ".join(repr(t)[1:-1] for t in row["logit_lens"]))
            self.show_detail(text)
        elif row is not None:
            text = Text(f"{row['site']}/{row['latent']}  ", style="bold")
            models = (f" · Δ-act models {number(row['delta_diff'])} (rank {row['diff_rank']})"
                      if "delta_diff" in row else "")
            text.append(f"Δ-attr {number(row['delta_attr'])} · Δ-act {number(row['delta_act'])} "
                        f"(rank {row['act_rank']}){models} · exact {number(row['exact'])}\n")
            text.append("logit lens: " + " ".join(repr(t)[1:-1] for t in row["logit_lens"]))
            self.show_detail(text)

    # -- actions on the selected latent --------------------------------------------------------
    @guarded
    def action_check(self) -> None:
        row = self.latent_row()
        if row is None or self.run is None:
            return
        store, run_id, target = self.store, self.run["id"], (row["site"], row["latent"])

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.attribute import check_latents

            check_latents(store, self.engine(ctx), run_id, [target], progress=ctx)
            return run_id

        self.submit(f"exact check {target[0]}/{target[1]}", job, on_done=self.show_run,
                    on_error=lambda _error: self.show_run(run_id))

    @guarded
    def action_view(self) -> None:
        row = self.latent_row()
        if row is None:
            return
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.snippets import session_snippets

            return session_snippets(store, self.engine(ctx), session_id, row["site"], row["latent"], progress=ctx)

        label = f"{row['site']}/{row['latent']}"
        self.submit(f"snippets {label}", job, on_done=lambda snippets: self.show_snippets(label, snippets))

    def show_snippets(self, label: str, snippets: list[dict]) -> None:
        text = Text(f"where {label} fires in this session ({len(snippets)} texts)\n", style="bold")
        for snippet in snippets:
            text.append(f"#{snippet['completion_id']} max {snippet['max']:.3g}: ", style="dim")
            text.append_text(heat(self.app, snippet["tokens"], snippet["activations"], snippet["max"]))
            text.append("\n")
        if not snippets:
            text.append("it is not active on any of the session's texts")
        self.show_detail(text)

    def action_flow(self) -> None:
        row = self.latent_row()
        if row is None:
            return
        from auditui.tui.screens.flow import FlowScreen

        self.app.push_screen(FlowScreen(self.session_id, f"{row['site']}/{row['latent']}"))

    def action_steering(self) -> None:
        """The Steering screen on this run's top 10 latents, steered away (rescale r = 0)."""
        if self.run is None:
            return
        from auditui.tui.screens.steering import SteeringScreen
        from auditui.workflows.steer import PlanSource

        self.app.push_screen(SteeringScreen(self.session_id, PlanSource(attribution_run=self.run["id"]),
                                            op="rescale", coefficient="0"))

    @guarded
    def action_steer(self) -> None:
        row = self.latent_row()
        if row is not None:
            digest = (self.run or {}).get("params", {}).get("saes", {}).get(row["site"], "")
            self.store.add_feature(self.session_id, row["site"], row["latent"], source="attribution",
                                   sae_digest=digest)
            self.notify(f"{row['site']}/{row['latent']} added to the steering set", timeout=3)

    def action_latent(self) -> None:
        row = self.latent_row()
        if row is not None:
            from auditui.tui.screens.latent import open_latent

            open_latent(self, self.session_id, f"{row['site']}/{row['latent']}")
