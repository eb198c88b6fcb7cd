"""Steering: a plan over SAE features, the same prompt and seeds without and with it, side by side.

The plan comes from the screen that opened this one (an attribution run's top latents, a flow run's
graph) or from the session's steering set. Fields: the prompt, the operation and coefficient the
builders give every feature, the strengths (a grid, sampled as one batch), the schedule over
layers, single-layer vs cumulative, the token scope, samples per strength and new tokens. Ctrl+R
runs; the table lists the plan (scheduled coefficient per layer, a sparkline of the schedule over
the span, logit-lens tokens); the pane shows each seed's unsteered completion and its steered ones,
the steered generated tokens underlined.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding

from auditui.errors import AuditError
from auditui.text import visible
from auditui.tui.guard import guarded
from auditui.tui.screens.base import StepScreen
from auditui.tui.widgets.params import parse_number

BARS = "▁▂▃▄▅▆▇█"
CYCLES = {"op": ("add", "rescale", "clamp", "mean_ablate"), "sched": ("constant", "linear", "exponential"),
          "mode": ("cumulative", "single"), "scope": ("all", "prompt", "generated")}


def sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BARS[round((v - low) / span * (len(BARS) - 1))] for v in values)


class SteeringScreen(StepScreen):
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
        Binding("b", "back", "Back"),
    ]
    TABLE_ID = "plan"

    def __init__(self, session_id: int, source: object = None, op: str = "add", coefficient: str = "8"):
        from auditui.workflows.steer import PlanSource

        super().__init__(session_id)
        self.source = source or PlanSource(steering_set=True)
        self.op, self.coefficient = op, coefficient

    def params(self) -> list[tuple]:
        prompts = self.store.prompts(self.session_id)
        prompt = prompts[-1]["text"] if prompts else ""
        return [("prompt", prompt, 22), ("op", self.op, 8), ("coef", self.coefficient, 4, "number"),
                ("strengths", "0 2 4 8", 9), ("sched", "constant", 8), ("mode", "cumulative", 8), ("scope", "all", 7),
                ("n", "2", 2, "integer"), ("max", "32", 3, "integer")]

    def on_mount(self) -> None:
        self.title = "steering"
        self.table.add_columns("layer", "feature", "op", "coef", "schedule", "tokens")
        self.action_show_plan()

    # -- the plan ------------------------------------------------------------------------------
    def plan(self):  # type: ignore[no-untyped-def]
        from auditui.engine.steering import Schedule
        from auditui.workflows.steer import plan_for

        value = self.param_values()
        for name, allowed in CYCLES.items():
            if value[name] not in allowed:
                raise AuditError(f"{name} must be one of {', '.join(allowed)}")
        options = {"mode": value["mode"], "scope": value["scope"], "schedule": Schedule(value["sched"]),
                   "op": value["op"], "coefficient": float(parse_number(value["coef"], float, "coef", -1e4, 1e4))}
        return plan_for(self.store, self.session_id, self.source, **options)

    def request(self):  # type: ignore[no-untyped-def]
        from auditui.engine.sampling import SamplingParams
        from auditui.workflows.steer import SteerRequest

        value = self.param_values()
        strengths = tuple(float(parse_number(part, float, "strength", -1e4, 1e4)) for part in value["strengths"].split())
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
        run, pieces = result
        samples = run["result"]["samples"]
        text = Text(f"run {run['id']} ({run['status']}): {visible(run['summary']['headline'])}\n", style="bold")
        for seed in dict.fromkeys(s["seed"] for s in samples):
            text.append(f"\nseed {seed}\n", style="bold")
            for sample, tokens in zip(samples, pieces, strict=True):
                if sample["seed"] != seed:
                    continue
                label = "unsteered" if sample["strength"] is None else f"s={sample['strength']:g}"
                text.append(f"  {label:>9}: ", style="dim")
                steered = set(sample["steered_generated"])
                for i, token in enumerate(tokens):
                    text.append(visible(token).replace("\n", "⏎"), style="underline" if i in steered else "")
                text.append("\n")
        self.show_detail(text)
