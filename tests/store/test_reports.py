"""Session reports: everything is there, model text stays literal in md/json and escaped in HTML."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from auditui.errors import AuditError
from auditui.store import Store
from auditui.store.reports import FORMATS, render_report, render_reports

NASTY = [
    "[/INST] sure, [bold]here[/bold] it is",
    "<script>alert('x')</script> & more",
    "a fence ``` inside\n````\nand `ticks`",
]


class _Text(HTMLParser):
    """Collects the text content and the tag names of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
def session(tmp_path):
    store = Store(tmp_path / "r.db")
    session_id = store.create_session("report <me>", model_id="tiny-llama", pack_id="tiny")
    prompt_id = store.add_prompt(session_id, "Say <b>hi</b> [/INST]", [1, 2, 3], system="You are [red]", chat=True)
    ids = [store.add_completion(prompt_id, text, [7, 8], seed=40 + i,
                                params={"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8},
                                model_id="tiny-llama", finish_reason="eos") for i, text in enumerate(NASTY)]
    store.set_label(ids[0], "pos")
    store.set_label(ids[1], "neg")
    store.add_feature(session_id, "2/resid_post", 17, "attribution", note="likes <tags>")
    done = store.start_run(session_id, "attribution", {"site": "2/resid_post", "k": 5})
    store.finish_run(done, {"big": list(range(1000))}, {
        "headline": "top latent 17 <script>",
        "table": {"columns": ["latent", "score", "token"], "rows": [[17, 0.123456, "[/INST]|x"], [3, -2.5, "<s>"]]},
        "notes": ["exact ablation matched to 1e-5"]})
    failed = store.start_run(session_id, "flow", {"depth": 3})
    store.fail_run(failed, "cancelled by the user", status="cancelled")
    return store, session_id, ids, prompt_id


def test_json_report_holds_everything_literally(session):
    store, session_id, ids, prompt_id = session
    data = json.loads(render_report(store, session_id, "json"))
    assert data["session"]["name"] == "report <me>"
    completions = data["prompts"][0]["completions"]
    assert [c["text"] for c in completions] == NASTY
    assert [c["label"] for c in completions] == ["positive", "negative", "unlabelled"]
    assert [c["seed"] for c in completions] == [40, 41, 42]
    assert data["pairs"] == [{"prompt_id": prompt_id, "positive": [ids[0]], "negative": [ids[1]]}]
    runs = {r["kind"]: r for r in data["runs"]}
    assert runs["attribution"]["summary"]["table"]["rows"][0] == [17, 0.123456, "[/INST]|x"]
    assert runs["attribution"]["params"] == {"site": "2/resid_post", "k": 5}
    assert runs["attribution"]["result"] == store.run(runs["attribution"]["id"])["result"]  # JSON keeps results
    assert runs["flow"]["status"] == "cancelled" and runs["flow"]["error"] == "cancelled by the user"
    assert data["features"][0]["latent"] == 17


def test_markdown_report_keeps_model_text_literal(session):
    store, session_id, ids, _ = session
    md = render_report(store, session_id, "md")
    for text in NASTY:
        assert text in md
    # The completion holding ``` and ```` is fenced with five backticks, so its fence closes after it.
    fenced = "`````text\n" + NASTY[2] + "\n`````"
    assert fenced in md
    assert "### Completion " + str(ids[0]) + ": positive" in md and "seed 41" in md
    assert "| latent | score | token |" in md and "| 17 | 0.1235 | \\[/INST\\]\\|x |" in md  # no link syntax
    assert "flow (cancelled)" in md and "error: cancelled by the user" in md
    assert "- exact ablation matched to 1e-5" in md and "| #1 | #1 | #2 |" in md


def test_html_report_escapes_all_model_text(session):
    store, session_id, _, _ = session
    page = render_report(store, session_id, "html")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<b>" not in page and "[/INST]" in page and "[bold]" in page
    parser = _Text()
    parser.feed(page)
    assert set(parser.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "pre",
                                "ul", "li", "table", "thead", "tbody", "tr", "th", "td"}
    text = "".join(parser.text)
    for nasty in NASTY + ["Say <b>hi</b> [/INST]", "You are [red]", "top latent 17 <script>", "likes <tags>"]:
        assert nasty in text  # what a browser shows is the literal text


def test_every_format_from_one_read_of_the_session(session):
    store, session_id, _, _ = session

    def traced(render):  # the result and the SQL statements it ran
        statements: list[str] = []
        store.db.conn.set_trace_callback(statements.append)
        try:
            return render(), statements
        finally:
            store.db.conn.set_trace_callback(None)
    together, statements = traced(lambda: render_reports(store, session_id))
    assert together == {fmt: render_report(store, session_id, fmt) for fmt in FORMATS}
    assert list(together) == ["md", "html", "json"]
    _, one_format = traced(lambda: render_report(store, session_id, "json"))
    assert statements == one_format and any("FROM prompts" in sql for sql in statements)


def test_unknown_format_is_an_error(session):
    store, session_id, _, _ = session
    with pytest.raises(AuditError, match="md, html, json"):
        render_report(store, session_id, "pdf")
    with pytest.raises(AuditError, match="unknown report format 'txt'"):
        render_reports(store, session_id, ("md", "txt"))
    with pytest.raises(AuditError, match="no session 999"):
        render_report(store, 999, "md")
