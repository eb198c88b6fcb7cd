"""Sweep: a steering plan's strength grid, judged, against a band of random plans of the same shape.

Opened from the Steering screen (`w`: its plan, prompt and new-token count) or from the run history
(a stored sweep run and its plan). Fields: prompt, subject, rubric; strengths, samples per strength,
band plans, direction, new tokens; the judge's URL and model (prefilled from the settings, i.e.
AUDITUI_JUDGE_BASE_URL / AUDITUI_JUDGE_MODEL or config.toml). Ctrl+R runs `workflows.sweep.sweep` on
the engine queue; Esc stops it between judge calls or sampling batches, and the stopped run is
stored and shown as cancelled with what it graded. The plot shows the score per strength of every
curve and the band's 5%, median and 95% lines; the table the numbers, each point's unscored count
and failure rate beside its means; the pane says which judge graded. `t` takes the best strength's
plan back into the Steering screen. Opening shows the session's latest sweep run.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable
from textual_plotext import PlotextPlot

from auditui.errors import AuditError
from auditui.text import visible, yes_no
from auditui.tui.guard import guarded
from auditui.tui.screens.base import StepScreen
from auditui.tui.widgets.params import parse_number, parse_numbers
from auditui.workflows.sweep import DIRECTIONS, SWEEP_KIND  # this module loads when the screen opens

NO_JUDGE = ("No judge is configured. Start one in another shell with `auditui judge serve`: it prints the URL and "
            "the model to type in the judge and model fields (or to export as AUDITUI_JUDGE_BASE_URL and "
            "AUDITUI_JUDGE_MODEL).")
BAND_LINES = (("low", "band 5%"), ("median", "band median"), ("high", "band 95%"))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def interval(estimate: dict) -> str:
    return "-" if estimate["low"] is None else f"{estimate['low']:.2f}..{estimate['high']:.2f}"


def share(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def point_cells(label: str, point: dict, edge: dict) -> tuple[str, ...]:
    """One table row: a curve's point at one strength beside the band there."""
    limits = edge["score"]
    band = "-" if limits is None else " ".join(fmt(limits[key]) for key, _ in BAND_LINES)
    return (label, f"{point['strength']:g}", fmt(point["score"]["mean"]), interval(point["score"]),
            f"{point['unscored']}/{point['n']}", share(point["failure_rate"]), fmt(point["behaviour"]["mean"]),
            fmt(point["coherence"]["mean"]), band, yes_no(point["real"]))


class SweepScreen(StepScreen):
    NEEDS_SAES = True
    HELP = ("Each strength multiplies every coefficient of the plan; 0 is the unsteered samples. score = b·c "
            "(toward) or (1-b)·c (away) from the judge's behaviour b and coherence c, a mean with its 95% "
            "interval; unscored: answers the judge gave that could not be read, or calls that failed, counted "
            "beside every mean and in no mean. The band: random plans of the same shape; a point is real "
            "only outside it. Best strength: chosen on half the seeds, its score reported on the other half.")
    BINDINGS = [
        Binding("ctrl+r", "run", "Run"),
        Binding("d", "direction", "Direction"),
        Binding("t", "take", "Take best plan"),
        Binding("b", "back", "Back"),
    ]
    TABLE_ID = "points"

    def __init__(self, session_id: int, plan: object = None, prompt: str = "", max_new: str = "32",
                 run_id: int | None = None):
        """`plan`, `prompt`, `max_new`: what the Steering screen gives; `run_id`: the run to show on opening
        (the run history), else the session's latest sweep."""
        super().__init__(session_id)
        self.plan, self.prompt, self.max_new = plan, prompt, max_new
        self.run: dict | None = None
        self.opening = run_id

    def param_rows(self) -> list[list[tuple]]:
        settings = self.app.settings  # type: ignore[attr-defined]
        return [[("prompt", self.prompt, 20), ("subject", "", 16), ("rubric", "behaviour", 10)],
                [("strengths", "2 4 8", 10), ("n", "4", 2, "integer"), ("band", "4", 2, "integer"),
                 ("dir", "toward", 6), ("max", self.max_new, 3, "integer")],
                [("judge", settings.judge_base_url, 30), ("model", settings.judge_model, 16)]]

    def body(self) -> ComposeResult:
        yield PlotextPlot(id="curves")
        yield DataTable(cursor_type="row", id=self.TABLE_ID)

    @guarded
    def on_mount(self) -> None:
        self.title = "sweep"
        self.table.add_columns("curve", "s", "score", "95%", "unsc.", "fail", "behav.", "coher.", "band lo med hi",
                               "out")
        runs = [r for r in self.store.runs(self.session_id, SWEEP_KIND) if r["result"]]  # done or cancelled
        runs = [r for r in runs if r["id"] == self.opening] if self.opening is not None else runs
        if runs:
            self.show_run(runs[-1]["id"])
            self.fill_fields(runs[-1]["params"])
        else:
            self.show_detail(self.judge_note())
        self.show_damaged()

    def fill_fields(self, params: dict) -> None:
        """The fields describe the shown run; the prompt and new tokens stay those the Steering screen gave."""
        values = {"subject": ", ".join(params["rubric"]["subjects"]), "rubric": params["rubric"]["name"],
                  "strengths": " ".join(f"{s:g}" for s in params["strengths"] if s), "n": str(params["n"]),
                  "band": str(params["band"]), "dir": params["direction"], "judge": params["judge"]["base_url"],
                  "model": params["judge"]["model"]}
        if self.plan is None:  # reopened from the run history: its plan, prompt and tokens
            from auditui.engine.steering import SteeringPlan

            self.plan = SteeringPlan.from_dict(params["plan"])
            values |= {"prompt": params["prompt"], "max": str(params["params"]["max_new_tokens"])}
        self.set_params(values)

    def judge_note(self) -> Text:
        value = self.param_values()
        if not (value["judge"] and value["model"]):
            return Text(NO_JUDGE)
        return Text(visible(f"Ctrl+R: the judge {value['model']} at {value['judge']} grades every text."))

    # -- running -------------------------------------------------------------------------------
    def request(self):  # type: ignore[no-untyped-def]
        from auditui.engine.sampling import SamplingParams
        from auditui.workflows.judge import Grading
        from auditui.workflows.sweep import SweepRequest

        value = self.param_values()
        if self.plan is None:
            raise AuditError("a sweep needs a plan: open it from the Steering screen (w)")
        subjects = tuple(s for s in value["subject"].split(",") if s.strip())
        params = SamplingParams(max_new_tokens=int(parse_number(value["max"], int, "max", 1, 1024)))
        request = SweepRequest(self.plan, value["prompt"], Grading.named(value["rubric"] or "behaviour", subjects),
                               parse_numbers(value["strengths"], "strength", -1e4, 1e4),
                               int(parse_number(value["n"], int, "n", 2, 256)), params, seed=0,
                               band=int(parse_number(value["band"], int, "band", 0, 64)), direction=value["dir"])
        request.validate()
        return request

    def judge_config(self):  # type: ignore[no-untyped-def]
        from auditui.workflows.judge import judge_config

        value = self.param_values()
        if not (value["judge"] and value["model"]):
            self.show_detail(Text(NO_JUDGE))
            raise AuditError(NO_JUDGE)
        return judge_config(self.app.settings, value["judge"], value["model"])  # type: ignore[attr-defined]

    @guarded
    def action_run(self) -> None:
        request, config = self.request(), self.judge_config()
        store, session_id = self.store, self.session_id
        known = max((r["id"] for r in store.runs(session_id, SWEEP_KIND)), default=0)

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.judge.client import Judge
            from auditui.workflows.sweep import sweep

            judge = Judge(config)
            try:
                return sweep(store, self.engine(ctx), session_id, request, judge, ctx)
            finally:
                judge.close()

        def stopped(_error: str) -> None:  # a cancelled or failed run is shown as the store holds it
            new = [r["id"] for r in store.runs(session_id, SWEEP_KIND) if r["id"] > known]
            if new:
                self.show_run(new[-1])

        self.show_detail(Text(visible(f"sampling, then the judge {config.model} at {config.base_url} grades every text…")))
        self.submit("sweep", job, on_done=self.show_run, on_error=stopped,
                    stages=("reference mean", "sampling", "judge", "perplexity"))

    def on_input_submitted(self) -> None:
        self.show_detail(self.judge_note())

    def action_direction(self) -> None:
        field = self.query_one("#param-dir")
        field.value = DIRECTIONS[(DIRECTIONS.index(field.value) + 1) % 2] if field.value in DIRECTIONS else DIRECTIONS[0]

    # -- showing a run -------------------------------------------------------------------------
    @guarded
    def show_run(self, run_id: int) -> None:
        run = self.store.run(run_id)
        status = "" if run["status"] == "done" else f" · {run['status']}"
        self.title = f"sweep · run {run_id}{status}"
        self.run = run if run["result"] else None
        self.table.clear()
        self.rows = []
        if self.run is None:
            self.draw({"curves": [], "band": {"points": []}})
            self.show_detail(Text(f"run {run_id} {run['status']}: {run['error'] or 'no result'}"))
            return
        result = run["result"]
        for curve in result["curves"]:
            for point, edge in zip(curve["points"], result["band"]["points"], strict=True):
                self.table.add_row(*(Text(visible(cell)) for cell in point_cells(curve["label"], point, edge)))
                self.rows.append(point)
        self.draw(result)
        self.show_detail(self.run_text(run))
        self.table.focus()

    def run_text(self, run: dict) -> Text:
        """Which judge graded, the headline, the best strength, the plan and prompt (all as literal text)."""
        result = run["result"]
        judge, counts = result["judge"], result["counts"]
        text = Text(visible(f"graded by the judge {judge['model']} at {judge['base_url']} "
                            f"(rubric {result['rubric']['name']}); "))
        text.append(f"{counts['calls']} calls, {counts['cached']} cached, unscored or failed "
                    f"{share(result['failure_rate'])}\n")
        text.stylize("bold")
        text.append(visible(f"run {run['id']} ({run['status']}): {run['summary']['headline']}\n"))
        best = result["best"]
        if best:
            text.append(f"best strength {best['strength']:g}: score {fmt(best['chosen_score'])} on seeds "
                        f"{best['chosen_on_seeds']}, {fmt(best['reported_score']['mean'])} on the held-out seeds "
                        f"{best['reported_on_seeds']}; t takes its plan into the Steering screen\n")
        text.append(visible(f"plan: {run['params']['plan']['source']} · prompt: {run['params']['prompt']}\n"),
                    style="dim")
        for note in result["notes"]:
            text.append(visible(f"{note}\n"), style="dim")
        return text

    def draw(self, result: dict) -> None:
        """The score per strength of every curve, and the band's low, median and high lines."""
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        for curve in result["curves"]:
            points = [(p["strength"], p["score"]["mean"]) for p in curve["points"] if p["score"]["mean"] is not None]
            if points:
                plt.plot(*zip(*points, strict=True), label=curve["label"], marker="braille")
        for key, label in BAND_LINES:
            points = [(e["strength"], e["score"][key]) for e in result["band"]["points"] if e["score"]]
            if points:
                plt.plot(*zip(*points, strict=True), label=label, marker="dot")
        plt.xlabel("strength")
        plt.ylabel("score")
        plot.refresh()

    # -- the best strength -----------------------------------------------------------------------
    @guarded
    def action_take(self) -> None:
        """The best strength's plan into the Steering screen below (or a new one from the run history)."""
        from auditui.engine.steering import SteeringPlan
        from auditui.tui.screens.steering import SteeringScreen

        best = self.run["result"]["best"] if self.run else None
        if not best:
            raise AuditError("this sweep has no best strength (nothing was scored)")
        plan = SteeringPlan.from_dict(best["plan"])
        below = self.app.screen_stack[-2]
        if isinstance(below, SteeringScreen):
            self.app.pop_screen()
            below.use_plan(plan)
        else:
            self.app.push_screen(SteeringScreen(self.session_id, plan))
        self.notify(f"steering at the sweep's best strength {best['strength']:g}", timeout=3)
