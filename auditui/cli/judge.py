"""`auditui judge grade|serve|rubrics`, `auditui sweep`, `auditui validate`: LLM-judge grading.

    auditui judge grade [--completion ID ...] --subject "the behaviour" [--rubric NAME|FILE.toml]
                        [--label-threshold 0.5] [--judge-url URL --judge-model M] [--concurrency 8] [--json]
    auditui judge serve [--port 8765] [--judge-model NAME] [--echo]   a local judge on loopback (llm-katan)
    auditui judge rubrics                                           the rubrics found, built-in and yours
    auditui sweep  <plan options> --prompt P --subject S --strength 2 --strength 4 [-n 8] [--band 8]
                   [--direction toward|away] [--compare-layers] [--on audited|reference] [--plot FILE.svg] [--json]
    auditui validate --from-attribution RUN --prompt P --subject S [--k 10] [--strength 4] [--band 8] [--reference]

The judge is any OpenAI-compatible endpoint (`--judge-url`, else judge_base_url in the config or
AUDITUI_JUDGE_BASE_URL); its key is read from AUDITUI_JUDGE_KEY or OPENAI_API_KEY and never stored.
Every result says which judge graded, and the share of texts it could not score.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from auditui.cli import app
from auditui.cli.common import (
    DbOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PackOpt,
    Printer,
    ReferenceModelOpt,
    SaeOpt,
    SessionOpt,
    emit,
    engine_for,
    open_store,
    print_run,
    settings_from,
)
from auditui.cli.plans import (
    AlphaOpt,
    CoefficientOpt,
    EndOpt,
    FeaturesOpt,
    FoldOpt,
    FromAttributionOpt,
    FromFlowOpt,
    FromSetOpt,
    LayerOpt,
    MaxNewOpt,
    ModeOpt,
    OnOpt,
    OpOpt,
    PlanFileOpt,
    PromptOpt,
    RawOpt,
    ScheduleOpt,
    ScopeOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    TopOpt,
    TopPOpt,
    plan_from,
    sampling_from,
    steered_settings,
)
from auditui.text import visible

judge_app = typer.Typer(help="grade texts with an LLM judge; serve a local one", no_args_is_help=True)
app.add_typer(judge_app, name="judge")

UrlOpt = Annotated[str | None, typer.Option("--judge-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8765/v1")]
JudgeModelOpt = Annotated[str | None, typer.Option("--judge-model", help="the judge model's name at that endpoint")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="judge calls in flight at once")]
RubricOpt = Annotated[str, typer.Option("--rubric", help="a rubric name (auditui judge rubrics) or a .toml file")]
SubjectOpt = Annotated[list[str] | None, typer.Option("--subject", help="the behaviour or topic graded (repeatable)")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="also write the curves as an SVG file")]
DEFAULT_PORT = 8765


def _judge(settings, url: str | None, model: str | None, concurrency: int):  # type: ignore[no-untyped-def]
    from auditui.judge.client import Judge
    from auditui.workflows.judge import judge_config

    return Judge(judge_config(settings, url, model, concurrency=concurrency))


def _show(data: dict, as_json: bool) -> None:
    emit(data, as_json, print_run)


def _check_plot(path: Path | None, db: str | None) -> None:
    from auditui.store.reports import check_export

    if path is not None:
        check_export(path, "svg", Path(settings_from(db=db).db))


def _plot(path: Path | None, kind: str, result: dict, db: str | None) -> None:
    if path is None:
        return
    from auditui.store.plots import sweep_svg, validate_svg
    from auditui.store.reports import write_export

    write_export(path, (sweep_svg if kind == "sweep" else validate_svg)(result), "svg", Path(settings_from(db=db).db))
    typer.echo(f"wrote {visible(str(path))}", err=True)


def _run_output(store, run_id: int, session_id: int) -> dict:  # type: ignore[no-untyped-def]
    run = store.run(run_id)
    return {"run_id": run_id, "session_id": session_id, "status": run["status"], "params": run["params"],
            "summary": run["summary"], "result": run["result"]}


@judge_app.command("grade")
def grade(completion: Annotated[list[int] | None, typer.Option("--completion", help="completion id (repeatable; "
                                                                                   "default: every one)")] = None,
          rubric: RubricOpt = "behaviour", subject: SubjectOpt = None,
          label_threshold: Annotated[float | None, typer.Option(
              "--label-threshold", help="also label: positive when behaviour >= T (0..1), as the judge")] = None,
          judge_url: UrlOpt = None, judge_model: JudgeModelOpt = None, concurrency: ConcurrencyOpt = 4,
          session: SessionOpt = None, model: ModelOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
          db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Grade a session's completions; with their perplexity and repetition rate."""
    from auditui.workflows.engine import open_engine
    from auditui.workflows.judge import Grading, JudgeRequest, judge_run

    settings = settings_from(model=model, device=device, dtype=dtype, db=db)
    request = JudgeRequest(Grading.named(rubric, tuple(subject or ())), tuple(completion or ()), label_threshold)
    request.validate()
    judge = _judge(settings, judge_url, judge_model, concurrency)
    with open_store(db) as store:
        session_id = store.resolve_session(session)
        engine = open_engine(settings, [], Printer())  # the model only: perplexity needs no SAE
        _show(_run_output(store, judge_run(store, engine, session_id, request, judge, Printer()), session_id), as_json)


@judge_app.command("rubrics")
def rubrics(as_json: JsonOpt = False) -> None:
    """The rubrics found: built-in ones and yours (beside config.toml, in rubrics/)."""
    from auditui.judge.rubrics import read_rubric_file
    from auditui.workflows.judge import known_rubrics

    found = {name: read_rubric_file(path) for name, path in known_rubrics().items()}
    data = [{"name": name, "description": r.description, "file": str(r.source),
             "scores": [s.name for s in r.scales]} for name, r in found.items()]
    emit(data, as_json, lambda rows: [typer.echo(visible(f"{r['name']:<20} {r['description']}")) for r in rows])


@judge_app.command("serve")
def serve(port: Annotated[int, typer.Option("--port", help="loopback port")] = DEFAULT_PORT,
          judge_model: JudgeModelOpt = None,
          echo: Annotated[bool, typer.Option("--echo", help="llm-katan's echo backend (no model; tests)")] = False,
          model: ModelOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None) -> None:
    """Serve a local model as an OpenAI-compatible judge on 127.0.0.1 (llm-katan, transformers backend)."""
    from auditui.judge.local import katan_args
    from auditui.workflows.judge import local_judge_model_dir

    settings = settings_from(model=model, device=device, dtype=dtype)
    source = "echo" if echo else str(local_judge_model_dir(settings, Printer()))
    name = judge_model or ("echo" if echo else f"local-{Path(source).name}")  # the cache is keyed by this name
    args = katan_args(source, name, port, "echo" if echo else "transformers",
                      "cuda" if settings.device.startswith("cuda") else "cpu",
                      stats_file=settings.cache_path / "judge-server-stats.json")
    typer.echo(f"judge: http://127.0.0.1:{port}/v1 model {visible(name)} (Ctrl-C stops); use it with\n"
               f"  export AUDITUI_JUDGE_BASE_URL=http://127.0.0.1:{port}/v1 AUDITUI_JUDGE_MODEL={visible(name)}", err=True)
    # The server replaces this process: a signal (Ctrl-C, a terminate) reaches it, nothing is left behind.
    os.execve(args[0], args, {**os.environ, "HF_HUB_OFFLINE": "1"})


@app.command()
def sweep(prompt: PromptOpt, subject: SubjectOpt = None, rubric: RubricOpt = "behaviour",
          plan_file: PlanFileOpt = None, from_flow: FromFlowOpt = None, from_attribution: FromAttributionOpt = None,
          top: TopOpt = 10, from_set: FromSetOpt = False, features: FeaturesOpt = None, op: OpOpt = None,
          coefficient: CoefficientOpt = None, mode: ModeOpt = "cumulative", layer: LayerOpt = None,
          schedule: ScheduleOpt = "constant", end: EndOpt = 1.0, alpha: AlphaOpt = -0.05, fold: FoldOpt = False,
          scope: ScopeOpt = "all",
          strength: Annotated[list[float] | None, typer.Option("--strength", help="repeatable; 0 is always added")] = None,
          n: Annotated[int, typer.Option("-n", help="samples per strength")] = 8,
          band: Annotated[int, typer.Option("--band", help="random plans of the same shape (the band)")] = 8,
          band_seed: Annotated[int, typer.Option("--band-seed")] = 0,
          direction: Annotated[str, typer.Option("--direction", help="toward | away (b·c or (1-b)·c)")] = "toward",
          compare_layers: Annotated[bool, typer.Option("--compare-layers", help="single vs cumulative per layer")] = False,
          seed: SeedOpt = None, max_new_tokens: MaxNewOpt = 48, temperature: TemperatureOpt = 1.0, top_p: TopPOpt = 0.95,
          raw: RawOpt = False, system: SystemOpt = None, plot: PlotOpt = None, on: OnOpt = "audited",
          reference_model: ReferenceModelOpt = None,
          judge_url: UrlOpt = None, judge_model: JudgeModelOpt = None, concurrency: ConcurrencyOpt = 4,
          session: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
          device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Sweep a plan's strength, judged, against a band of random plans of the same shape."""
    from auditui.workflows.judge import Grading
    from auditui.workflows.sweep import SweepRequest
    from auditui.workflows.sweep import sweep as sweep_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    grading = Grading.named(rubric, tuple(subject or ()))
    _check_plot(plot, db)
    judge = _judge(settings, judge_url, judge_model, concurrency)
    with open_store(db) as store:
        session_id = store.resolve_session(session)
        plan = plan_from(store, session_id, plan_file, from_flow, from_attribution, top, from_set, features, op,
                         coefficient, mode, layer, schedule, end, alpha, fold, scope)
        request = SweepRequest(plan, prompt, grading, tuple(strength or (1.0, 2.0, 4.0, 8.0)), n,
                               sampling_from(temperature, top_p, max_new_tokens, raw, system), seed, band, direction,
                               compare_layers, band_seed, on)
        request.validate()  # before the model loads, and before --reference-model is recorded
        settings, on = steered_settings(store, session_id, settings, on, reference_model)
        request = replace(request, on=on)
        engine = engine_for(settings, sae)
        out = _run_output(store, sweep_workflow(store, engine, session_id, request, judge, Printer()), session_id)
    _plot(plot, "sweep", out["result"], db)
    _show(out, as_json)


@app.command()
def validate(prompt: PromptOpt, from_attribution: Annotated[int, typer.Option("--from-attribution",
                                                                              help="an attribution run id")],
             subject: SubjectOpt = None, rubric: RubricOpt = "behaviour",
             site: Annotated[str | None, typer.Option("--site", help="a site of the run (default: its first)")] = None,
             k: Annotated[int, typer.Option("--k", help="top latents of each set")] = 10,
             strength: Annotated[float, typer.Option("--strength", help="s: add +s (toward) and -s (away), folded")] = 4.0,
             n: Annotated[int, typer.Option("-n", help="samples per latent and direction")] = 4,
             band: Annotated[int, typer.Option("--band", help="random latents (the band)")] = 8,
             band_seed: Annotated[int, typer.Option("--band-seed")] = 0,
             seed: SeedOpt = None, max_new_tokens: MaxNewOpt = 48, temperature: TemperatureOpt = 1.0,
             top_p: TopPOpt = 0.95, raw: RawOpt = False, system: SystemOpt = None, plot: PlotOpt = None,
             reference: Annotated[bool, typer.Option("--reference", help="steer toward on the session's reference "
                                                                         "model, away on the audited one")] = False,
             judge_url: UrlOpt = None, judge_model: JudgeModelOpt = None, concurrency: ConcurrencyOpt = 4,
             session: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
             device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Steer each top Δ-attribution and Δ-activation latent alone; count those leaving the random band."""
    from auditui.workflows.judge import Grading
    from auditui.workflows.validate import ValidateRequest
    from auditui.workflows.validate import validate as validate_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = ValidateRequest(from_attribution, prompt, Grading.named(rubric, tuple(subject or ())), site, k, strength,
                              n, band, sampling_from(temperature, top_p, max_new_tokens, raw, system), seed, band_seed)
    request.validate()
    _check_plot(plot, db)
    judge = _judge(settings, judge_url, judge_model, concurrency)
    with open_store(db) as store:
        session_id = store.resolve_session(session)
        other = engine_for(steered_settings(store, session_id, settings, "reference")[0], sae) if reference else None
        engine = engine_for(settings, sae)
        out = _run_output(store, validate_workflow(store, engine, session_id, request, judge, Printer(), other),
                          session_id)
    _plot(plot, "validate", out["result"], db)
    _show(out, as_json)
