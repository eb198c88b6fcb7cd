"""Steering: a plan over SAE features, the same prompt and seeds without and with it, side by side.

The plan comes from the screen that opened this one (an attribution run's top latents, a flow run's
graph, a sweep's best strength) or from the session's steering set. Fields: the prompt, the operation and coefficient the
builders give every feature, the strengths (a grid, sampled as one batch), the schedule over
layers, single-layer vs cumulative, the token scope, samples per strength and new tokens. Ctrl+R
runs; the table lists the plan (scheduled coefficient per layer, a sparkline of the schedule over
the span, logit-lens tokens); the pane shows each seed's unsteered completion and its steered ones,
the steered generated tokens underlined. `w` sweeps the plan's strength, judged (the Sweep screen).

A plan given whole (a sweep's best strength) keeps each feature's operation and coefficient until
the op or coef field is edited; the schedule, mode and scope fields apply to it as to any plan.
"""

from __future__ import annotations

from dataclasses import replace

from rich.text import Text
from textual.binding import Binding

from auditui.errors import AuditError
from auditui.text import visible
from auditui.tui.guard import guarded
from auditui.tui.screens.base import StepScreen
from auditui.tui.widgets.params import parse_number, parse_numbers
from auditui.tui.widgets.tokens import sparkline

CYCLES = {"op": ("add", "rescale", "clamp", "mean_ablate"), "sched": ("constant", "linear", "exponential"),
          "mode": ("cumulative", "single"), "scope": ("all", "prompt", "generated")}


class SteeringScreen(StepScreen):
    NEEDS_SAES = True
    HELP = ("A plan adds s·v (add), rescales a feature's activation by r (rescale; r=0 removes it), sets it "
            "(clamp) or mean-ablates it, at every layer of l_start..l (cumulative) or only l (single). "
            "Each strength multiplies every coefficient; 0 is the unsteered baseline's twin. Steered "
            "completions are stored with their plan and never enter attribution.")
    BINDINGS = [
        Binding("ctrl+r", "run", "Run"),
        Binding("o", "cycle('op')", "Op"),
        Binding("k", "cycle('sched')", "Schedule"),
        Binding("m", "cycle('mode')", "Single/cumul."),
        Binding("p", "cycle('scope')", "Scope"),
        Binding("w", "sweep", "Sweep (judged)"),
        Binding("l", "latent", "Latent page"),
        Binding("v", "steering_set", "Steering set"),
        Binding("b", "back", "Back"),
    ]
    TABLE_ID = "plan"

    def __init__(self, session_id: int, source: object = None, op: str = "add", coefficient: str = "8",
                 run_id: int | None = None):
        """`source`: a PlanSource, or a whole SteeringPlan (see the module docstring); `run_id`: a stored
        steering run to show, with its plan and fields (the run history)."""
        from auditui.workflows.steer import PlanSource

        super().__init__(session_id)
        self.run_id = run_id
        self.source = source or PlanSource(steering_set=True)
        self.op, self.coefficient = op, coefficient
        self.shape = {"sched": "constant", "mode": "cumulative", "scope": "all"}
        if not isinstance(self.source, PlanSource):
            self.take_fields(self.source)

    def params(self) -> list[tuple]:
        prompts = self.store.prompts(self.session_id)
        prompt = prompts[-1]["text"] if prompts else ""
        return [("prompt", prompt, 22), ("op", self.op, 8), ("coef", self.coefficient, 4, "number"),
                ("strengths", "0 2 4 8", 9), ("sched", self.shape["sched"], 8), ("mode", self.shape["mode"], 8),
                ("scope", self.shape["scope"], 7), ("n", "2", 2, "integer"), ("max", "32", 3, "integer")]

    def take_fields(self, plan) -> None:  # type: ignore[no-untyped-def]
        """The fields' values for a whole plan: its first feature's op and coefficient, its shape."""
        first = plan.features[0]
        self.op, self.coefficient = first.op, f"{first.coefficient:g}"
        self.shape = {"sched": plan.schedule.kind, "mode": plan.mode, "scope": plan.scope}

    def use_plan(self, plan) -> None:  # type: ignore[no-untyped-def]
        """Steer with a whole plan from now on (a sweep's best strength), the fields showing it."""
        self.source = plan
        self.take_fields(plan)
        self.set_params({"op": self.op, "coef": self.coefficient, **self.shape})
        self.action_show_plan()

    @guarded
    def on_mount(self) -> None:
        self.title = "steering"
        self.table.add_columns("layer", "feature", "op", "coef", "schedule", "tokens")
        if self.run_id is not None:
            self.show_stored(self.run_id)
        self.action_show_plan()

    def show_stored(self, run_id: int) -> None:
        """A stored steering run: its plan and fields, its completions (tokens underlined once the model is up)."""
        from auditui.engine.steering import SteeringPlan

        run = self.store.run(run_id)
        if run["kind"] != "steer" or not run["result"]:
            raise AuditError(f"run {run_id} is not a stored steering run")
        params = run["params"]
        self.source = SteeringPlan.from_dict(params["plan"])
        self.take_fields(self.source)
        self.set_params({"op": self.op, "coef": self.coefficient, **self.shape, "prompt": params["prompt"],
                         "strengths": " ".join(f"{s:g}" for s in params["strengths"]), "n": str(params["n"]),
                         "max": str(params["params"]["max_new_tokens"])})
        if self.app.jobs.state.get("engine") is None:  # type: ignore[attr-defined]
            self.show_run((run, None))
            return

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.engine.labels import token_strings

            return run, [token_strings(self.engine(ctx).lm, s["token_ids"]) for s in run["result"]["samples"]]

        self.submit("steering run", job, on_done=self.show_run)

    # -- the plan ------------------------------------------------------------------------------
    def plan(self):  # type: ignore[no-untyped-def]
        from auditui.engine.steering import Schedule
        from auditui.workflows.steer import PlanSource, plan_for

        value = self.param_values()
        for name, allowed in CYCLES.items():
            if value[name] not in allowed:
                raise AuditError(f"{name} must be one of {', '.join(allowed)}")
        options = {"mode": value["mode"], "scope": value["scope"], "schedule": Schedule(value["sched"]),
                   "op": value["op"], "coefficient": float(parse_number(value["coef"], float, "coef", -1e4, 1e4))}
        if isinstance(self.source, PlanSource):
            return plan_for(self.store, self.session_id, self.source, **options)
        plan = self.source
        features = plan.features
        if (value["op"], value["coef"]) != (self.op, self.coefficient):  # edited: every feature takes them
            features = tuple(replace(f, op=options["op"], coefficient=options["coefficient"]) for f in features)
        schedule = plan.schedule if value["sched"] == plan.schedule.kind else options["schedule"]
        return replace(plan, features=features, mode=value["mode"], scope=value["scope"], schedule=schedule)

    def request(self):  # type: ignore[no-untyped-def]
        from auditui.engine.sampling import SamplingParams
        from auditui.workflows.steer import SteerRequest

        value = self.param_values()
        strengths = parse_numbers(value["strengths"], "strength", -1e4, 1e4)
        params = SamplingParams(max_new_tokens=int(parse_number(value["max"], int, "max", 1, 1024)))
        request = SteerRequest(self.plan(), value["prompt"], strengths, int(parse_number(value["n"], int, "n", 1, 64)),
                               params, seed=0)
        request.validate()
        return request

    @guarded
    def action_show_plan(self) -> None:
        plan = self.plan()

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.engine.labels import logit_lens_tokens

            engine = self.engine(ctx)
            lens = {}
            for f in plan.selected():
                if f.feature.site in engine.bank:
                    decoder = engine.bank.output_decoder(f.feature.site)[[f.feature.latent]]
                    lens[str(f.feature)] = logit_lens_tokens(engine.lm, decoder, k=4)[0]
            return plan, lens

        self.submit("steering plan", job, on_done=self.show_plan)

    def show_plan(self, result: tuple) -> None:
        plan, lens = result
        start, stop = plan.bounds
        self.rows = [f.to_dict() for f in plan.selected()]
        self.table.clear()
        for f in plan.selected():
            curve = [plan.schedule.value(f.coefficient, layer, start, stop) for layer in range(start, stop + 1)]
            self.table.add_row(str(f.layer), str(f.feature), f.op, f"{plan.coefficient(f):.3g}", sparkline(curve),
                               Text(" ".join(visible(t) for t in lens.get(str(f.feature), []))))
        self.title = f"steering · {len(self.rows)} features · layers {start}..{stop} · {visible(plan.source)}"

    @guarded
    def action_cycle(self, name: str) -> None:
        field = self.query_one(f"#param-{name}")
        options = CYCLES[name]
        field.value = options[(options.index(field.value) + 1) % len(options)] if field.value in options else options[0]
        self.action_show_plan()

    def on_input_submitted(self) -> None:
        self.action_show_plan()

    def action_steering_set(self) -> None:
        """View and edit the session's steering set; a plan over it is rebuilt on coming back."""
        from auditui.tui.screens.features import FeaturesScreen
        from auditui.workflows.steer import PlanSource

        def back(_result: object) -> None:
            if self.source == PlanSource(steering_set=True):
                self.action_show_plan()

        self.app.push_screen(FeaturesScreen(self.session_id), back)

    @guarded
    def action_sweep(self) -> None:
        from auditui.tui.screens.sweep import SweepScreen

        value = self.param_values()
        self.app.push_screen(SweepScreen(self.session_id, self.plan(), value["prompt"], value["max"]))

    # -- running -------------------------------------------------------------------------------
    @guarded
    def action_run(self) -> None:
        request = self.request()
        store, session_id = self.store, self.session_id

        def job(ctx):  # type: ignore[no-untyped-def]
            from auditui.engine.labels import token_strings
            from auditui.workflows.steer import steer

            engine = self.engine(ctx)
            run = store.run(steer(store, engine, session_id, request, ctx))
            pieces = [token_strings(engine.lm, s["token_ids"]) for s in run["result"]["samples"]]
            return run, pieces

        self.submit("steer", job, on_done=self.show_run)

    def show_run(self, result: tuple) -> None:
        """A steering run's completions by seed; `pieces`: their tokens (None: the texts, nothing underlined)."""
        run, pieces = result
        samples = run["result"]["samples"]
        marked = pieces is not None
        pieces = pieces if marked else [[s["text"]] for s in samples]
        text = Text(f"run {run['id']} ({run['status']}): {visible(run['summary']['headline'])}\n", style="bold")
        for seed in dict.fromkeys(s["seed"] for s in samples):
            text.append(f"\nseed {seed}\n", style="bold")
            for sample, tokens in zip(samples, pieces, strict=True):
                if sample["seed"] != seed:
                    continue
                label = "unsteered" if sample["strength"] is None else f"s={sample['strength']:g}"
                text.append(f"  {label:>9}: ", style="dim")
                steered = set(sample["steered_generated"]) if marked else set()
                for i, token in enumerate(tokens):
                    text.append(visible(token).replace("\n", "⏎"), style="underline" if i in steered else "")
                text.append("\n")
        self.show_detail(text)

    def action_latent(self) -> None:
        row = self.current()
        if row is not None:
            from auditui.tui.screens.latent import open_latent

            open_latent(self, self.session_id, row["feature"])
