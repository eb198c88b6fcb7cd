"""The auditui engine: torch / transformers / sae-lens only. Pure methods: token sequences, plans and
tensors in, typed results out; it never reads the session store or the user's settings.

`Engine` bundles what most steps need: the loaded model, its SAE bank, and the cache folder for
derived artefacts (transition tables, head SVDs). `auditui.workflows.engine.open_engine` builds one
from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from auditui.engine.model import LoadedModel
from auditui.engine.saes import SAEBank


@dataclass
class Engine:
    lm: LoadedModel
    bank: SAEBank
    cache_dir: Path

    @property
    def pack_id(self) -> str:
        """The pack's name, else the labels of the SAE sources ("" without SAEs)."""
        pack = self.bank.pack
        return pack.name if pack else ",".join(sorted({s.label for s in self.bank.sources.values()}))[:200]

    def sae_digests(self, sites: object = None) -> dict[str, str]:
        """{site: sha256 of its SAE} for `sites` (default: every loaded SAE)."""
        chosen = self.bank.sites if sites is None else sites
        return {str(site): self.bank.digest(site) for site in chosen}  # type: ignore[union-attr]
