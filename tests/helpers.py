"""Small helpers shared by tests (independent of the code under test)."""

from __future__ import annotations

import torch

from auditui.engine.corpus import Source
from auditui.engine.packs import BuildPlan


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())



def labelled_session(store, lm, spec: list[tuple[str, list[tuple[str, str]]]], chat: bool = False,
                     name: str = "test") -> int:
    """A session of `spec` = [(prompt, [(completion text, label), ...]), ...] with stored token ids.

    Completion token ids are the tokenizer's ids of the text (no special tokens); labels are
    "positive", "negative" or "unlabelled".
    """
    session_id = store.create_session(name, model_id=lm.model_id)
    for prompt, completions in spec:
        prompt_id = store.add_prompt(session_id, prompt, prompt_ids=lm.prompt_ids(prompt, chat=chat), chat=chat)
        for seed, (text, label) in enumerate(completions):
            token_ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            completion_id = store.add_completion(prompt_id, text, token_ids, seed, {}, model_id=lm.model_id)
            store.set_label(completion_id, label)
    return session_id


def tiny_audit(tmp_path, model, pack, spec, saes=None):
    """(store, engine, session id): a tiny model (with `pack`, or no SAE when pack is "") on the CPU,
    a fresh session database, and a labelled session of `spec` (see labelled_session)."""
    from auditui.config import load_settings
    from auditui.store import Store
    from auditui.workflows.engine import open_engine

    settings = load_settings(model=str(model), pack=str(pack), db=str(tmp_path / "s.db"), device="cpu", dtype="float32")
    engine = open_engine(settings, saes=saes)
    store = Store(settings.db)
    return store, engine, labelled_session(store, engine.lm, spec)


def firing_feature(model, pack, text: str, site: str = "2/resid_post", chat: bool = False) -> str:
    """The latent of `site` that fires most at the last token of `text` (a deactivation test of a
    silent latent is refused, not stored)."""
    from auditui.config import load_settings
    from auditui.engine.sites import Site
    from auditui.workflows.engine import open_engine
    from auditui.workflows.flow import DeactivateRequest, deactivate

    engine = open_engine(load_settings(model=str(model), pack=str(pack)))
    best = max(range(engine.bank.sae(Site.parse(site)).cfg.d_sae),
               key=lambda i: deactivate(engine, DeactivateRequest(f"{site}/{i}", text, chat=chat))["z_old"])
    return f"{site}/{best}"


# -- a tiny corpus and build plan for pack builds on tiny models ------------------------------
TEXT = ("The river rose in the spring and the farmers moved their sheep to the hills. " * 3 +
        "A committee met on Tuesday to discuss the budget of the new library. " * 3 +
        "def parse(text): returns the tokens of text, split on whitespace. " * 2)
TINY_SOURCES = (
    Source("stories", "python", weight=0.6, loader=lambda: [TEXT[i:] + TEXT[:i] for i in range(0, 400, 7)]),
    Source("notes", "python", weight=0.4, loader=lambda: [TEXT.upper()[i:] for i in range(0, 300, 11)]),
)


def tiny_plan(name: str = "tiny", **overrides) -> BuildPlan:
    values = dict(name=name, d_sae=64, k=4, lr=5e-3, train_tokens=3072, build_minutes=0, held_out_tokens=512,
                  ce_sequences=2, seq_len=64, seqs_per_forward=4, batch_tokens=512, chat_fraction=0.3)
    values.update(overrides)
    return BuildPlan(**values)


class Probe:
    """A Progress that records every call and stops once `stop(events)` says so."""

    def __init__(self, stop=lambda events: False):
        self.events: list[tuple[float, float, str]] = []
        self.stop = stop

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.events.append((done, total, message))

    def should_stop(self) -> bool:
        return bool(self.stop(self.events))


class Stages:
    """A pack build's Progress recording (stage, done, total); `stop(stage, done, total)` may raise."""

    def __init__(self, stop=lambda stage, done, total: None):
        self.events: list[tuple] = []
        self.stop = stop

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.events.append((message, done, total))
        self.stop(message, done, total)

    def should_stop(self) -> bool:
        return False


def attribution(engine, store, session_id: int, sites, progress=None, **request) -> int:
    """`workflows.attribute.attribute` with the request's fields as keywords; the run id."""
    from auditui.progress import QUIET
    from auditui.workflows.attribute import AttributeRequest, attribute

    return attribute(store, engine, session_id, AttributeRequest(sites=tuple(sites), **request), progress or QUIET)


# -- the TUI under Pilot ---------------------------------------------------------------------
SIZE = (80, 24)
NASTY = "[/INST] [bold]not bold[/bold] <script>alert(1)</script>"


async def wait_idle(app, pilot, timeout: float = 60.0) -> None:
    """Wait until the engine queue has nothing running or queued."""
    waited = 0.0
    while app.jobs.busy or app.job_status is not None:
        await pilot.pause(0.1)
        waited += 0.1
        assert waited < timeout, "engine queue never went idle"
    await pilot.pause()


async def press_when(pilot, event, *keys: str) -> None:
    """Press `keys` once the threading.Event `event` is set (e.g. a step is busy on the engine thread)."""
    for _ in range(400):
        if event.is_set():
            break
        await pilot.pause(0.05)
    assert event.is_set()
    await pilot.press(*keys)


def cells(table) -> list[list[str]]:
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]




# -- the slow tier on SmolLM2 ----------------------------------------------------------------------
def user_pack(names=("demo", "late", "quick")):
    """The first pack of `names` built in the user's real cache (tests otherwise get an empty one)."""
    from pathlib import Path

    from platformdirs import user_cache_dir

    from auditui.engine.saes import resolve_pack_dir
    from auditui.errors import AuditError

    for name in names:
        try:
            return resolve_pack_dir(name, Path(user_cache_dir("auditui")))
        except AuditError:
            continue
    raise AssertionError("build a pack first: auditui pack build demo (or: pack build late --quick --layers 28-29)")


def word_family(tokens: list[str]) -> set[str]:
    """The top token's word family: the logit-lens tokens that share its first four letters."""
    words = [t.strip().lower() for t in tokens]
    if len(words[0]) < 4 or not words[0].isalpha():
        return set()
    return {w for w in words if w.startswith(words[0][:4])}


def word_family_latent(lm, bank, site) -> tuple[int, set[str]]:
    """The latent of `site` whose logit-lens tokens form the largest word family, and that family."""
    from auditui.engine.labels import logit_lens_tokens

    families = [word_family(tokens) for tokens in logit_lens_tokens(lm, bank.output_decoder(site), k=8)]
    latent = max(range(len(families)), key=lambda i: len(families[i]))
    return latent, families[latent]


def tiny_tui(tmp_path, tiny_models, tiny_packs, loaded, spec):
    """(app, store, session id): the TUI on the tiny llama model and pack, over a labelled session of `spec`."""
    from auditui.config import load_settings
    from auditui.store import Store
    from auditui.tui.app import AuditApp

    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    store = Store(settings.db)
    return AuditApp(settings), store, labelled_session(store, loaded("llama"), spec)


async def open_screen(app, pilot, screen) -> None:
    """Once the model is loaded, push `screen` and let it mount."""
    await wait_idle(app, pilot)
    app.push_screen(screen)
    await pilot.pause()
