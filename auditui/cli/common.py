"""Options shared by the headless commands, and the one way they print results."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from auditui.config import Settings, load_settings

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF id, local dir, .gguf, or smollm2")]
PackOpt = Annotated[str | None, typer.Option("--pack", "-p", help="SAE pack dir or name (demo)")]
SaeOpt = Annotated[list[str] | None, typer.Option(
    "--sae", help="extra SAE source: RELEASE[:ID_GLOB], hf:OWNER/REPO[/DIR], or a saved SAE dir")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
DbOpt = Annotated[str | None, typer.Option("--db", help="session database file (AUDITUI_DB)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


def settings_from(**flags: Any) -> Settings:
    return load_settings(**flags)


def sae_specs(settings: Settings, sae: list[str] | None) -> list[str]:
    """The pack (unless --pack '') plus any --sae sources."""
    return ([settings.pack] if settings.pack else []) + list(sae or [])


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """Print `data` as JSON (one document on stdout) or through `human`."""
    if as_json:
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        human(data)


def progress_printer(as_json: bool) -> Callable[[str], None]:
    """Progress lines go to stderr, so stdout stays clean JSON."""
    def say(message: str) -> None:
        typer.echo(f"... {message}", err=True)
    return say
