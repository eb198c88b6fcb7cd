"""`auditui pack build|info|list`: build the offline SAE pack, show its quality, list packs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from auditui.cli import app
from auditui.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, emit, print_summary, settings_from
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
          tokens: int | None = typer.Option(None, "--tokens", help="training tokens per SAE (upper bound)"),
          minutes: float | None = typer.Option(None, "--minutes", help="wall-clock budget of a CPU build (0 = no limit)"),
          width: int | None = typer.Option(None, "--width", help="latents per SAE (d_sae)"),
          k: int | None = typer.Option(None, "--k", help="active latents per token (TopK)"),
          batch: int | None = typer.Option(None, "--batch", help="tokens per SAE training step"),
          force: bool = typer.Option(False, "--force", help="rebuild even if the pack is complete"),
          as_json: JsonOpt = False) -> None:
    """Build (or resume) a pack: TopK SAEs on every resid/attn/mlp site, trained in one model pass."""
    from auditui.engine.packs import BuildPlan, build_pack, parse_layers, quick_plan
    from auditui.engine.saes import check_pack_name

    check_pack_name(name)
    settings = settings_from(model=model, device=device, dtype=dtype)
    plan = quick_plan(name, settings.model) if quick else BuildPlan(name=name, model=settings.model)
    overrides = {"layers": parse_layers(layers) if layers else None, "train_tokens": tokens,
                 "build_minutes": minutes, "d_sae": width, "k": k, "batch_tokens": batch}
    plan = replace(plan, **{key: value for key, value in overrides.items() if value is not None})
    if plan.batch_tokens < 1 or plan.train_tokens < plan.batch_tokens or not 1 <= plan.k <= plan.d_sae:
        raise AuditError("need 1 <= --batch <= --tokens and 1 <= --k <= --width")
    if plan.build_minutes < 0:
        raise AuditError("--minutes must be 0 (no limit) or more")
    progress = StageBars()
    with progress.bars:
        path = build_pack(plan, settings.cache_path, settings.device, settings.dtype, progress, force=force)
    emit(pack_info_data(str(path), settings.cache_path), as_json, _print_info)


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
    """Packs under the cache dir, complete or left partial by an interrupted build."""
    from auditui.engine.packs import list_packs

    settings = settings_from()
    rows = list_packs(settings.cache_path)

    def human(items: list[dict]) -> None:
        if not items:
            Console().print(f"no packs under {settings.cache_path / 'packs'}; run: auditui pack build demo",
                            markup=False)
            return
        table = Table("name", "status", "SAEs", "MiB", "path", box=None)
        for row in items:
            table.add_row(row["name"], row["status"] + (" (resumable)" if row.get("resumable") else ""),
                          str(row.get("saes", "-")), f"{row['bytes'] / 2**20:.0f}", row["path"])
        Console().print(table)
    emit(rows, as_json, human)
