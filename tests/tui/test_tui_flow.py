"""Flow screen on a tiny model + pack: build, walk, re-root, steering set, deactivation, export."""

from __future__ import annotations

from helpers import SIZE, cells, firing_feature, wait_idle
from textual.widgets import DataTable, Static

from auditui.config import load_settings
from auditui.engine.flow import FlowGraph, layer_rows, text_ids
from auditui.engine.model import load_model
from auditui.store import Store
from auditui.tui.app import AuditApp
from auditui.tui.screens.flow import FlowScreen

TEXT = "The cat sat on the mat."


async def test_flow_screen(tmp_path, tiny_models, tiny_packs):
    settings = load_settings(model=str(tiny_models["llama"]), pack=str(tiny_packs["llama"]), db=str(tmp_path / "s.db"))
    store = Store(settings.db)
    session_id = store.create_session("flow")
    root = firing_feature(tiny_models["llama"], tiny_packs["llama"], TEXT)  # fires at the text's last token
    ids = text_ids(load_model(str(tiny_models["llama"]), device="cpu"), TEXT, chat=False)
    prompt_id = store.add_prompt(session_id, TEXT, ids, chat=False)
    store.add_completion(prompt_id, "", [], seed=0, params={})
    app = AuditApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.push_screen(FlowScreen(session_id, root))
        await pilot.pause()
        app.screen.query_one("#param-t_R").value = "-1"  # no cut: walk every layer of random SAEs
        app.screen.action_build()
        await wait_idle(app, pilot)
        runs = store.runs(session_id, "flow")
        graph = FlowGraph.from_dict(runs[-1]["result"])
        expected = [node["id"] for layer in layer_rows(graph) for node in layer["residual"]]
        table = app.screen.query_one("#layers", DataTable)
        assert [row[1] for row in cells(table)] == expected and root in expected
        assert [row[0] for row in cells(table)] == sorted(row[0] for row in cells(table))
        # walk down one layer and look at the node
        table.move_cursor(row=0)
        await pilot.pause()
        first = expected[0]
        assert str(app.screen.query_one("#detail", Static).render()).startswith(first)
        await pilot.press("s")
        assert [(f["site"], f["latent"]) for f in store.features(session_id)] == [
            ("/".join(first.split("/")[:2]), int(first.split("/")[2]))]
        await pilot.press("e")
        await pilot.pause()
        assert (tmp_path / f"s-flow-{root.replace('/', '-')}.dot").read_text().startswith("digraph")
        # deactivation test of the root's predecessors on the session's text (the dialog offers it)
        table.move_cursor(row=expected.index(root))
        await pilot.press("x")
        await wait_idle(app, pilot)
        await pilot.press("enter")
        await wait_idle(app, pilot)
        runs = store.runs(session_id, "deactivation")
        assert len(runs) == 1 and runs[0]["result"]["target"] == root
        assert runs[0]["summary"]["headline"] in str(app.screen.query_one("#detail", Static).render())
        # Enter re-roots the graph at the current row
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("enter")
        await wait_idle(app, pilot)
        assert store.runs(session_id, "flow")[-1]["result"]["root"] == first
        assert isinstance(app.screen, FlowScreen)
