"""Prompt & Samples: type a prompt, sample N completions, label them (+ / - / 0), watch pairs form."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from auditui.errors import AuditError
from auditui.text import visible
from auditui.tui.guard import guarded
from auditui.tui.screens.base import AuditScreen
from auditui.tui.screens.sessions import models_line
from auditui.tui.widgets.params import ParamRow, parse_number
from auditui.tui.widgets.status import StatusBar

LABEL_MARK = {"positive": "+", "negative": "-", "unlabelled": "·"}


def label_counts(labels: list[str]) -> str:
    """The positive/negative counts of a prompt's completion labels, e.g. "2/1"."""
    return f"{labels.count('positive')}/{labels.count('negative')}"


def one_line(text: str, width: int = 200) -> Text:
    flat = " ".join(visible(text).split())
    return Text(flat[:width] + ("…" if len(flat) > width else ""))


class SamplesScreen(AuditScreen):
    HELP = ("Enter in the prompt samples N completions (batched, seeded). In the completions table: "
            "+ positive (shows the behaviour), - negative, 0 unlabelled. A prompt with both labels is a pair.")
    TERMS = (("pairs", "the number of prompts that have at least one + and one - completion (attribution "
                       "compares them within each prompt); not the number of +/- combinations"),
             ("+/-", "a prompt's positive / negative completion counts"),
             ("+ - 0", "positive (shows the behaviour), negative, unlabelled"))
    BINDINGS = [
        Binding("ctrl+s", "sample", "Sample"),
        Binding("plus,equals_sign", "label('positive')", "Positive", key_display="+"),
        Binding("minus", "label('negative')", "Negative", key_display="-"),
        Binding("0", "label('unlabelled')", "Unlabel", key_display="0"),
        Binding("a", "attribution", "Attribution"),
        Binding("f", "flow", "Flow"),
        Binding("h", "heads", "Heads"),
        Binding("t", "steering", "Steer the set"),
        Binding("r", "runs", "Runs"),
        Binding("v", "steering_set", "Steering set"),
        Binding("e", "export", "Export"),
        Binding("p", "focus_prompt", "Prompt"),
        Binding("b", "back", "Sessions"),
    ]

    def __init__(self, session_id: int):
        super().__init__()
        self.session_id = session_id
        self.prompt_id: int | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="prompt-row"):
            yield Label(" prompt › ")
            yield Input(placeholder="type a prompt, Enter samples N completions", id="prompt")
            yield Static(id="pairs")
        with Horizontal(id="params"):
            yield ParamRow([("n", "8", 4, "integer"), ("temp", "1.0", 4, "number"), ("top-p", "0.95", 4, "number"),
                            ("max", "64", 4, "integer"), ("seed", "", 8, "integer")])
        with Horizontal(id="main"):
            yield DataTable(cursor_type="row", id="prompts")
            with Vertical(id="right"):
                yield DataTable(cursor_type="row", id="completions")
                with VerticalScroll(id="detail-box"):
                    yield Static(id="detail")
        yield StatusBar()
        yield Footer()

    @guarded
    def on_mount(self) -> None:
        session = self.store.session(self.session_id)
        self.title = " ".join(visible(session["name"]).split())
        self.sub_title = models_line(session)
        prompts = self.query_one("#prompts", DataTable)
        prompts.add_column("id")
        prompts.add_column("prompt", width=17)
        prompts.add_column("+/-", key="counts")
        completions = self.query_one("#completions", DataTable)
        completions.add_column("id")
        completions.add_column("", key="label")
        completions.add_column("completion")
        self.refresh_prompts()
        self.show_damaged()
        self.check_model()
        # the screen's letter keys act unless the prompt is focused (p, or Tab); an empty session starts there
        (self.results() if self.query_one("#prompts", DataTable).row_count else self.query_one("#prompt", Input)).focus()

    def check_model(self) -> None:
        """A clear warning (and the subtitle) when the session was made with another model than the loaded
        one: its stored token ids stand for other tokens here, and later steps would fail on them."""
        engine = self.app.jobs.state.get("engine")  # type: ignore[attr-defined]
        if engine is None or getattr(self, "_checked_model", None) == engine.lm.model_id:
            return  # checked again once the model is loaded; once per model (open and load may both ask)
        self._checked_model = engine.lm.model_id
        lm = engine.lm
        made = {self.store.session(self.session_id)["model_id"]} | {
            c["model_id"] for c in self.store.completions(session_id=self.session_id)}
        others = sorted(m for m in made - {lm.model_id, ""})
        if not others:
            return
        stored = [c["token_ids"] or [] for c in self.store.completions(session_id=self.session_id)] + [
            p["prompt_ids"] or [] for p in self.store.prompts(self.session_id)]
        largest = max((i for ids in stored for i in ids), default=-1)
        vocab = int(lm.model.config.vocab_size)
        why = (f"its token ids go up to {largest}, beyond this model's vocabulary of {vocab}" if largest >= vocab else
               "its stored token ids stand for other tokens in this model's vocabulary")
        self.sub_title = visible(f"made with {', '.join(others)} · loaded ") + models_line(
            self.store.session(self.session_id), lm.model_id)
        self.notify(visible(f"This session was made with {', '.join(others)}, but {lm.model_id} is loaded: {why}, so "
                            f"attribution, flow and steering on it would fail or mislead. Restart auditui with "
                            f"--model {others[0]} to work on it."),
                    title="another model", severity="warning", timeout=30, markup=False)

    def results(self) -> DataTable:
        completions = self.query_one("#completions", DataTable)
        return completions if completions.row_count else self.query_one("#prompts", DataTable)

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    # -- rendering -----------------------------------------------------------------------------
    @guarded
    def refresh_prompts(self, select: int | None = None) -> None:
        table = self.query_one("#prompts", DataTable)
        table.clear()
        prompts = self.store.prompts(self.session_id)
        comps = self.store.completions(self.session_id)
        for prompt in prompts:
            mine = [c["label"] for c in comps if c["prompt_id"] == prompt["id"]]
            table.add_row(str(prompt["id"]), one_line(prompt["text"], 16), label_counts(mine), key=str(prompt["id"]))
        self.show_pairs()
        if prompts:
            target = select if select is not None else (self.prompt_id or prompts[-1]["id"])
            if str(target) in table.rows:
                table.move_cursor(row=table.get_row_index(str(target)))
            self.show_prompt(target)

    def show_pairs(self) -> None:
        self.query_one("#pairs", Static).update(Text(f" pairs: {len(self.store.pairs(self.session_id))} (prompts with + and -) "))

    @guarded
    def show_prompt(self, prompt_id: int) -> None:
        self.prompt_id = prompt_id
        table = self.query_one("#completions", DataTable)
        row = table.cursor_row
        table.clear()
        for comp in self.store.completions(prompt_id=prompt_id):
            table.add_row(str(comp["id"]), self._mark(comp["label"]), one_line(comp["text"]), key=str(comp["id"]))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))
            self.show_completion(self.selected_completion())
        else:
            self.query_one("#detail", Static).update(Text(visible(self.store.prompt(prompt_id)["text"])))

    @staticmethod
    def _mark(label: str) -> Text:
        return Text(LABEL_MARK[label], style={"positive": "bold green", "negative": "bold red"}.get(label, "dim"))

    def selected_completion(self) -> int | None:
        table = self.query_one("#completions", DataTable)
        if table.row_count == 0:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    @guarded
    def show_completion(self, completion_id: int | None) -> None:
        if completion_id is None:
            return
        comp = self.store.completion(completion_id)
        header = f"#{comp['id']} · {comp['label']} · seed {comp['seed']} · {comp['finish_reason']}\n"
        self.query_one("#detail", Static).update(Text(header, style="dim") + Text(visible(comp["text"])))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is None or event.row_key not in event.data_table.rows:
            return  # a row of an earlier fill of the table (its highlight arrives after the table was refilled)
        if event.data_table.id == "prompts":
            if int(event.row_key.value) != self.prompt_id:
                self.show_prompt(int(event.row_key.value))
        else:
            self.show_completion(int(event.row_key.value))

    # -- actions -------------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_sample()

    def sampling_request(self) -> tuple[str, int, object, int | None]:
        from auditui.engine.sampling import SamplingParams

        prompt = self.query_one("#prompt", Input).value.strip()
        if not prompt:
            raise AuditError("type a prompt first")
        value = self.query_one(ParamRow).values()
        n = int(parse_number(value["n"], int, "n", 1, 1024))
        params = SamplingParams(temperature=float(parse_number(value["temp"], float, "temperature", 0, 10)),
                                top_p=float(parse_number(value["top-p"], float, "top-p", 0.01, 1)),
                                max_new_tokens=int(parse_number(value["max"], int, "max new tokens", 1, 4096)))
        seed = int(parse_number(value["seed"], int, "seed", 0, 2**62)) if value["seed"] else None
        return prompt, n, params, seed

    @guarded
    def action_sample(self) -> None:
        prompt, n, params, seed = self.sampling_request()
        store, session_id = self.store, self.session_id

        settings = self.app.settings  # type: ignore[attr-defined]

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.workflows.engine import pack_label
            from auditui.workflows.sample import SampleRequest, sample

            return sample(store, self.engine(ctx).lm, session_id, SampleRequest(prompt, n, params, seed), ctx,
                          pack_id=pack_label(settings))

        def done(result) -> None:  # type: ignore[no-untyped-def]
            self.refresh_prompts(select=result.prompt_id)
            self.query_one("#completions", DataTable).focus()
            self.notify(f"{len(result.completion_ids)} completions sampled", timeout=3)

        self.submit(f"sample {n}", job, on_done=done, on_error=lambda _e: self.refresh_prompts())

    @guarded
    def action_label(self, label: str) -> None:
        completion_id = self.selected_completion()
        if completion_id is None:
            return
        self.store.set_label(completion_id, label)
        table = self.query_one("#completions", DataTable)
        table.update_cell(str(completion_id), "label", self._mark(label))
        labels = [c["label"] for c in self.store.completions(prompt_id=self.prompt_id)]
        self.query_one("#prompts", DataTable).update_cell(str(self.prompt_id), "counts", label_counts(labels))
        self.show_pairs()
        if table.cursor_row + 1 < table.row_count:
            table.move_cursor(row=table.cursor_row + 1)  # its highlight shows the next completion
        else:
            self.show_completion(completion_id)  # the new label in the detail header

    def action_attribution(self) -> None:
        from auditui.tui.screens.attribution import AttributionScreen

        self.app.push_screen(AttributionScreen(self.session_id))

    def action_flow(self) -> None:
        from auditui.tui.screens.flow import FlowScreen

        self.app.push_screen(FlowScreen(self.session_id))

    def action_steering(self) -> None:
        from auditui.tui.screens.steering import SteeringScreen

        self.app.push_screen(SteeringScreen(self.session_id))

    def action_runs(self) -> None:
        from auditui.tui.screens.runs import RunsScreen

        self.app.push_screen(RunsScreen(self.session_id))

    def action_steering_set(self) -> None:
        from auditui.tui.screens.features import FeaturesScreen

        self.app.push_screen(FeaturesScreen(self.session_id))

    def action_heads(self) -> None:
        from auditui.tui.screens.heads import HeadsScreen

        self.app.push_screen(HeadsScreen(self.session_id))

    @guarded
    def action_export(self) -> None:
        from auditui.tui.screens.export import export_dialog

        export_dialog(self, self.session_id)
