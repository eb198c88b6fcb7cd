"""Export a session as Markdown, HTML or JSON: prompts, completions, labels, pairs, features and runs.

Runs are rendered generically from their `summary` ({"headline", "table": {"columns", "rows"},
"notes"}), params and status, so every later step appears without code here; the JSON export also
carries each run's full result (ranked latents, graphs ...) for scripts. `render_reports` renders
several formats from one read of the session (`session_data`); `render_report` renders one. The document is
first built as a list of blocks; every piece of text goes through `auditui.text` (control and bidi
characters shown as escapes), the HTML writer escapes it, and the Markdown writer escapes Markdown
syntax in headings, paragraphs and cells and puts model text in code fences long enough to keep it
literal.
"""

from __future__ import annotations

import html
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from auditui.errors import AuditError
from auditui.store.database import Store
from auditui.text import md_inline, visible

FORMATS = ("md", "html", "json")
MD_MARK = "<!-- auditui report -->"
HTML_MARK = '<meta name="generator" content="auditui">'
JSON_KEYS = {"session", "prompts", "pairs", "features", "runs"}
SQLITE_HEADER = b"SQLite format 3\x00"

# A block is ("h", level, text) | ("p", text) | ("pre", text) | ("table", columns, rows) | ("ul", items)
# | ("figure", kind, result): a run's curves, drawn as inline SVG in HTML (store.plots), named in Markdown.
Block = tuple
FIGURES = ("sweep", "validate")  # run kinds drawn as figures (their results are read for every format)


def session_data(store: Store, session_id: int, results: bool = False) -> dict:
    """Everything a report shows, as plain JSON-ready data (run results only with `results`)."""
    completions = store.completions(session_id)
    prompts = [{**prompt, "completions": [c for c in completions if c["prompt_id"] == prompt["id"]]}
               for prompt in store.prompts(session_id)]
    runs = [{key: value for key, value in run.items() if results or key != "result" or run["kind"] in FIGURES}
            for run in store.runs(session_id)]
    return {"session": store.session(session_id), "prompts": prompts, "pairs": store.pairs(session_id),
            "features": store.features(session_id), "runs": runs}


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).isoformat(timespec="seconds") if stamp else "-"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


def _ids(ids: list[int]) -> str:
    return ", ".join(f"#{i}" for i in ids) or "-"


def _used(data: dict, key: str, column: str) -> str:
    """What the session's runs used (provenance `key`), else the session's `column`; "-" when neither tells."""
    records = [run["provenance"] for run in data["runs"] if isinstance(run["provenance"], dict)]
    return ", ".join(dict.fromkeys(str(p[key]) for p in records if p.get(key))) or data["session"][column] or "-"


def _judges(data: dict) -> str:
    """Every judge that graded in the session, as model at URL."""
    judges = [run["params"]["judge"] for run in data["runs"] if isinstance(run["params"], dict)
              and isinstance(run["params"].get("judge"), dict)]
    return ", ".join(dict.fromkeys(f"{j.get('model')} at {j.get('base_url')}" for j in judges))


def _session_blocks(data: dict) -> list[Block]:
    s = data["session"]
    judges = _judges(data)
    return [("h", 1, f"Session {s['id']}: {s['name']}"),
            ("ul", [f"created {_when(s['created'])}, updated {_when(s['updated'])}",
                    f"model: {_used(data, 'model_id', 'model_id')}; SAE pack: {_used(data, 'pack', 'pack_id')}",
                    f"{len(data['prompts'])} prompts, {sum(len(p['completions']) for p in data['prompts'])} "
                    f"completions, {len(data['pairs'])} pairs, {len(data['runs'])} runs"]
             + ([f"reference model: {s['reference_model']}"] if s.get("reference_model") else [])
             + ([f"LLM judges: {judges}"] if judges else [])
             + ([f"notes: {s['notes']}"] if s["notes"] else []))]


def _prompt_blocks(prompt: dict) -> list[Block]:
    blocks: list[Block] = [("h", 2, f"Prompt {prompt['id']}"),
                           ("p", f"{'chat template' if prompt['chat'] else 'raw text'}, "
                                 f"{len(prompt['prompt_ids'] or [])} tokens, {_when(prompt['created'])}")]
    if prompt["system"]:
        blocks += [("p", "System prompt:"), ("pre", prompt["system"])]
    blocks.append(("pre", prompt["text"]))
    for c in prompt["completions"]:
        params = c["params"] or {}
        blocks += [("h", 3, f"Completion {c['id']}: {c['label']}"),
                   ("p", f"seed {c['seed']}, finish {c['finish_reason'] or '-'}, {len(c['token_ids'] or [])} "
                         f"tokens, temperature {params.get('temperature', '-')}, top-p {params.get('top_p', '-')}, "
                         f"model {c['model_id'] or '-'}" + (f", labelled by {c['labeller']}" if c["labeller"] else "")),
                   ("pre", c["text"])]
    return blocks


def _run_blocks(run: dict) -> list[Block]:
    summary = run["summary"] if isinstance(run["summary"], dict) else {}
    blocks: list[Block] = [("h", 2, f"Run {run['id']}: {run['kind']} ({run['status']})"),
                           ("p", f"started {_when(run['created'])}, finished {_when(run['finished'])}")]
    if summary.get("headline"):
        blocks.append(("p", str(summary["headline"])))
    if run["error"]:
        blocks.append(("p", f"error: {run['error']}"))
    table = summary.get("table")
    if isinstance(table, dict) and table.get("columns"):
        blocks.append(("table", [_cell(c) for c in table["columns"]],
                       [[_cell(v) for v in row] for row in table.get("rows", [])]))
    if summary.get("notes"):
        blocks.append(("ul", [_cell(note) for note in summary["notes"]]))
    if run["kind"] in FIGURES and isinstance(run.get("result"), dict) and run["result"].get("band"):
        blocks.append(("figure", run["kind"], run["result"]))
    if run["params"]:
        blocks += [("p", "Parameters:"), ("pre", json.dumps(run["params"], indent=2, default=str))]
    return blocks


def report_blocks(data: dict) -> list[Block]:
    blocks = _session_blocks(data)
    for prompt in data["prompts"]:
        blocks += _prompt_blocks(prompt)
    if data["pairs"]:
        blocks += [("h", 2, "Pairs"),
                   ("table", ["prompt", "positive", "negative"],
                    [[f"#{p['prompt_id']}", _ids(p["positive"]), _ids(p["negative"])] for p in data["pairs"]])]
    if data["features"]:
        blocks += [("h", 2, "Chosen features"),
                   ("table", ["site", "latent", "source", "note"],
                    [[f["site"], str(f["latent"]), f["source"] or "", f["note"] or ""] for f in data["features"]])]
    for run in data["runs"]:
        blocks += _run_blocks(run)
    return blocks


# -- Markdown -----------------------------------------------------------------------------------
def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside `text`, so the text stays literal."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + md_inline(block[2]))
        elif kind == "p":
            parts.append(md_inline(block[1]))
        elif kind == "pre":
            parts.append(_fence(visible(block[1])))
        elif kind == "ul":
            parts.append("\n".join(f"- {md_inline(item)}" for item in block[1]))
        elif kind == "figure":
            parts.append(md_inline(f"(the {block[1]} curves are drawn in the HTML report; their numbers are in "
                                   "the table above and the JSON export)"))
        else:
            columns, rows = block[1], block[2]
            lines = ["| " + " | ".join(map(md_inline, columns)) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(md_inline(v) for v in row) + " |" for row in rows]
            parts.append("\n".join(lines))
    return MD_MARK + "\n" + "\n\n".join(parts) + "\n"


# -- HTML ---------------------------------------------------------------------------------------
_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}
pre{white-space:pre-wrap;background:#f4f4f4;padding:.6rem;border-radius:4px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}"""


def to_html(blocks: list[Block], title: str) -> str:
    def esc(text: str) -> str:
        return html.escape(visible(text))
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{esc(block[1])}</p>")
        elif kind == "pre":
            parts.append(f"<pre>{esc(block[1])}</pre>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "figure":  # SVG drawn by matplotlib from numbers and auditui's own labels (it escapes text)
            from auditui.store.plots import sweep_svg, validate_svg

            parts.append(f"<figure>{(sweep_svg if block[1] == 'sweep' else validate_svg)(block[2])}</figure>")
        else:
            head = "".join(f"<th>{esc(c)}</th>" for c in block[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{HTML_MARK}<title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def render_reports(store: Store, session_id: int, formats: tuple[str, ...] = FORMATS) -> dict[str, str]:
    """The session's report in each of `formats` ({fmt: text}), all from one read of the session."""
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise AuditError(f"unknown report format {unknown[0]!r}; use one of {', '.join(FORMATS)}")
    data = session_data(store, session_id, results="json" in formats)
    return {fmt: _render(data, fmt) for fmt in formats}


def render_report(store: Store, session_id: int, fmt: str) -> str:
    """The session's report as Markdown (md), a standalone HTML page (html) or JSON (json)."""
    return render_reports(store, session_id, (fmt,))[fmt]


def _render(data: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    blocks = report_blocks(data)
    if fmt == "md":
        return to_markdown(blocks)
    return to_html(blocks, f"auditui session {data['session']['id']}: {data['session']['name']}")


SVG_MARK = "<!-- auditui figure -->"


def _is_report(path: Path, fmt: str) -> bool:
    """Whether an existing file is an earlier auditui export of format `fmt`."""
    head = path.read_bytes()[:4096]
    if head.startswith(SQLITE_HEADER):
        return False
    text = head.decode("utf-8", errors="replace")
    if fmt == "md":
        return text.startswith(MD_MARK)
    if fmt == "html":
        return HTML_MARK in text
    if fmt == "svg":
        return text.startswith(SVG_MARK)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and JSON_KEYS <= set(data)


def check_export(path: Path, fmt: str, database: Path) -> Path:
    """The resolved target if `path` may receive an export of `fmt` (see write_export); else AuditError.
    Commands call it before long work, so a bad output path fails at once."""
    path = Path(path).expanduser()
    target = path.resolve()
    db = Path(database).expanduser().resolve()
    if target in {db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")}:
        raise AuditError(f"{path} is the session database; write the report elsewhere")
    if target.is_dir():
        raise AuditError(f"{path} is a folder; give a file name")
    if target.exists() and not _is_report(target, fmt):
        raise AuditError(f"{path} exists and is not an earlier auditui {fmt} report; choose another name")
    return target


def write_export(path: Path, text: str, fmt: str, database: Path) -> Path:
    """Write a report to `path` through a temporary file and a rename. Never the session database,
    never an SQLite file, and never over an existing file that is not an earlier export of `fmt`."""
    path = Path(path).expanduser()
    target = check_export(path, fmt, database)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuditError(f"cannot write {path}: {exc.strerror}") from None
    return target
