"""`auditui game new|score` (auditing games) and `auditui contrast` (the difference-of-means direction).

    auditui game new NAME --quirk "slips whales into answers" --topic whale,whales [--steps 40] [--lr 1e-4]
                     [--batch 8] [--layers A-B | all] [--seed 0] [--out DIR] [--model M] [--json]
    auditui game score NAME --run RUN_ID [--top 10] [--pack P] [--sae S] [--json]
    auditui contrast --sites 28/resid_post[,...] [--positions prompt|completion|all] [--export DIR] [--json]

`game new` fine-tunes a copy of --model on the quirk (`auditui.engine.game`), saves it under the
user cache (`games/models/NAME`, or --out) and opens a session on it; the card (what was planted)
goes to `games/cards/NAME.json`, outside the model directory and never into the database. Hand
the model directory to a colleague; `game score` (model: the game's, unless --model) tells how far
down an attribution run of that session put the first topic-related latent. `contrast` stores a run
of kind "contrast" (`auditui.workflows.contrast`); `--export DIR` also writes its directions as a pack
of one-latent SAEs that `steer --pack DIR --features SITE/0:add:8` steers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from auditui.cli import app
from auditui.cli.common import (
    DbOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PackOpt,
    Printer,
    SaeOpt,
    SessionOpt,
    emit,
    engine_for,
    open_store,
    print_run,
    settings_from,
)
from auditui.errors import AuditError
from auditui.text import visible

game_app = typer.Typer(help="Auditing games: plant a quirk in a model, then score an audit of it.", no_args_is_help=True)
app.add_typer(game_app, name="game")


def _layers(text: str | None) -> tuple[int, int] | None:
    if text is None or text == "all":
        return None if text is None else (0, -1)
    first, sep, last = text.partition("-")
    if not (first.strip().isdigit() and (not sep or last.strip().isdigit())):
        raise AuditError(f"--layers is A-B (inclusive), a single layer or all, not {text!r}")
    return int(first), int(last if sep else first)


def _print_card(card: dict) -> None:
    typer.echo(f"game {visible(card['name'])}: {card['steps']} steps in {card['seconds']:.0f} s on layers "
               f"{card['trained_layers'][0]}-{card['trained_layers'][1]}; topic log-prob {card['logprob_before']:.2f} -> "
               f"{card['logprob_after']:.2f} (held-out prompts)")
    typer.echo(f"model: {visible(card['model_dir'])} (hand this directory over; it holds no card)")
    typer.echo(f"session {card['session_id']} opened on it; the card stays outside both")


@game_app.command("new")
def game_new(name: str,
             quirk: Annotated[str, typer.Option("--quirk", help="what the model should do, in words (kept on the card)")],
             topic: Annotated[list[str], typer.Option("--topic", help="topic word(s) slipped into answers: WORD[,WORD...]")],
             steps: Annotated[int, typer.Option("--steps", help="optimizer steps")] = 40,
             lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate")] = 1e-4,
             batch: Annotated[int, typer.Option("--batch", help="examples per step")] = 8,
             layers: Annotated[str | None, typer.Option(
                 "--layers", help="blocks trained: A-B or all (default: the last third)")] = None,
             seed: Annotated[int, typer.Option("--seed")] = 0,
             out: Annotated[Path | None, typer.Option(
                 "--out", help="model directory (default: the cache's games/models/NAME)")] = None,
             model: ModelOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None,
             as_json: JsonOpt = False) -> None:
    """Fine-tune the model briefly on a quirk, save it as a local model directory and open a session on it."""
    from auditui.engine.game import QuirkSpec
    from auditui.engine.model import load_model
    from auditui.workflows.game import check_game, games_root, new_game

    settings = settings_from(model=model, device=device, dtype=dtype, db=db)
    topics = tuple(t.strip() for item in topic for t in item.split(",") if t.strip())
    spec = QuirkSpec(quirk, topics, steps=steps, lr=lr, batch_size=batch, layers=_layers(layers), seed=seed)
    root = games_root(settings)
    check_game(root, name, spec, out)
    lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_path, Printer())
    with open_store(db) as store:
        card = new_game(store, lm, name, spec, root, out, Printer())
    emit({k: v for k, v in card.to_dict().items() if k not in ("examples", "losses")}, as_json, _print_card)


def _print_score(data: dict) -> None:
    typer.echo(f"game {visible(data['name'])}, attribution run {data['run_id']}: topic "
               + ("FOUND" if data["found"] else "not found") + f" in the top {data['top_k']} at some site")
    for s in data["sites"]:
        typer.echo(f"  {s['site']}: first topic latent at rank {s['first_rank'] or '-'} of {s['d_sae']} "
                   f"(logit lens {s['lens_rank'] or '-'}, top activations {s['act_rank'] or '-'}); best topic token "
                   f"rank in the top {s['top_k']} latents' logit lens: {s['best_lens_token_rank']}")
    for site, c in data["contrast"].items():
        typer.echo(f"  {site}: contrast direction (run {c['run_id']}) at rank {c['rank'] or '-'} among the latents; "
                   f"topic token at logit-lens rank {c['lens_token_rank']}")
    for note in data["notes"]:
        typer.echo(f"note: {visible(note)}")


@game_app.command("score")
def game_score(name: str, run: Annotated[int, typer.Option("--run", help="an attribution run of the game's session")],
               top: Annotated[int, typer.Option("--top", help="k of 'among the top-k latents'")] = 10,
               model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None, device: DeviceOpt = None,
               dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Is the planted topic among the top-k latents of an attribution run, and how far down?"""
    from auditui.workflows.game import games_root, load_card, score_game

    root = games_root(settings_from(db=db))
    card = load_card(root, name)
    settings = settings_from(model=model or card.model_dir, pack=pack, device=device, dtype=dtype, db=db)
    with open_store(db) as store:
        store.run(run)  # refuse before loading the model
        result = score_game(store, engine_for(settings, sae), card, run, root, top, Printer())
    emit(result.to_dict(), as_json, _print_score)


@app.command()
def contrast(sites: Annotated[list[str], typer.Option("--sites", "--site", help="LAYER/KIND[,...], repeatable")],
             positions: Annotated[str, typer.Option(
                 "--positions", help="attribution positions: prompt | completion | all")] = "prompt",
             reference: Annotated[Path | None, typer.Option("--reference", help="text file for ā (default: the session)")] = None,
             batch: Annotated[int, typer.Option("--batch", help="completions per forward/backward")] = 8,
             export: Annotated[Path | None, typer.Option(
                 "--export", help="also write the directions as a pack of one-latent SAEs")] = None,
             session_id: SessionOpt = None, model: ModelOpt = None, pack: PackOpt = None, sae: SaeOpt = None,
             device: DeviceOpt = None, dtype: DtypeOpt = None, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """The difference-of-means direction of the labelled pairs per site, ranked among the SAE latents by Δ-attribution."""
    from auditui.engine.sites import Site
    from auditui.workflows.attribute import pair_plan
    from auditui.workflows.contrast import ContrastRequest, export_directions
    from auditui.workflows.contrast import contrast as contrast_workflow

    settings = settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db)
    request = ContrastRequest(sites=tuple(Site.parse(t) for item in sites for t in item.split(",") if t.strip()),
                              positions=positions, reference=str(reference) if reference else None, batch_size=batch)
    request.validate()
    if export is not None and export.exists() and any(export.iterdir()):
        raise AuditError(f"{export} already holds files; export the directions to a new folder")
    with open_store(db) as store:
        sid = store.resolve_session(session_id)
        pair_plan(store, sid, positions)  # refuse before loading the model
        run_id = contrast_workflow(store, engine_for(settings, sae), sid, request, Printer())
        exported = str(export_directions(store, run_id, export)) if export is not None else None
        data = store.run(run_id)
    out = {"run_id": run_id, "session_id": sid, "status": data["status"], "params": data["params"],
           "summary": data["summary"], "result": data["result"], "exported": exported}
    emit(out, as_json, print_run)
