"""The contrastive (difference-of-means) direction of a session's labelled pairs per site, as a run.

    contrast(store, engine, session_id, ContrastRequest(sites=...), progress) -> run id

The pairs, weights and positions are attribution's (`auditui.workflows.attribute.pair_plan`), ā the
stored reference means (`auditui.workflows.reference`); the math is `auditui.engine.contrast`. No
SAE is needed; at a site with one, the direction is ranked among its latents by Δ-attribution
computed in the same pass (the latents' own numbers, as an attribution run with the same positions
and reference gives them).

Stored run (kind "contrast")
    params  {sites, positions, reference, batch_size, model_id, saes: {site: sha256} (sites with an SAE)}
    result  {positions, n_prompts, n_completions, weights: {completion_id: w}, reference: {source, runs},
             sites: {site: SiteContrast.to_dict()}, notes}
    summary {headline, table: {columns, rows}, notes}
    blob    "directions": safetensors {site: d [width]} (unit directions; `run_directions`)
`export_directions(store, run_id, out_dir)` writes them as a pack of one-latent SAEs (`--pack DIR`
steers `SITE/0` through the usual plans).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from auditui.engine.attribution import check_positions
from auditui.engine.contrast import check_contrast_sites, contrast_moments, save_direction_pack, site_contrast
from auditui.engine.reference import check_vocab
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.text import number
from auditui.workflows.attribute import pair_plan
from auditui.workflows.reference import reference_means
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine import Engine
    from auditui.store.database import Store

CONTRAST_KIND = "contrast"


@dataclass(frozen=True)
class ContrastRequest:
    sites: tuple[Site, ...]
    positions: str = "prompt"
    reference: str | None = None  # a text file for ā; None: the session's texts
    batch_size: int = 8

    def validate(self) -> None:
        check_contrast_sites(list(self.sites))
        check_positions(self.positions)
        if self.batch_size < 1:
            raise AuditError("batch size must be at least 1")
        if self.reference is not None and not Path(self.reference).is_file():
            raise AuditError(f"reference text file not found: {self.reference}")



def summarize(result: dict) -> dict:
    rows = [[site, number(c["delta_attr"]), "-" if c["rank"] is None else f"{c['rank']}/{c['d_sae'] + 1}",
             number(c["top_latent_attr"]), number(c["norm"]),
             "-" if c["nearest_latent"] is None else f"{c['nearest_latent']} ({c['nearest_cosine']:.2f})",
             " ".join(c["logit_lens"][:5])] for site, c in result["sites"].items()]
    ranked = [f"{site} {c['rank']}" for site, c in result["sites"].items() if c["rank"] is not None]
    headline = (f"difference-of-means direction over {result['n_prompts']} prompts ({result['n_completions']} "
                f"completions, {result['positions']} positions)" + (f"; rank among the SAE latents: {', '.join(ranked)}"
                                                                     if ranked else ""))
    return {"headline": headline,
            "table": {"columns": ["site", "Δ-attr", "rank", "top latent Δ-attr", "‖v‖", "nearest latent (cos)",
                                  "logit lens"], "rows": rows},
            "notes": result["notes"]}


def contrast(store: Store, engine: Engine, session_id: int, request: ContrastRequest, progress: Progress = QUIET) -> int:
    """The direction at each requested site (module docstring); the run id."""
    request.validate()
    sites = check_contrast_sites(list(request.sites))
    plan = pair_plan(store, session_id, request.positions)
    check_vocab(engine.lm, plan.seqs)
    with_sae = [s for s in sites if s in engine.bank]
    params = {"sites": [str(s) for s in sites], "positions": request.positions,
              "reference": request.reference or "session", "batch_size": request.batch_size,
              "model_id": engine.lm.model_id, "saes": engine.sae_digests(with_sae)}
    with recorded_run(store, session_id, CONTRAST_KIND, params, provenance(engine.lm, engine, with_sae)) as run:
        ref = reference_means(store, engine, session_id, sites, request.reference, request.batch_size, progress)
        moments = contrast_moments(engine.lm, plan, sites, ref.means, request.positions, request.batch_size, progress)
        result: dict = {"positions": request.positions, "n_prompts": plan.n_prompts, "n_completions": len(plan.seqs),
                        "weights": {str(k): v for k, v in plan.weights.items()},
                        "reference": {"source": ref.source, "runs": {str(s): ref.runs[s] for s in sites}},
                        "sites": {}, "notes": [
                            "d = the mean activation over the completion tokens, positive minus negative, per prompt "
                            "with both labels, averaged over prompts, made unit; its Δ-attr is the latents' formula "
                            "-(g·d)((a-ā)·d); rank 1 = above every latent of the site's SAE"]}
        directions = {}
        for site in sites:
            decoder = engine.bank.decoder(site) if site in engine.bank else None
            summary, directions[site] = site_contrast(engine.lm, site, *moments[site], decoder)
            result["sites"][str(site)] = summary.to_dict()
        store.put_blob(run.run_id, "directions", save_tensors({str(s): d.cpu().contiguous() for s, d in directions.items()}))
        run.done(result, summarize(result))
    return run.run_id


def run_directions(store: Store, run_id: int) -> dict[Site, Tensor]:
    run = store.run(run_id)
    data = store.get_blob(run_id, "directions") if run["kind"] == CONTRAST_KIND else None
    if data is None:
        raise AuditError(f"run {run_id} is not a finished contrast run")
    return {Site.parse(k): v for k, v in load_tensors(data).items()}


def export_directions(store: Store, run_id: int, out_dir: Path) -> Path:
    """The run's directions as a pack of one-latent SAEs (`--pack DIR`, feature SITE/0)."""
    run = store.run(run_id)
    return save_direction_pack(run_directions(store, run_id), Path(out_dir), f"contrast-run-{run_id}",
                               run["params"]["model_id"], {"source": f"contrast run {run_id}"})
