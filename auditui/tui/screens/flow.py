"""Flow: trace a residual feature across layers (seed 001) and walk its graph layer by layer.

One row per residual node of the graph (ascending layers); the pane below shows the current node's
s^(R), s^(M), s^(A), class, logit-lens tokens and its MLP/attention predecessors. Enter re-roots the
graph on the current node, `[` and `]` go back and forward through the graphs shown (stored runs, not
rebuilt), `d` switches backward/forward/both, `x` runs the deactivation test on it, `l` opens its
latent page, `s` adds it to the session's steering set, `e` exports DOT and Mermaid next to the database.

Reopened without a feature the screen shows the session's latest flow graph; given a feature it builds
with the k, direction and thresholds of that latest run (the fields remember them).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input, Label

from auditui.errors import AuditError
from auditui.text import visible
from auditui.tui.guard import guarded
from auditui.tui.screens.base import StepScreen
from auditui.tui.screens.dialogs import AskForm
from auditui.tui.widgets.params import parse_number
from auditui.tui.widgets.summary import summary_text

DIRECTIONS = ("both", "backward", "forward")


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def tokens(label: list[str] | None, n: int = 4) -> str:
    return " ".join(repr(tok)[1:-1] for tok in (label or [])[:n])


class FlowScreen(StepScreen):
    NEEDS_SAES = True
    HELP = ("Rows are the residual nodes of the flow graph, layer by layer; the pane lists the current node's "
            "predecessors. Every graph is saved as a run; [ and ] walk back and forward through those shown here.")
    TERMS = (("s^R, s^M, s^A", "the best decoder cosine of the node with a latent of the residual SAE one layer "
                               "back (R), the MLP-out (M) and attention-out (A) SAEs of its layer"),
             ("translated", "carried over from the previous residual (s^R high, s^M and s^A low)"),
             ("processed", "carried over and changed by the MLP or attention (s^R high and s^M or s^A high)"),
             ("newborn", "made by the MLP or attention at this layer (s^R low, s^M or s^A high)"),
             ("unexplained", "every score low: no SAE latent explains where it comes from"),
             ("t_R", "the cut: a chain of residual nodes stops where s^R < t_R (0.5, appendix B)"),
             ("t_M", "MLP and attention predecessors scoring below t_M are dropped (0.15)"),
             ("k", "matches kept per step (1: the paper's top-1 matching; more makes a DAG)"),
             ("r", "deactivation test (x): the predecessor's activation is multiplied by r (0 removes it)"))
    BINDINGS = [
        Binding("enter", "reroot", "Re-root", show=False),
        Binding("ctrl+r", "build", "Build"),
        Binding("left_square_bracket", "history(-1)", "Previous graph", key_display="[", show=False),
        Binding("right_square_bracket", "history(1)", "Next graph", key_display="]", show=False),
        Binding("l", "latent", "Latent page"),
        Binding("d", "direction", "Direction"),
        Binding("x", "deactivate", "Deactivate"),
        Binding("s", "steer", "Steer set +"),
        Binding("t", "steering", "Steer graph"),
        Binding("e", "export", "Export"),
        Binding("b", "back", "Back"),
    ]

    TABLE_ID = "layers"

    def __init__(self, session_id: int, feature: str = "", run_id: int | None = None):
        """`feature`: build its graph on opening; `run_id`: show that stored flow run instead (run history)."""
        super().__init__(session_id)
        self.feature = feature
        self.graph: dict | None = None
        self.graph_run: int | None = None  # the stored run of the shown graph
        self.run_id = run_id
        self.history: list[int] = []  # flow runs shown here, in order; `[` and `]` move through them
        self.at = -1

    def params(self) -> list[tuple]:
        return [("feature", self.feature, 20), ("k", "1", 2, "integer"), ("dir", "both", 8), ("t_R", "0.5", 4, "number"),
                ("t_M", "0.15", 4, "number")]

    def on_mount(self) -> None:
        self.title = "flow"
        self.table.add_columns("layer", "feature", "class", "s^R", "s^M", "s^A", "tokens")
        runs = [r for r in self.store.runs(self.session_id, "flow") if r["result"]]
        if self.run_id is not None:
            self.show_stored(self.run_id)
        elif self.feature:
            if runs:  # the latest run's k, direction and thresholds
                self.set_params({**self.stored_fields(runs[-1]["params"]), "feature": self.feature})
            self.action_build()
        elif runs:
            self.show_stored(runs[-1]["id"])
        else:
            self.query_one("#param-feature").focus()

    # -- building ------------------------------------------------------------------------------
    def request(self):  # type: ignore[no-untyped-def]
        from auditui.workflows.flow import FlowRequest

        value = self.param_values()
        if not value["feature"]:
            raise AuditError("type a feature as LAYER/KIND/INDEX, e.g. 12/resid_post/1234")
        if value["dir"] not in DIRECTIONS:
            raise AuditError(f"dir must be one of {', '.join(DIRECTIONS)}")
        return FlowRequest(value["feature"], k=int(parse_number(value["k"], int, "k", 1, 16)), direction=value["dir"],
                           t_res=float(parse_number(value["t_R"], float, "t_R", -1, 1)),
                           t_module=float(parse_number(value["t_M"], float, "t_M", -1, 1)))

    def on_input_submitted(self) -> None:
        self.action_build()

    @staticmethod
    def stored_fields(params: dict) -> dict[str, str]:
        """The fields that built a stored flow run."""
        return {"feature": params["root"], "k": str(params["k"]), "dir": params["direction"],
                "t_R": f"{params['thresholds']['cut']:g}", "t_M": f"{params['thresholds']['module']:g}"}

    @guarded
    def show_stored(self, run_id: int, visit: bool = True) -> None:
        """A stored flow run's graph, the fields set to what built it; `visit`: a new step in the history."""
        from auditui.engine.flow import FlowGraph, layer_rows

        run = self.store.run(run_id)
        if run["kind"] != "flow" or not run["result"]:
            raise AuditError(f"run {run_id} is not a stored flow graph")
        self.set_params(self.stored_fields(run["params"]))
        self.show_graph((run["result"], layer_rows(FlowGraph.from_dict(run["result"])), run_id), visit)

    def action_history(self, step: int) -> None:
        """`[` / `]`: the previous / next graph shown here (as stored, the fields set to what built it)."""
        if 0 <= self.at + step < len(self.history):
            self.at += step
            self.show_stored(self.history[self.at], visit=False)
        else:
            self.notify(f"no {'earlier' if step < 0 else 'later'} graph in this screen's history", timeout=2)

    @guarded
    def action_build(self) -> None:
        req = self.request()
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.engine.flow import layer_rows
            from auditui.workflows.flow import flow_graph, record_flow

            engine = self.engine(ctx)
            graph = flow_graph(engine, req)
            run_id = record_flow(store, engine, session_id, graph)
            return graph.to_dict(), layer_rows(graph), run_id

        self.submit(f"flow {req.feature}", job, on_done=self.show_graph)

    def show_graph(self, result: tuple[dict, list[dict], int], visit: bool = True) -> None:
        self.graph, layers, self.graph_run = result
        if visit and self.graph_run not in self.history[self.at:self.at + 1]:
            del self.history[self.at + 1:]  # a new graph after going back drops the later ones
            self.history.append(self.graph_run)
            self.at = len(self.history) - 1
        self.rows = [node for layer in layers for node in layer["residual"]]
        table = self.table
        table.clear()
        for node in self.rows:
            scores = node.get("scores") or {}
            table.add_row(str(node["layer"]), node["id"], node.get("class") or "-", score(scores.get("R")),
                          score(scores.get("M")), score(scores.get("A")), Text(tokens(node.get("label"))),
                          key=node["id"])
        root = self.graph["root"]
        steps = f" · {self.at + 1}/{len(self.history)}" if len(self.history) > 1 else ""
        self.title = f"flow · {root} · {len(self.rows)} residual nodes · run {self.graph_run}{steps}"
        if root in table.rows:
            table.move_cursor(row=table.get_row_index(root))
        table.focus()

    def on_data_table_row_highlighted(self) -> None:
        node = self.current()
        if node is not None:
            self.show_detail(node_detail(node))

    # -- actions -------------------------------------------------------------------------------
    def on_data_table_row_selected(self) -> None:
        self.action_reroot()

    def action_reroot(self) -> None:
        node = self.current()
        if node is not None:
            self.query_one("#param-feature").value = node["id"]
            self.action_build()

    def action_direction(self) -> None:
        field = self.query_one("#param-dir")
        field.value = DIRECTIONS[(DIRECTIONS.index(field.value) + 1) % 3] if field.value in DIRECTIONS else "both"
        self.action_build()

    def action_steering(self) -> None:
        """The Steering screen on the shown graph (appendix-B cuts)."""
        if self.graph_run is None:
            return
        from auditui.tui.screens.steering import SteeringScreen
        from auditui.workflows.steer import PlanSource

        self.app.push_screen(SteeringScreen(self.session_id, PlanSource(flow_run=self.graph_run)))

    @guarded
    def action_steer(self) -> None:
        node = self.current()
        if node is not None:
            self.store.add_feature(self.session_id, node["site"], node["latent"], source="flow")
            self.notify(f"{node['id']} added to the steering set", timeout=3)

    def action_latent(self) -> None:
        node = self.current()
        if node is not None:
            from auditui.tui.screens.latent import open_latent

            open_latent(self, self.session_id, node["id"])

    @guarded
    def action_export(self) -> None:
        if self.graph is None:
            return
        from auditui.engine.flow import FlowGraph, to_dot, to_mermaid

        graph = FlowGraph.from_dict(self.graph)
        stem = self.store.path.with_name(f"{self.store.path.stem}-flow-{self.graph['root'].replace('/', '-')}")
        stem.with_suffix(".dot").write_text(to_dot(graph), encoding="utf-8")
        stem.with_suffix(".mmd").write_text(to_mermaid(graph), encoding="utf-8")
        self.notify(f"wrote {stem.name}.dot and .mmd", markup=False)

    @guarded
    def action_deactivate(self) -> None:
        """Find where the node fires in the session's texts, then ask (DeactivateForm) what to test."""
        node = self.current()
        if node is None:
            return
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            return session_texts(store, self.engine(ctx), session_id, node["site"], node["latent"], ctx)

        def ask(texts: list[dict]) -> None:
            self.app.push_screen(DeactivateForm(node["id"], texts), lambda answer: self._deactivate(node["id"], answer))

        self.submit(f"where {node['id']} fires", job, on_done=ask)

    @guarded
    def _deactivate(self, feature: str, answer: dict[str, str] | None) -> None:
        if not answer:
            return
        from auditui.workflows.flow import DeactivateRequest

        values = list(answer.values())
        if values[3].strip().lower() not in ("y", "n", "yes", "no"):
            raise AuditError("chat template: answer y or n")
        req = DeactivateRequest(feature, values[0], token=int(parse_number(values[1], int, "token", -10**6, 10**6)),
                                r=float(parse_number(values[2], float, "r", -100, 100)),
                                chat=values[3].strip().lower().startswith("y"))
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.engine.deactivation import deactivation_summary
            from auditui.workflows.flow import deactivate, record_deactivation

            engine = self.engine(ctx)
            result = deactivate(engine, req)
            record_deactivation(store, engine, session_id, req, result)
            return deactivation_summary(result)

        self.submit(f"deactivate {feature}", job, on_done=lambda summary: self.show_detail(summary_text(summary)))


def session_texts(store: Any, engine: Any, session_id: int, site: str, latent: int, progress: Any) -> list[dict]:
    """On the engine thread: the session's texts as the model read them (chat template, prompt and
    completion) as raw text, each with its token where the latent fires most; strongest first, the texts
    where it never fires last (token -1). The token counts in the text as the deactivation test reads it."""
    from auditui.engine.flow import text_ids
    from auditui.engine.labels import top_snippets
    from auditui.engine.reference import TokenSeq
    from auditui.engine.sites import Site
    from auditui.workflows.reference import session_sequences

    tokenizer = engine.lm.tokenizer
    added = tokenizer("", add_special_tokens=True)["input_ids"]  # what encoding puts in front (a BOS): not twice

    def raw(ids: list[int]) -> str:
        return tokenizer.decode(ids[len(added):] if ids[:len(added)] == added else ids)

    texts = [raw(list(seq.ids)) for seq in session_sequences(store, session_id)]
    seqs = [TokenSeq(tuple(text_ids(engine.lm, text)), n_prompt=0, completion_id=i) for i, text in enumerate(texts)]
    found = top_snippets(engine, seqs, Site.parse(site), latent, k=len(seqs), before=20, after=4, progress=progress)
    rows = [{"text": texts[s["completion_id"]], "max": s["max"], "token": s["position"], "tokens": s["tokens"],
             "at": s["position"] - s["start"]} for s in found]  # completion_id: the index into texts
    fired = {s["completion_id"] for s in found}
    return rows + [{"text": text, "max": 0.0, "token": -1, "tokens": [text[-60:]], "at": -1}
                   for i, text in enumerate(texts) if i not in fired]


class DeactivateForm(AskForm):
    """The deactivation test's fields over the session's texts (`session_texts`): the highlighted text is
    tested (in its chat context, as raw text) unless one is typed; a highlighted text sets its strongest token."""

    TEXT = "text (empty: the highlighted session text below)"

    def __init__(self, feature: str, texts: list[dict]):
        fields = [(self.TEXT, ""), ("token (negative counts from the end)", str(texts[0]["token"] if texts else -1)),
                  ("r", "0"), ("chat template for a typed text (y/n)", "n")]
        super().__init__(f"Deactivation test of {feature}'s predecessors", fields, optional=(self.TEXT,))
        self.texts = texts

    def more(self) -> ComposeResult:
        yield Label(Text("the session's texts, where it fires most first (Enter tests the highlighted one):", style="dim"))
        table: DataTable = DataTable(cursor_type="row", id="choices")
        table.add_columns("max", "token", "text")
        for text in self.texts:
            view = Text()
            for i, token in enumerate(text["tokens"]):
                view.append(visible(token).replace("\n", "⏎"), style="reverse" if i == text["at"] else "")
            table.add_row(f"{text['max']:.3g}", str(text["token"]), view)
        yield table

    def on_mount(self) -> None:
        self.query_one("#choices" if self.texts else "#field-0").focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.query_one("#field-1", Input).value = str(self.texts[event.cursor_row]["token"])

    def on_data_table_row_selected(self) -> None:
        self.dismiss(self.answer())

    def answer(self) -> dict[str, str] | None:
        values = super().answer()
        if values is None or values[self.TEXT]:
            return values
        if not self.texts:
            return None
        chosen = self.texts[self.query_one("#choices", DataTable).cursor_row]["text"]
        return {**values, self.TEXT: chosen, self.fields[3][0]: "n"}  # the chosen text carries its template


def node_detail(node: dict) -> Text:
    scores = node.get("scores") or {}
    text = Text(f"{node['id']}  ", style="bold")
    text.append(f"class {node.get('class') or '-'} · s^R {score(scores.get('R'))} · "
                f"s^M {score(scores.get('M'))} · s^A {score(scores.get('A'))}\n")
    text.append(f"tokens: {tokens(node.get('label'), 8)}\n")
    for name, key in (("from RES", "from"), ("MLP", "mlp"), ("ATT", "attn"), ("to", "to")):
        for link in node.get(key, []):
            text.append(f"  {name:<8} {link['id']}  {link['score']:.2f}  {tokens(link.get('label'))}\n")
    for note in node.get("notes", []):
        text.append(f"  note: {note}\n", style="dim")
    return text

