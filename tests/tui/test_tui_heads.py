"""Heads screen on a tiny model + pack: opened from Samples with `h`, a scan fills the grid and is stored,
a head's pairs come from the run, Enter on a pair shows the term bars, `s` / `f` take the aligned latent."""

from __future__ import annotations

from helpers import SIZE, cells, wait_idle
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.flow import FlowScreen
from auditui.tui.screens.heads import HeadsScreen
from auditui.tui.screens.samples import SamplesScreen

PROMPT = "the cat sat on the mat because it was warm"


def detail(app) -> str:
    return str(app.screen.query_one("#detail", Static).render())


async def test_heads_screen(tmp_path, tiny_models, tiny_packs):
    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    store = Store(settings.db)
    session_id = store.create_session("heads")
    store.add_prompt(session_id, "an older prompt", [1], chat=False)
    prompt_id = store.add_prompt(session_id, PROMPT, [1], chat=False)
    store.add_completion(prompt_id, "and it slept.", [2], seed=0, params={})
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(SamplesScreen(session_id))
        await pilot.pause()
        app.screen.query_one("#completions").focus()
        await pilot.press("h")
        await pilot.pause()
        assert isinstance(app.screen, HeadsScreen)
        screen = app.screen
        assert screen.query_one("#param-text").value == PROMPT and screen.query_one("#param-chat").value == "n"
        screen.query_one("#param-thr").value = "0.2"
        await pilot.press("ctrl+r")
        await wait_idle(app, pilot)
        runs = store.runs(session_id, "heads_scan")
        assert len(runs) == 1 and runs[0]["status"] == "done" and runs[0]["params"]["text"] == PROMPT
        scan = runs[0]["result"]
        grid = screen.query_one("#grid", DataTable)
        assert grid.row_count == 3 and len(grid.columns) == 1 + 4
        expected = [[str(layer)] + ["·" if value is None else f"{value:.2f}" for value in row]
                    for layer, row in enumerate(scan["grid"])]
        assert [[cell.strip() for cell in row] for row in cells(grid)] == expected
        top = scan["hits"][0]
        assert (grid.cursor_coordinate.row, grid.cursor_coordinate.column) == (top["layer"], top["head"] + 1)
        hits = screen.query_one("#hits", DataTable)
        mine = [h for h in scan["hits"] if (h["layer"], h["head"]) == (top["layer"], top["head"])]
        assert [(int(r[0]), int(r[1])) for r in cells(hits)] == [(h["query"], h["key"]) for h in mine]
        # another head: its own pairs from the run
        other = next(((layer, head) for layer, row in enumerate(scan["counts"]) for head, n in enumerate(row)
                      if n and (layer, head) != (top["layer"], top["head"])))
        grid.move_cursor(row=other[0], column=other[1] + 1)
        await pilot.pause()
        assert detail(app).startswith(f"head L{other[0]}H{other[1]}:")
        assert [(int(r[0]), int(r[1])) for r in cells(hits)] == [
            (h["query"], h["key"]) for h in scan["hits"] if (h["layer"], h["head"]) == other]
        # Enter on a pair: the decomposition's bars, stored as a run
        hits.focus()
        hits.move_cursor(row=0)
        await pilot.press("enter")
        await wait_idle(app, pilot)
        pairs = store.runs(session_id, "heads_pair")
        assert len(pairs) == 1 and pairs[0]["status"] == "done"
        pair = pairs[0]["result"]
        shown = detail(app)
        assert f"head L{other[0]}H{other[1]}" in shown and "terms, largest first" in shown and "█" in shown
        assert f"N_recon {pair['n_recon']} of {len(pair['terms'])}" in shown and "control: U, V rotated" in shown
        site = pair["site"]
        assert site and f"aligned latents of {site}" in shown
        await pilot.press("s")
        await pilot.pause()
        best = max(pair["alignments"][0]["query"] + pair["alignments"][0]["key"], key=lambda m: abs(m["cos"]))
        assert [(f["site"], f["latent"], f["source"]) for f in store.features(session_id)] == [
            (site, best["latent"], "heads")]
        await pilot.press("f")
        await wait_idle(app, pilot)
        assert isinstance(app.screen, FlowScreen) and app.screen.feature == f"{site}/{best['latent']}"
        # back on a fresh Heads screen the stored scan of the prompt is shown again, without a job
        app.pop_screen()
        app.pop_screen()
        await pilot.pause()
        app.push_screen(HeadsScreen(session_id))
        await pilot.pause()
        assert app.screen.query_one("#grid", DataTable).row_count == 3 and not app.jobs.busy
        assert len(store.runs(session_id, "heads_scan")) == 1
