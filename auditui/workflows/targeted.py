"""Build a targeted dictionary for a session: a pack of SAEs at chosen sites, trained on the session's
texts plus a slice of another pack's corpus (`auditui.engine.targeted`), recorded as a run.

    build_targeted(store, lm, session_id, TargetedRequest(...), cache_dir, progress) -> run id

The result is an ordinary pack under `<cache>/packs/NAME` (same trainer, sae-lens export, quality
numbers), so attribution, flow, steering and the latent page use it with `--pack NAME` beside the
runs made with the base pack; every later run records the SAE digests it used. The manifest's
"targeted" entry says where the dictionary came from: the session, the digest of its token ids, the
base pack and the token counts of each part. The run (kind "targeted_dictionary") records the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from auditui.engine.corpus import Source, TokenCorpus
from auditui.engine.packs import BuildPlan, build_pack, pack_info
from auditui.engine.reference import check_vocab, sequences_digest
from auditui.engine.saes import check_pack_name, packs_root, read_pack, resolve_pack_dir
from auditui.engine.sites import Site
from auditui.engine.targeted import targeted_corpus
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.workflows.reference import session_sequences
from auditui.workflows.runs import provenance, recorded_run

if TYPE_CHECKING:
    from auditui.engine.model import LoadedModel
    from auditui.store.database import Store

TARGETED_KIND = "targeted_dictionary"


@dataclass(frozen=True)
class TargetedRequest:
    name: str
    sites: tuple[Site, ...]
    base_pack: str  # the pack whose corpus is mixed in
    # Small and mostly on the session: its latents go to what the session's texts share. Measured on a
    # planted quirk (whales, issue 18; completion positions, 28 and 29/resid_post): 2048 latents, k 32,
    # half the tokens from the session ranked the first topic latent 92 and 60; 512 latents, k 16, 80%
    # from the session ranked it 15 and 7 (a latent whose logit lens is " whale", " whales"); on a
    # volcanoes quirk, whose topic the general pack had no latent for, 1 at 29/resid_post.
    d_sae: int = 512
    k: int = 16
    train_tokens: int = 150_000
    minutes: float = 0.0  # wall-clock budget on CPU (0 = none)
    share: float = 0.8  # of the training tokens from the session
    seed: int = 0
    force: bool = False  # replace an existing pack of that name

    def validate(self, cache_dir: Path) -> None:
        check_pack_name(self.name)
        if not self.sites:
            raise AuditError("give the sites to train at, e.g. --sites 28/resid_post,29/resid_post")
        if not 1 <= self.k <= self.d_sae or self.train_tokens < 2048 or self.minutes < 0:
            raise AuditError("need 1 <= --k <= --width, --tokens >= 2048 and --minutes >= 0")
        if (packs_root(cache_dir) / self.name).exists() and not self.force:
            raise AuditError(f"pack {self.name} already exists; choose another name or pass --force to replace it")


def base_corpus(pack_dir: Path) -> TokenCorpus:
    path = pack_dir / "corpus.pt"
    if not path.exists():
        raise AuditError(f"pack {pack_dir.name} keeps no corpus.pt to mix in; build it with auditui pack build")
    return TokenCorpus(**torch.load(path))


def build_targeted(store: Store, lm: LoadedModel, session_id: int, request: TargetedRequest, cache_dir: Path,
                   progress: Progress = QUIET) -> int:
    """Train, export and evaluate the dictionary (module docstring); the run id."""
    request.validate(cache_dir)
    base = read_pack(resolve_pack_dir(request.base_pack, cache_dir))
    seqs = session_sequences(store, session_id)
    check_vocab(lm, seqs)
    corpus = base_corpus(base.path)
    if int(corpus.train.max()) >= int(lm.model.config.vocab_size):
        raise AuditError(f"pack {base.name}'s corpus was tokenized for another vocabulary than {lm.model_id}'s")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    mixed = targeted_corpus(seqs, corpus, request.train_tokens, request.share, int(pad or 0), request.seed)
    digest = sequences_digest(seqs)
    plan = BuildPlan(name=request.name, model=lm.model_id, sites=tuple(str(s) for s in request.sites),
                     d_sae=request.d_sae, k=request.k, train_tokens=request.train_tokens,
                     build_minutes=request.minutes, held_out_tokens=0, seq_len=mixed.seq_len, seed=request.seed,
                     chat_fraction=0.0)
    targeted = {"session_id": session_id, "session_digest": digest, "base_pack": base.name,
                "base_pack_path": str(base.path), "share": request.share, "corpus": mixed.provenance}
    params = {**{k: v for k, v in asdict(request).items() if k not in ("sites", "force")},
              "sites": [str(s) for s in request.sites], "session_digest": digest}
    key = (Source("session", f"session:{digest}", weight=request.share),
           Source("corpus", f"pack:{base.name}:{base.manifest.get('plan_key', '')}", weight=1 - request.share))
    with recorded_run(store, session_id, TARGETED_KIND, params, provenance(lm, seeds=[request.seed])) as run:
        path = build_pack(plan, cache_dir, progress=progress, sources=key, force=request.force, lm=lm, corpus=mixed,
                          extra={"targeted": targeted})
        info = pack_info(read_pack(path))
        result = {"pack": request.name, "path": str(path), "sites": params["sites"], "targeted": targeted,
                  "training": info["training"], "quality": info["quality"]}
        summary = dict(info["summary"], headline=f"targeted dictionary {request.name}: " + info["summary"]["headline"])
        run.done(result, summary)
    return run.run_id
