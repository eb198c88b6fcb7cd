"""`auditui pack build|info|list`: build the offline SAE pack, show its quality, list packs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from auditui.cli import app
from auditui.cli.common import (
    DbOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PackOpt,
    Printer,
    SessionOpt,
    emit,
    open_store,
    print_run,
    print_summary,
    settings_from,
)
from auditui.config import DEFAULT_PACK
from auditui.errors import AuditError

pack_app = typer.Typer(help="Build, inspect and list SAE packs (<cache>/packs/NAME).", no_args_is_help=True)
app.add_typer(pack_app, name="pack")

NameArg = Annotated[str, typer.Argument(help="pack name (demo = the offline SmolLM2 pack)")]


class StageBars:
    """The build's Progress: one rich bar per stage on stderr (a line every 30 s in a log file)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bars = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self.console, transient=False)
        self.tasks: dict[str, int] = {}
        self.logged: dict[str, float] = {}

    def should_stop(self) -> bool:
        return False

    def progress(self, done: float, total: float, stage: str = "") -> None:
        bars, console, tasks, logged = self.bars, self.console, self.tasks, self.logged
        if total == 0:
            bars.console.print(f"... {stage}", markup=False, highlight=False)
            return
        if not console.is_terminal and (time.monotonic() - logged.get(stage, -60) > 30 or done == total):
            logged[stage] = time.monotonic()  # a log file gets a line every 30 s instead of a bar
            bars.console.print(f"... {stage} {done:,}/{total:,}", markup=False, highlight=False)
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)


@pack_app.command("build")
def build(name: NameArg = DEFAULT_PACK, model: ModelOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
          quick: bool = typer.Option(False, "--quick", help="a small build of a block of layers (tests, trials)"),
          layers: str | None = typer.Option(None, "--layers", help="contiguous block A-B (default: all; --quick: 12-13)"),
          kinds: str | None = typer.Option(None, "--kinds", help="SAEs of each layer: resid_post,attn_out,mlp_out (default all)"),
          tokens: int | None = typer.Option(None, "--tokens", help="training tokens per SAE (upper bound)"),
          minutes: float | None = typer.Option(None, "--minutes", help="wall-clock budget of a CPU build (0 = no limit)"),
          width: int | None = typer.Option(None, "--width", help="latents per SAE (d_sae)"),
          k: int | None = typer.Option(None, "--k", help="active latents per token (TopK)"),
          batch: int | None = typer.Option(None, "--batch", help="tokens per SAE training step"),
          corpus: Path | None = typer.Option(None, "--corpus", help="train on the text files under DIR instead"),
          force: bool = typer.Option(False, "--force", help="rebuild even if the pack is complete"),
          as_json: JsonOpt = False) -> None:
    """Build (or resume) a pack: TopK SAEs on every resid/attn/mlp site (or --kinds), trained in one model pass."""
    started = time.perf_counter()  # the budget counts from here: loading the model is part of it
    from auditui.engine.corpus import DEFAULT_SOURCES, folder_sources
    from auditui.engine.packs import BuildPlan, build_pack, parse_kinds, parse_layers, quick_plan
    from auditui.engine.saes import check_pack_name

    check_pack_name(name)
    settings = settings_from(model=model, device=device, dtype=dtype)
    plan = quick_plan(name, settings.model) if quick else BuildPlan(name=name, model=settings.model)
    overrides = {"layers": parse_layers(layers) if layers else None, "kinds": parse_kinds(kinds) if kinds else None,
                 "train_tokens": tokens, "build_minutes": minutes, "d_sae": width, "k": k, "batch_tokens": batch}
    plan = replace(plan, **{key: value for key, value in overrides.items() if value is not None})
    if plan.batch_tokens < 1 or plan.train_tokens < plan.batch_tokens or not 1 <= plan.k <= plan.d_sae:
        raise AuditError("need 1 <= --batch <= --tokens and 1 <= --k <= --width")
    if plan.build_minutes < 0:
        raise AuditError("--minutes must be 0 (no limit) or more")
    from auditui.engine.model import resolve_device
    from auditui.pack_build import StatusFile, build_lock

    sources = folder_sources(corpus) if corpus else DEFAULT_SOURCES
    bars = StageBars()
    budget = 60 * plan.build_minutes if resolve_device(settings.device).type == "cpu" else 0.0
    with build_lock(settings.cache_path, name), bars.bars:
        status = StatusFile(settings.cache_path, name, bars, budget)
        try:
            path = build_pack(plan, settings.cache_path, settings.device, settings.dtype, status, sources, force,
                              started=started)
        except BaseException as exc:
            status.finish(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        status.finish()
    emit(pack_info_data(str(path), settings.cache_path), as_json, _print_info)


@pack_app.command("status")
def status(name: NameArg = DEFAULT_PACK, as_json: JsonOpt = False) -> None:
    """What a pack build (running, or the last one) is doing and when the pack will be ready."""
    from dataclasses import asdict

    from auditui.pack_build import read_status

    settings = settings_from()
    found = read_status(settings.cache_path, name)
    if found is None:
        raise AuditError(f"no build of pack {name} is on record; start one with: auditui pack build {name}")
    emit({**asdict(found), "line": found.line(), "eta_seconds": found.eta(time.time())}, as_json,
         lambda data: Console().print(data["line"], markup=False, highlight=False))


def pack_info_data(name: str, cache_dir: Path) -> dict:
    from auditui.engine.packs import pack_info
    from auditui.engine.saes import read_pack, resolve_pack_dir

    return pack_info(read_pack(resolve_pack_dir(name, cache_dir)))


def _print_info(data: dict) -> None:
    print_summary(data["summary"])


@pack_app.command("info")
def info(name: NameArg = DEFAULT_PACK, as_json: JsonOpt = False) -> None:
    """A pack's SAEs with their quality (variance explained, L0, dead latents, spliced-in loss)."""
    settings = settings_from()
    emit(pack_info_data(name, settings.cache_path), as_json, _print_info)


@pack_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Packs under the cache dir, complete, being built, or left partial by an interrupted build."""
    from auditui.engine.packs import list_packs
    from auditui.pack_build import is_building

    settings = settings_from()
    rows = list_packs(settings.cache_path)
    for row in rows:
        if row["status"] == "partial" and is_building(settings.cache_path, row["name"]):
            row["status"] = "building"

    def human(items: list[dict]) -> None:
        if not items:
            Console().print(f"no packs under {settings.cache_path / 'packs'}; run: auditui pack build demo",
                            markup=False)
            return
        table = Table("name", "status", "kind", "SAEs", "MiB", "path", box=None)
        for row in items:
            table.add_row(Text(row["name"]), row["status"] + (" (resumable)" if row.get("resumable") else ""),
                          row.get("kind", "-"), str(row.get("saes", "-")), f"{row['bytes'] / 2**20:.0f}", Text(row["path"]))
        Console().print(table)
    emit(rows, as_json, human)


@pack_app.command("targeted")
def targeted(name: Annotated[str, typer.Argument(help="name of the new pack (a folder under <cache>/packs)")],
             sites: Annotated[list[str], typer.Option("--sites", help="LAYER/KIND sites, comma-separated or repeated")],
             base: Annotated[str | None, typer.Option("--base", help="pack whose corpus is mixed in (default: --pack)")] = None,
             share: Annotated[float, typer.Option("--share", help="share of the training tokens from the session")] = 0.8,
             tokens: Annotated[int, typer.Option("--tokens", help="training tokens per SAE")] = 150_000,
             minutes: Annotated[float, typer.Option("--minutes", help="wall-clock budget on CPU (0 = none)")] = 0.0,
             width: Annotated[int, typer.Option("--width", help="latents per SAE (d_sae)")] = 512,
             k: Annotated[int, typer.Option("--k", help="active latents per token (TopK)")] = 16,
             seed: Annotated[int, typer.Option("--seed")] = 0,
             force: Annotated[bool, typer.Option("--force", help="replace a pack of that name")] = False,
             session_id: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, device: DeviceOpt = None,
             dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """A targeted dictionary: SAEs at SITES trained on the session's texts plus a slice of a pack's corpus;
    use it with --pack NAME (attribute, flow, steer...) beside the base pack."""
    from auditui.engine.model import load_model
    from auditui.engine.sites import Site
    from auditui.pack_build import build_lock
    from auditui.workflows.targeted import TargetedRequest, build_targeted

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = TargetedRequest(name=name, sites=tuple(Site.parse(t) for item in sites for t in item.split(",") if t.strip()),
                              base_pack=base or settings.pack, d_sae=width, k=k, train_tokens=tokens, minutes=minutes,
                              share=share, seed=seed, force=force)
    request.validate(settings.cache_path)
    with open_store(db) as store:
        sid = store.resolve_session(session_id)
        lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_path, Printer())
        bars = StageBars()
        with build_lock(settings.cache_path, name), bars.bars:
            run_id = build_targeted(store, lm, sid, request, settings.cache_path, bars)
        data = store.run(run_id)
    emit({"run_id": run_id, "session_id": sid, "status": data["status"], "params": data["params"],
          "summary": data["summary"], "result": data["result"]}, as_json, print_run)
