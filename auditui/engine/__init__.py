"""The auditui engine: torch / transformers / sae-lens only (never Textual or Rich live views).

`Engine` bundles what every step needs: the settings, the loaded model and its SAE bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from auditui.config import Settings
from auditui.engine.model import LoadedModel, Progress, load_model
from auditui.engine.saes import SAEBank
from auditui.errors import AuditError


@dataclass
class Engine:
    settings: Settings
    lm: LoadedModel
    bank: SAEBank

    @property
    def pack_id(self) -> str:
        pack = self.bank.pack
        return pack.name if pack else ",".join(sorted({s.label for s in self.bank.sources.values()}))[:200]


def open_engine(settings: Settings, saes: list[str] | None = None, progress: Progress | None = None,
                strict: bool = True) -> Engine:
    """Load the settings' model, then its SAEs (`saes` or the settings' pack), checked against it.

    `strict=False` keeps the model when the SAEs cannot be used: the engine gets an empty bank whose
    `warnings` say why (the TUI can still sample without SAEs).
    """
    lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_path, progress)
    specs = saes if saes is not None else ([settings.pack] if settings.pack else [])
    try:
        bank = SAEBank.from_specs(specs, Path(settings.cache_dir), device=lm.device, model=lm.model).attach(lm)
    except AuditError as exc:
        if strict:
            raise
        bank = SAEBank([], device=lm.device)
        bank.warnings.append(str(exc))
    return Engine(settings=settings, lm=lm, bank=bank)
