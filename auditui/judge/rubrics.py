"""Rubrics: what a judge is asked and how its answer becomes scores, as TOML data files.

A rubric file (see the built-in ones in `rubrics/`) gives
    name, description, system, user     the prompt; placeholders {text}, {prompt}, {subject}, {subjects}
    needs_subject, multi_subject        whether --subject is required, and whether several are graded
    [scores.NAME] min, max, aliases, list   the integers the answer must hold (a list: one per subject)
    [derived] NAME = "score" | "harmonic(a, b, ...)" | "mean(a, b, ...)"
                                        values in [0, 1] read by sweeps: `behaviour` and `coherence`
                                        at least; scores are rescaled by (v - min) / (max - min).

Rubrics are found by name among the built-in ones and the user's folder (file stems only: a name
never becomes a path), or read from an explicit file. The digest covers everything that changes
what the judge sees (prompt texts, scales, derivations and the subjects), so it keys the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from auditui.errors import AuditError

BUILTIN = Path(__file__).with_name("rubrics")
PLACEHOLDERS = {"text", "prompt", "subject", "subjects"}
_CALL = re.compile(r"^(harmonic|mean)\((.*)\)$")


@dataclass(frozen=True)
class Scale:
    name: str
    lo: float
    hi: float
    aliases: tuple[str, ...] = ()
    is_list: bool = False

    def keys(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def unit(self, value: float) -> float:
        return (value - self.lo) / (self.hi - self.lo)


@dataclass(frozen=True)
class Rubric:
    name: str
    description: str
    system: str
    user: str
    scales: tuple[Scale, ...]
    derived: dict[str, str]
    needs_subject: bool = True
    multi_subject: bool = False
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f"rubric {self.name!r}"
        if not self.scales:
            raise AuditError(f"{where} defines no [scores]")
        for scale in self.scales:
            if not scale.hi > scale.lo:
                raise AuditError(f"{where}: score {scale.name} needs max > min")
        fields = {}
        for name, template in (("system", self.system), ("user", self.user)):
            try:
                fields[name] = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as exc:
                raise AuditError(f"{where}: the {name} template is not a valid template ({exc}); "
                                 "write literal braces as {{ and }}") from None
            if fields[name] - PLACEHOLDERS:
                raise AuditError(f"{where} uses unknown placeholder(s) {sorted(fields[name] - PLACEHOLDERS)}; "
                                 f"allowed: {sorted(PLACEHOLDERS)} (write literal braces as {{{{ and }}}})")
        if "text" not in fields["user"]:
            raise AuditError(f"{where}: the user template must contain {{text}}")
        for needed in ("behaviour", "coherence"):
            if needed not in self.derived:
                raise AuditError(f"{where}: [derived] must define {needed}")
        for name, expression in self.derived.items():
            if not _operands(expression):
                raise AuditError(f"{where}: derived {name} names no score")
            unknown = set(_operands(expression)) - {s.name for s in self.scales}
            if unknown:
                raise AuditError(f"{where}: derived {name} uses unknown score(s) {sorted(unknown)}")

    def check_subjects(self, subjects: tuple[str, ...]) -> None:
        if self.needs_subject and not subjects:
            raise AuditError(f"rubric {self.name!r} needs --subject (the behaviour or topic to grade)")
        if len(subjects) > 1 and not self.multi_subject:
            raise AuditError(f"rubric {self.name!r} grades one subject; the 'subjects' rubric grades several")

    def digest(self, subjects: tuple[str, ...] = ()) -> str:
        data = [self.system, self.user, [(s.name, s.lo, s.hi, s.aliases, s.is_list) for s in self.scales],
                sorted(self.derived.items()), list(subjects)]
        return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()

    def messages(self, text: str, prompt: str = "", subjects: tuple[str, ...] = ()) -> list[dict[str, str]]:
        values = {"text": text, "prompt": prompt, "subject": subjects[0] if subjects else "",
                  "subjects": "\n".join(f"{chr(97 + i)}) {s}" for i, s in enumerate(subjects))}
        return [{"role": "system", "content": self.system.format(**values)},
                {"role": "user", "content": self.user.format(**values)}]

    def derive(self, scores: dict) -> dict[str, float]:
        """The [derived] values in [0, 1] of parsed scores (a list score counts by its first subject;
        every subject's value is kept as NAME_by_subject)."""
        units: dict[str, float] = {}
        out: dict[str, float] = {}
        for scale in self.scales:
            value = scores[scale.name]
            if scale.is_list:
                out[f"{scale.name}_by_subject"] = [scale.unit(v) for v in value]  # type: ignore[assignment]
                value = value[0]
            units[scale.name] = scale.unit(value)
        for name, expression in self.derived.items():
            out[name] = _evaluate(expression, units)
        return out


def _operands(expression: str) -> list[str]:
    call = _CALL.match(expression.strip())
    inner = call.group(2) if call else expression
    return [part.strip() for part in inner.split(",") if part.strip()]


def _evaluate(expression: str, units: dict[str, float]) -> float:
    values = [units[name] for name in _operands(expression)]
    call = _CALL.match(expression.strip())
    if call is None:
        return values[0]
    if call.group(1) == "mean":
        return sum(values) / len(values)
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def _scale(name: str, data: object, where: str) -> Scale:
    if not isinstance(data, dict) or "min" not in data or "max" not in data:
        raise AuditError(f"{where}: [scores.{name}] needs min and max")
    try:
        return Scale(name, float(data["min"]), float(data["max"]), tuple(str(a) for a in data.get("aliases", ())),
                     bool(data.get("list", False)))
    except (TypeError, ValueError):
        raise AuditError(f"{where}: [scores.{name}] min and max must be numbers") from None


def parse_rubric(text: str, where: str) -> Rubric:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuditError(f"{where} is not valid TOML: {exc}") from None
    missing = [key for key in ("name", "system", "user", "scores", "derived") if key not in data]
    if missing:
        raise AuditError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(data["scores"], dict) or not isinstance(data["derived"], dict):
        raise AuditError(f"{where}: [scores] and [derived] must be tables")
    return Rubric(str(data["name"]), str(data.get("description", "")), str(data["system"]), str(data["user"]),
                  tuple(_scale(k, v, where) for k, v in data["scores"].items()),
                  {str(k): str(v) for k, v in data["derived"].items()}, bool(data.get("needs_subject", True)),
                  bool(data.get("multi_subject", False)), where)


def read_rubric_file(path: Path) -> Rubric:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read rubric file {path}: {exc}") from None
    return parse_rubric(text, str(path))


def rubric_files(folders: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Rubric name (file stem) -> file; the user's folders override the built-in ones."""
    found: dict[str, Path] = {}
    for folder in (BUILTIN, *folders):
        if folder.is_dir():
            found.update({path.stem: path for path in sorted(folder.glob("*.toml"))})
    return found


def load_rubric(name: str, folders: tuple[Path, ...] = ()) -> Rubric:
    """A rubric by name, or from a file when `name` ends in .toml."""
    if name.endswith(".toml"):
        return read_rubric_file(Path(name))
    files = rubric_files(folders)
    if name not in files:
        raise AuditError(f"no rubric {name!r}; known: {', '.join(sorted(files))} (or give a .toml file)")
    return read_rubric_file(files[name])
