"""`auditui session new|list|show|rename|reference|delete`, `auditui sample`, `auditui label`, `auditui report`.

Each acts on the most recent session of the database unless `--session ID` is given. Model text
is printed with plain echo (never through Rich markup).
"""

from __future__ import annotations

import sys
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
    SessionOpt,
    emit,
    open_store,
    settings_from,
)
from auditui.errors import AuditError
from auditui.text import one_line, visible

session_app = typer.Typer(help="Create, list, show, rename and delete sessions.", no_args_is_help=True)
app.add_typer(session_app, name="session")


def _short(text: str, width: int = 72) -> str:
    line = " ".join(visible(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- session ------------------------------------------------------------------------------------
def _checked_models(spec: str, model: str | None, device: str | None, dtype: str | None, db: str | None):
    """(audited, reference) loaded with the settings and checked against each other, before the DB opens."""
    from auditui.workflows.diffing import load_models

    return load_models(settings_from(model=model, device=device, dtype=dtype, db=db), spec, Printer())


def _reference_line(s: dict) -> str:
    return f" (reference model {visible(s['reference_model'])})" if s.get("reference_model") else ""


@session_app.command("new")
def session_new(name: str, reference_model: ReferenceModelOpt = None, model: ModelOpt = None,
                device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Create a session (it becomes the most recent one), optionally naming a reference model."""
    from auditui.workflows.diffing import set_reference_model

    models = _checked_models(reference_model, model, device, dtype, db) if reference_model else None
    with open_store(db) as store:
        session_id = store.create_session(name)
        if models is not None:
            set_reference_model(store, session_id, *models, reference_model)
        session = store.session(session_id)
    emit(session, as_json, lambda s: typer.echo(f"created session {s['id']}: {visible(s['name'])}{_reference_line(s)}"))


@session_app.command("reference")
def session_reference(session_id: int, reference_model: Annotated[str | None, typer.Argument(
                          metavar="MODEL", help="HF id, local dir or .gguf with the audited model's tokenizer and width")] = None,
                      clear: Annotated[bool, typer.Option("--clear", help="name no reference model")] = False,
                      model: ModelOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None,
                      as_json: JsonOpt = False) -> None:
    """Name the reference model of a session (checked against the audited --model), or --clear it."""
    from auditui.workflows.diffing import set_reference_model

    if clear == bool(reference_model):
        raise AuditError("give a reference MODEL or --clear")
    with open_store(db) as store:
        store.session(session_id)  # an unknown session is refused before any model loads
    models = _checked_models(reference_model, model, device, dtype, db) if reference_model else None
    with open_store(db) as store:
        if models is None:
            store.touch_session(session_id, reference_model=None)
        else:
            set_reference_model(store, session_id, *models, reference_model)
        session = store.session(session_id)
    emit(session, as_json, lambda s: typer.echo(f"session {s['id']}: {visible(s['name'])}"
                                                f"{_reference_line(s) or ' (no reference model)'}"))


@session_app.command("list")
def session_list(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Sessions, most recently used first."""
    with open_store(db) as store:
        rows = store.sessions()

    def human(sessions: list[dict]) -> None:
        if not sessions:
            typer.echo("no sessions yet; create one with: auditui session new NAME")
        for s in sessions:
            typer.echo(f"{s['id']:>4}  {_short(s['name'], 40):<40}  {s['n_prompts']:>3} prompts  "
                       f"{s['n_completions']:>4} completions  {s['n_runs']:>3} runs")
    emit(rows, as_json, human)


def _print_session(data: dict) -> None:
    s = data["session"]
    typer.echo(f"session {s['id']}: {visible(s['name'])} (model {s['model_id'] or '-'}, pack {s['pack_id'] or '-'})"
               f"{_reference_line(s)}")
    for prompt in data["prompts"]:
        typer.echo(f"prompt {prompt['id']}: {_short(prompt['text'])}")
        for c in prompt["completions"]:
            typer.echo(f"  #{c['id']:<5} {c['label']:<10} seed {c['seed']:<11} {c['finish_reason']:<6} "
                       f"{_short(c['text'], 48)}")
    for pair in data["pairs"]:
        typer.echo(f"pair on prompt {pair['prompt_id']}: +{pair['positive']} -{pair['negative']}")
    for run in data["runs"]:
        headline = (run["summary"] or {}).get("headline", "") if isinstance(run["summary"], dict) else ""
        typer.echo(f"run {run['id']}: {run['kind']} ({run['status']}) {headline}")


@session_app.command("show")
def session_show(session_id: Annotated[int | None, typer.Argument(help="default: the most recent")] = None,
                 db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """A session's prompts, completions (labels, seeds), pairs and runs."""
    from auditui.store.reports import session_data

    with open_store(db) as store:
        data = session_data(store, store.resolve_session(session_id))
    emit(data, as_json, _print_session)


@session_app.command("rename")
def session_rename(session_id: int, name: str, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Rename a session."""
    with open_store(db) as store:
        store.rename_session(session_id, name)
        session = store.session(session_id)
    emit(session, as_json, lambda s: typer.echo(f"renamed session {s['id']} to {visible(s['name'])}"))


@session_app.command("delete")
def session_delete(session_id: int, yes: Annotated[bool, typer.Option("--yes", help="really delete it")] = False,
                   db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Delete a session and everything in it (needs --yes)."""
    with open_store(db) as store:
        session = store.session(session_id)
        if not yes:
            raise AuditError(f"deleting session {session_id} ({one_line(session['name'])}) loses its prompts, completions "
                             "and runs; pass --yes to confirm")
        store.delete_session(session_id)
    emit({"deleted": session_id}, as_json, lambda _d: typer.echo(f"deleted session {session_id}"))


# -- sample -------------------------------------------------------------------------------------
def _print_samples(result: dict) -> None:
    typer.echo(f"prompt {result['prompt_id']} in session {result['session_id']} (seed {result['seed']})")
    for c in result["completions"]:
        typer.echo(f"\n#{c['id']} seed {c['seed']} ({c['finish_reason']}, {len(c['token_ids'])} tokens)")
        typer.echo(visible(c["text"]))


@app.command()
def sample(prompt: Annotated[str, typer.Option("--prompt", help="the user prompt")],
           n: Annotated[int, typer.Option("-n", help="number of completions")] = 8,
           temperature: Annotated[float, typer.Option(help="0 = greedy")] = 1.0,
           top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
           max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
           seed: Annotated[int | None, typer.Option(help="completion i gets seed+i (default random)")] = None,
           batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
           raw: Annotated[bool, typer.Option("--raw", help="no chat template")] = False,
           system: Annotated[str | None, typer.Option(help="system prompt (chat template only)")] = None,
           session: SessionOpt = None, db: DbOpt = None, model: ModelOpt = None, pack: PackOpt = None,
           device: DeviceOpt = None, dtype: DtypeOpt = None, as_json: JsonOpt = False) -> None:
    """Sample N completions of a prompt into the session (each reproducible from its seed)."""
    from auditui.engine.model import load_model
    from auditui.engine.sampling import SamplingParams, check_counts, random_seed
    from auditui.workflows.engine import pack_label
    from auditui.workflows.sample import SampleRequest, check_sample_count
    from auditui.workflows.sample import sample as sample_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            chat=False if raw else None, system=system)
    seed = random_seed() if seed is None else seed
    check_counts(n, seed, batch_size)
    check_sample_count(n, batch_size)
    with open_store(db) as store:
        session_id = store.resolve_session(session)
        printer = Printer()
        lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_path, printer)
        done = sample_workflow(store, lm, session_id, SampleRequest(prompt, n, params, seed, batch_size), printer,
                               pack_id=pack_label(settings))
        completions = store.completions_by_ids(done.completion_ids)
    result = {"session_id": session_id, "prompt_id": done.prompt_id, "seed": seed, "model_id": lm.model_id,
              "run_id": done.run_id,
              "completions": [{key: c[key] for key in ("id", "seed", "finish_reason", "text", "token_ids")}
                              for c in completions]}
    emit(result, as_json, _print_samples)


# -- label, report ------------------------------------------------------------------------------
@app.command()
def label(completion_id: int, value: Annotated[str, typer.Argument(metavar="pos|neg|none")],
          session: SessionOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Label a completion positive, negative or none (completion ids are unique in the database)."""
    with open_store(db) as store:
        completion = store.completion(completion_id)
        if session is not None and completion["session_id"] != store.resolve_session(session):
            raise AuditError(f"completion {completion_id} belongs to session {completion['session_id']}, "
                             f"not {session}")
        store.set_label(completion_id, value)
        completion = store.completion(completion_id)
        pairs = store.pairs(completion["session_id"])
    result = {"completion_id": completion_id, "label": completion["label"], "pairs": pairs}
    emit(result, as_json, lambda r: typer.echo(f"#{r['completion_id']} is {r['label']}; "
                                               f"{len(r['pairs'])} prompt(s) with a pair"))


@app.command()
def report(fmt: Annotated[str, typer.Option("--format", "-f", help="md | html | json")] = "md",
           out: Annotated[Path | None, typer.Option("--out", "-o", help="write to this file")] = None,
           session: SessionOpt = None, db: DbOpt = None) -> None:
    """The session's report: prompts, completions, labels, pairs and every run's results."""
    from auditui.store.reports import render_report, write_export

    with open_store(db) as store:
        text = render_report(store, store.resolve_session(session), fmt)
        database = store.path
    if out is None:
        sys.stdout.write(text)  # model text in it is already shown as visible escapes
        return
    typer.echo(f"wrote {write_export(out, text, fmt, database)}", err=True)
