"""The latent page (what Neuronpedia / SAE-Vis show, offline): one SAE latent's top-activating snippets of
the loaded pack's held-out corpus and the session's texts where it fires (each with its label), per-token
highlighting, an activation histogram, the tokens its decoder direction promotes and suppresses (logit
lens) and its flow neighbours (decoder-cosine matches one layer back and forward).

Opened with `l` from every screen that shows a latent (Attribution, Flow, Steering, Steering set, Heads),
and with Enter on a neighbour row here. Computed on the engine queue (`workflows.snippets.latent_page`)
with progress; Esc cancels it. `f` opens the latent's flow graph, `s` adds it to the steering set.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from auditui.errors import AuditError
from auditui.text import one_line
from auditui.tui.guard import guarded
from auditui.tui.screens.base import AuditScreen
from auditui.tui.widgets.status import StatusBar
from auditui.tui.widgets.tokens import heat, sparkline, token_text

SHOWN = 48  # characters of a snippet in the table (the pane shows it whole)
MARKS = {"positive": "+", "negative": "-", "unlabelled": "0", "prompt": "p"}


def open_latent(screen: Any, session_id: int, feature: str) -> None:
    """Push the latent page of `feature` (LAYER/KIND/INDEX) over `screen`."""
    screen.app.push_screen(LatentScreen(session_id, feature))


def around(tokens: list[str], at: int, width: int = SHOWN) -> tuple[int, int]:
    """The span [first, last) of `tokens` around token `at` that fits in `width` characters, up to two
    thirds of them before it."""
    size = [len(token_text(token)) for token in tokens]
    first, last, used = at, at + 1, size[at]
    while first > 0 and used + size[first - 1] <= width * 2 // 3:
        first -= 1
        used += size[first]
    while last < len(tokens) and used + size[last] <= width:
        used += size[last]
        last += 1
    while first > 0 and used + size[first - 1] <= width:
        first -= 1
        used += size[first]
    return first, last


def lens_line(pairs: list[tuple[str, float]]) -> str:
    return "  ".join(f"{token_text(token)} {cos:+.2f}" for token, cos in pairs)


class LatentScreen(AuditScreen):
    NEEDS_SAES = True
    HELP = ("Activations are the SAE's encoding of the site over each text; position 0 (the attention sink) "
            "never counts. Rows: the held-out corpus windows where the latent is most active, then every "
            "session text where it fires, then its flow neighbours (Enter opens a neighbour's page).")
    TERMS = (("held-out corpus", "the token windows the pack build kept out of SAE training (corpus.pt in the pack)"),
             ("density", "the share of the corpus's tokens where the latent is active (activation > 0)"),
             ("histogram", "how many active corpus tokens fall in each of 16 equal bins from 0 to the max"),
             ("logit lens +/-", "the tokens whose unembedding has the largest / smallest cosine with the decoder "
                                "direction after the final norm: what the latent promotes / suppresses"),
             ("p + - 0", "a session text's label: a prompt alone, positive, negative, unlabelled"),
             ("neighbours", "decoder-cosine matches: backward / forward R (residual), M (MLP out), A (attention out)"))
    BINDINGS = [
        Binding("enter", "open", "Open neighbour", show=False),
        Binding("f", "flow", "Flow"),
        Binding("s", "steer", "Steer set +"),
        Binding("b", "back", "Back"),
    ]
    CSS = """
    LatentScreen #latent { height: 1fr; }
    LatentScreen #detail-box { height: 10; }
    """

    def __init__(self, session_id: int, feature: str):
        super().__init__()
        self.session_id, self.feature = session_id, feature
        self.page: dict | None = None
        self.rows: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="notice")
        yield DataTable(cursor_type="row", id="latent")
        with VerticalScroll(id="detail-box"):
            yield Static(id="detail")
        yield StatusBar()
        yield Footer()

    @guarded
    def on_mount(self) -> None:
        self.title = f"latent {self.feature}"
        table = self.query_one(DataTable)  # fixed widths: the layout never waits on a later auto-size
        for label, width in (("from", 9), ("act", 6), ("text", 48)):
            table.add_column(label, width=width)
        self.query_one("#notice", Static).update(Text("reading the held-out corpus and the session's texts…"))
        store, session_id, feature = self.store, self.session_id, self.feature

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.snippets import latent_page

            return latent_page(store, self.engine(ctx), session_id, feature, progress=ctx)

        def stopped(error: str) -> None:
            self.query_one("#notice", Static).update(Text(one_line(f"not computed: {error}")))

        self.submit(f"latent {feature}", job, on_done=self.show_page, on_error=stopped,
                    stages=("held-out corpus", "session texts"))

    # -- rendering -----------------------------------------------------------------------------
    def show_page(self, page: dict) -> None:
        self.page = page
        corpus = page["corpus"]
        self.rows = ([{"kind": "corpus", **s} for s in page["snippets"]] + [{"kind": "text", **s} for s in page["texts"]]
                     + [{"kind": "neighbour", "relation": g["relation"], **m} for g in page["neighbours"]
                        for m in g["matches"]])
        table = self.query_one(DataTable)
        table.clear()
        for row in self.rows:
            table.add_row(*self.cells(row))
        density = corpus["n_active"] / corpus["n_tokens"] if corpus["n_tokens"] else 0.0
        self.query_one("#notice", Static).update(Text(one_line(
            f"{corpus['source']}: {corpus['n_texts']} windows · density {density:.1%} of {corpus['n_tokens']} tokens"
            f" · max {corpus['max']:.3g}")))
        self.title = f"latent {page['feature']}"
        self.show_detail(None)
        table.focus()

    def cells(self, row: dict) -> tuple:
        if row["kind"] == "neighbour":
            return (row["relation"], f"{row['score']:+.2f}",
                    Text(f"{row['feature']}  " + " ".join(token_text(t) for t in row["label"][:4])))
        at = row["position"] - row["start"]
        first, last = around(row["tokens"], at)
        where = "corpus" if row["kind"] == "corpus" else f"#{row['completion_id'] or row['prompt_id']} {MARKS[row['label']]}"
        return (where, f"{row['max']:.3g}", heat(self.app, row["tokens"][first:last], row["activations"][first:last],
                                                  row["max"], at - first))

    def current(self) -> dict | None:
        table = self.query_one(DataTable)
        return self.rows[table.cursor_row] if self.rows and table.row_count else None

    def on_data_table_row_highlighted(self) -> None:
        self.show_detail(self.current())

    def show_detail(self, row: dict | None) -> None:
        """The page's histogram and logit lens, then the highlighted row in full."""
        page = self.page
        if page is None:
            return
        text = Text()
        counts = page["histogram"]["counts"]
        if counts:
            text.append(f"histogram of the active corpus tokens 0..{page['corpus']['max']:.3g}: ", style="bold")
            text.append(sparkline([float(c) for c in counts]) + f"  (bins of {page['histogram']['edges'][1]:.3g}; "
                        f"largest bin {max(counts)})\n")
        text.append("logit lens + ", style="bold")
        text.append(lens_line(page["lens"]["positive"]) + "\n")
        text.append("logit lens - ", style="bold")
        text.append(lens_line(page["lens"]["negative"]) + "\n")
        if row is not None and row["kind"] != "neighbour":
            source = "held-out window" if row["kind"] == "corpus" else (
                f"session text #{row['completion_id'] or row['prompt_id']} ({row['label']})")
            text.append(f"{source}, max {row['max']:.3g} at token {row['position']}:\n", style="bold")
            text.append_text(heat(self.app, row["tokens"], row["activations"], row["max"], row["position"] - row["start"]))
            text.append("\n")
        elif row is not None:
            text.append(f"{row['relation']} neighbour {row['feature']} (cosine {row['score']:+.3f}); Enter opens its page\n",
                        style="bold")
        for note in page["notes"]:
            text.append(f"note: {one_line(note)}\n", style="dim")
        self.query_one("#detail", Static).update(text)

    # -- actions -------------------------------------------------------------------------------
    def on_data_table_row_selected(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        row = self.current()
        if row is not None and row["kind"] == "neighbour":
            open_latent(self, self.session_id, row["feature"])

    @guarded
    def action_flow(self) -> None:
        from auditui.engine.flow import RESIDUAL_KINDS, Feature
        from auditui.tui.screens.flow import FlowScreen

        if Feature.parse(self.feature).site.kind not in RESIDUAL_KINDS:
            raise AuditError(f"{self.feature} is not a residual latent; flow graphs start from resid_post or resid_pre")
        self.app.push_screen(FlowScreen(self.session_id, self.feature))

    @guarded
    def action_steer(self) -> None:
        from auditui.engine.flow import Feature

        feature = Feature.parse(self.feature)
        self.store.add_feature(self.session_id, str(feature.site), feature.latent, source="latent page")
        self.notify(f"{self.feature} added to the steering set", timeout=3, markup=False)
