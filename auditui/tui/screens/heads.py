"""Heads: which attention heads attend for few reasons on a prompt, and which SAE latents those reasons are
(seed 004).

The grid has one row per layer and one column per head, each cell the median sparsity S of the
head's attended pairs in the shown scan (darker: sparser; `·`: no pair above the threshold). The
prompt field starts with the session's latest prompt; ctrl+r (or Enter in a field) scans it and
stores a "heads_scan" run, and the latest scan of that text is shown again on opening. Moving the
grid cursor lists the chosen head's sparsest pairs from the run; Enter on a pair decomposes it (a
"heads_pair" run): term bars largest first, N_recon, the random-rotation control and the latents
of the residual SAE feeding the layer that align with the largest terms' singular vectors. `f`
sends the best-aligned latent to Flow, `s` adds it to the session's steering set.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.color import Color
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static

from auditui.errors import AuditError
from auditui.tui.guard import guarded
from auditui.tui.screens.base import StepScreen
from auditui.tui.widgets.params import ParamRow, parse_number
from auditui.tui.widgets.status import StatusBar

BAR = 20
TERMS_SHOWN = 8


def short(token: str, width: int = 8) -> str:
    shown = repr(token)[1:-1].replace(" ", "␣")  # escapes control characters; spaces made visible
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def bar(value: float, largest: float) -> Text:
    cells = round(BAR * abs(value) / largest) if largest > 0 else 0
    return Text("█" * cells or "▏", style="green" if value >= 0 else "red")


def ranked(terms: list[float], total: float) -> list[int]:
    """Indices of `terms`, largest first in the direction of `total` (the N_recon order)."""
    sign = -1.0 if total < 0 else 1.0
    return sorted(range(len(terms)), key=lambda k: -sign * terms[k])


def term_lines(text: Text, terms: list[float], sigma: list[float], total: float, largest: float) -> None:
    order = ranked(terms, total)
    for k in order[:TERMS_SHOWN]:
        text.append(f"  k{k:<3} σ {sigma[k]:<7.3g} {terms[k]:+9.4f} ")
        text.append_text(bar(terms[k], largest))
        text.append("\n")
    if len(order) > TERMS_SHOWN:
        rest = sum(terms[k] for k in order[TERMS_SHOWN:])
        text.append(f"  … {len(order) - TERMS_SHOWN} more terms, sum {rest:+.4f}\n", style="dim")


def pair_text(result: dict) -> Text:
    """A stored "heads_pair" result as text: header, term bars, control, aligned latents (model text literal)."""
    control = result["control"]
    text = Text(f"head L{result['layer']}H{result['head']}  ", style="bold")
    text.append(f"query {result['query']} ")
    text.append(repr(result["query_token"]))
    text.append(f" → key {result['key']} ")
    text.append(repr(result["key_token"]))
    text.append(f" · attention {result['attention']:.3f} · ℓ̃ {result['relative']:+.4f}")
    if result["relative_capped"] != result["relative"]:
        text.append(f" (soft-capped {result['relative_capped']:+.4f})")
    text.append(f"\nS {result['sparsity']:.3f} · N_recon {result['n_recon']} of {len(result['terms'])} · "
                f"control S {control['sparsity']:.3f} · N_recon {control['n_recon']}\n")
    largest = max(abs(v) for v in result["terms"] + control["terms"]) if result["terms"] else 0.0
    text.append(f"terms, largest first (they sum to ℓ̃ {sum(result['terms']):+.4f}):\n", style="bold")
    term_lines(text, result["terms"], result["sigma"], result["relative"], largest)
    text.append(f"control: U, V rotated at random, same σ (terms sum to {control['total']:+.4f}):\n", style="bold")
    term_lines(text, control["terms"], result["sigma"], control["total"], largest)
    if result["alignments"]:
        text.append(f"aligned latents of {result['site']} (|cos| with u_k, v_k; p vs random vectors):\n", style="bold")
    for alignment in result["alignments"]:
        for side in ("query", "key"):
            text.append(f"  k{alignment['k']:<3} {side:<5} ")
            for match, p in list(zip(alignment[side], alignment["p_values"][side]))[:3]:
                text.append(f"{match['latent']} ({match['cos']:+.2f}, p {p:.2g}) ")
                text.append(" ".join(short(t, 6) for t in alignment["labels"].get(str(match["latent"]), [])[:3]),
                            style="dim")
                text.append("  ")
            text.append("\n")
    for note in result.get("notes", []):
        text.append(f"note: {note}\n", style="dim")
    return text


class HeadsScreen(StepScreen):
    HELP = ("Grid: layers × heads, each cell the median sparsity S of the head's attended pairs (attention > thr) on "
            "the prompt; darker is sparser. For query r and key j, ℓ̃ = ℓ_j - mean of the other visible keys' ℓ "
            "(pre-softmax, scale included) splits exactly into one term per singular pair of the head's Ω = W_Qᵀ W_K. "
            "S(v) = (mean|v|)² / mean(v²): 1 when all terms are equal, 1/d_head when one term carries everything. "
            "N_recon: the fewest terms, largest first, whose sum reaches ℓ̃. Control: U and V rotated by one random "
            "orthogonal matrix (same singular values); a real sparse reason is sparser than its control. Enter on a "
            "pair decomposes it; f: best-aligned latent to Flow, s: to the steering set. Esc cancels a job.")
    BINDINGS = [
        Binding("ctrl+r", "scan", "Scan"),
        Binding("f", "flow", "Flow"),
        Binding("l", "latent", "Latent page"),
        Binding("s", "steer", "Steer set +"),
        Binding("b", "back", "Back"),
    ]
    CSS = """
    HeadsScreen #heads-main { height: 1fr; }
    HeadsScreen #grid { width: auto; max-width: 60%; height: 1fr; border-right: vkey $panel; }
    HeadsScreen #hits { width: 1fr; height: 1fr; }
    HeadsScreen #detail-box { height: 1fr; }
    """

    TABLE_ID = "hits"

    def __init__(self, session_id: int):
        super().__init__(session_id)
        self.scan: dict | None = None  # the shown scan's result
        self.scan_params: dict = {}
        self.pair: dict | None = None  # the last decomposed pair's result
        self.head: tuple[int, int] | None = None

    def latest_prompt(self) -> dict | None:
        prompts = self.store.prompts(self.session_id)
        return prompts[-1] if prompts else None

    def params(self) -> list[tuple]:
        prompt = self.latest_prompt()
        return [("text", prompt["text"] if prompt else "", 30), ("thr", "0.3", 4, "number"),
                ("chat", "y" if prompt and prompt["chat"] else "n", 1)]

    def compose(self) -> ComposeResult:
        yield Header()
        yield ParamRow(self.params())
        with Horizontal(id="heads-main"):
            yield DataTable(cursor_type="cell", id="grid")
            yield DataTable(cursor_type="row", id=self.TABLE_ID)
        with VerticalScroll(id="detail-box"):
            yield Static(id="detail")
        yield StatusBar()
        yield Footer()

    @property
    def grid(self) -> DataTable:
        return self.query_one("#grid", DataTable)

    def results(self) -> DataTable:
        return self.grid

    @guarded
    def on_mount(self) -> None:
        self.title = "heads"
        self.table.add_columns("query", "key", "tokens", "attn", "S", "N", "ctl S")
        value = self.param_values()
        runs = [r for r in self.store.runs(self.session_id, "heads_scan") if r["status"] == "done"
                and r["params"].get("text") == value["text"] and bool(r["params"].get("chat")) == (value["chat"] == "y")]
        if runs:
            self.show_scan(runs[-1])
        else:
            self.show_detail(Text("ctrl+r scans every head on the text (Enter in a field too)", style="dim"))
            self.query_one("#param-text").focus()

    # -- scanning ------------------------------------------------------------------------------
    def request(self):  # type: ignore[no-untyped-def]
        from auditui.workflows.heads import HeadsScanRequest

        value = self.param_values()
        if value["chat"].lower() not in ("y", "n"):
            raise AuditError("chat: y (wrap the text in the chat template) or n")
        request = HeadsScanRequest(value["text"], threshold=float(parse_number(value["thr"], float, "thr", 1e-6, 1)),
                                   chat=value["chat"].lower() == "y")
        request.validate()
        return request

    def on_input_submitted(self) -> None:
        self.action_scan()

    @guarded
    def action_scan(self) -> None:
        req = self.request()
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.heads import heads_scan

            outcome = heads_scan(store, self.engine(ctx), session_id, req, ctx)
            return store.run(outcome.run_id)

        self.submit("heads scan", job, on_done=self.show_scan)

    def show_scan(self, run: dict) -> None:
        self.scan, self.scan_params, self.pair, self.head = run["result"], run["params"], None, None
        scan = self.scan
        grid = self.grid
        grid.clear(columns=True)
        n_heads = len(scan["grid"][0]) if scan["grid"] else 0
        grid.add_column("L", key="layer")
        for head in range(n_heads):
            grid.add_column(f"h{head}", key=f"h{head}")
        theme = self.app.current_theme
        base, accent = Color.parse(theme.background or "black"), Color.parse(theme.primary)
        floor = min((s for row in scan["grid"] for s in row if s is not None), default=0.0)
        for layer, row in enumerate(scan["grid"]):
            cells: list[Text] = [Text(str(layer), style="dim")]
            for value in row:
                if value is None:
                    cells.append(Text("  · ", style="dim"))
                    continue
                strength = (1 - value) / (1 - floor) if floor < 1 else 0.0
                back = base.blend(accent, max(0.0, min(1.0, strength)))
                cells.append(Text(f"{value:.2f}", style=f"{back.get_contrast_text().hex} on {back.hex}"))
            grid.add_row(*cells, key=str(layer))
        self.title = (f"heads · run {run['id']} · {len(scan['tokens'])} tokens · {scan['n_hits']} pairs "
                      f"> {scan['threshold']}")
        hits = scan["hits"]
        layer, head = (hits[0]["layer"], hits[0]["head"]) if hits else (0, 0)
        grid.focus()
        if n_heads:
            grid.move_cursor(row=layer, column=head + 1)
        self.show_head(layer, head)

    # -- a head and its pairs ------------------------------------------------------------------
    def on_data_table_cell_highlighted(self, event: DataTable.CellHighlighted) -> None:
        if event.data_table.id == "grid" and self.scan is not None:
            self.show_head(event.coordinate.row, max(0, event.coordinate.column - 1))

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        if event.data_table.id == "grid" and self.rows:
            self.table.focus()

    def show_head(self, layer: int, head: int) -> None:
        scan = self.scan
        if scan is None or not scan["grid"] or (layer, head) == self.head:
            return
        self.head = (layer, head)
        tokens = scan["tokens"]
        self.rows = [hit for hit in scan["hits"] if (hit["layer"], hit["head"]) == (layer, head)]
        table = self.table
        table.clear()
        for hit in self.rows:
            table.add_row(str(hit["query"]), str(hit["key"]),
                          Text(f"{short(tokens[hit['query']])}→{short(tokens[hit['key']])}"),
                          f"{hit['attention']:.2f}", f"{hit['sparsity']:.3f}", str(hit["n_recon"]),
                          f"{hit['control_sparsity']:.3f}")
        self.show_detail(self.head_line())

    def head_line(self) -> Text:
        """`head LxHy: n pairs ...` of the chosen head."""
        if self.scan is None or self.head is None:
            return Text()
        layer, head = self.head
        median = self.scan["grid"][layer][head]
        text = Text(f"head L{layer}H{head}: ", style="bold")
        text.append(f"{self.scan['counts'][layer][head]} pairs with attention > {self.scan['threshold']}"
                    + (f", median S {median:.3f}" if median is not None else "")
                    + (f"; the {len(self.rows)} sparsest listed, Enter decomposes one" if self.rows else "") + "\n")
        return text

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        hit = self.current() if event.data_table.id == self.TABLE_ID else None
        if hit is None or self.scan is None:
            return
        tokens = self.scan["tokens"]
        text = self.head_line()
        text.append(f"query {hit['query']} ", style="bold")
        text.append(repr(tokens[hit["query"]]))
        text.append(f" → key {hit['key']} ")
        text.append(repr(tokens[hit["key"]]))
        text.append(f"\nattention {hit['attention']:.3f} · ℓ̃ {hit['relative']:+.3f} · S {hit['sparsity']:.3f} · "
                    f"N_recon {hit['n_recon']} · control S {hit['control_sparsity']:.3f} · largest terms k = "
                    f"{' '.join(map(str, hit['top']))}")
        self.show_detail(text)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == self.TABLE_ID:
            self.action_pair()

    @guarded
    def action_pair(self) -> None:
        hit = self.current()
        if hit is None or self.scan is None:
            return
        from auditui.workflows.heads import HeadsPairRequest

        params = self.scan_params
        req = HeadsPairRequest(params["text"], hit["layer"], hit["head"], hit["query"], hit["key"],
                               chat=bool(params.get("chat")), seed=int(params.get("seed", 0)))
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.heads import heads_pair

            return heads_pair(store, self.engine(ctx), session_id, req, ctx).result

        self.submit(f"decompose L{hit['layer']}H{hit['head']} {hit['query']}→{hit['key']}", job, on_done=self.show_pair)

    def show_pair(self, result: dict) -> None:
        self.pair = result
        self.show_detail(pair_text(result))

    # -- the best-aligned latent -----------------------------------------------------------------
    def aligned(self) -> tuple[str, int]:
        from auditui.workflows.heads import top_aligned_latent

        target = top_aligned_latent(self.pair) if self.pair else None
        if target is None:
            raise AuditError("decompose a pair first (Enter on a pair): its largest term's aligned latent is sent"
                             if self.pair is None else "this pair has no aligned latents (no residual SAE feeds its layer)")
        return target

    @guarded
    def action_flow(self) -> None:
        site, latent = self.aligned()
        from auditui.tui.screens.flow import FlowScreen

        self.app.push_screen(FlowScreen(self.session_id, f"{site}/{latent}"))

    @guarded
    def action_steer(self) -> None:
        site, latent = self.aligned()
        self.store.add_feature(self.session_id, site, latent, source="heads")
        self.notify(f"{site}/{latent} added to the steering set", timeout=3, markup=False)

    @guarded
    def action_latent(self) -> None:
        from auditui.tui.screens.latent import open_latent

        site, latent = self.aligned()
        open_latent(self, self.session_id, f"{site}/{latent}")
