"""Open the engine the settings name: the model, then its SAEs checked against it.

Both faces load through here, and both record the same pack label (`pack_label`) on what they store.
"""

from __future__ import annotations

from pathlib import Path

from auditui.config import Settings
from auditui.engine import Engine
from auditui.engine.model import load_model
from auditui.engine.saes import SAEBank, read_pack, resolve_pack_dir
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress


def sae_specs(settings: Settings, extra: list[str] | None = None) -> list[str]:
    """The settings' pack (unless it is "") plus any extra SAE sources."""
    return ([settings.pack] if settings.pack else []) + list(extra or [])


def open_engine(settings: Settings, saes: list[str] | None = None, progress: Progress = QUIET,
                strict: bool = True) -> Engine:
    """Load the settings' model, then `saes` (default: the settings' pack), checked against it.

    `strict=False` keeps the model when the SAEs cannot be used: the engine gets an empty bank whose
    `warnings` say why (the TUI can still sample without SAEs).
    """
    lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_path, progress)
    specs = sae_specs(settings) if saes is None else saes
    try:
        bank = SAEBank.from_specs(specs, Path(settings.cache_dir), device=lm.device, model=lm.model).attach(lm)
    except AuditError as exc:
        if strict:
            raise
        bank = SAEBank([], device=lm.device)
        bank.warnings.append(str(exc))
    return Engine(lm=lm, bank=bank, cache_dir=settings.cache_path)


def pack_label(settings: Settings) -> str:
    """The name in the manifest of the settings' pack; "" when there is none or it cannot be read.

    Sampling records it on completions without loading any SAE."""
    if not settings.pack:
        return ""
    try:
        return read_pack(resolve_pack_dir(settings.pack, settings.cache_path)).name
    except AuditError:
        return ""
