"""A judge's answer -> the rubric's scores, or the reason it cannot be scored.

Strict first: the whole answer (fences allowed) is one JSON object with every score in range.
Then tolerant: the last JSON object inside prose that holds every score, then bounded ratings
`NAME: [[s]]` per score (or `Rating: [[s]]` for a one-score rubric). An answer that still fails is
unscored with a reason: it is never read as 0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from auditui.judge.rubrics import Rubric, Scale

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_RATING = r"(?i)\b(?:{key})\b[^\[\n]{{0,20}}\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]"


@dataclass(frozen=True)
class Parsed:
    scores: dict | None  # score name -> number (or list of numbers)
    how: str  # json | embedded | rating | unscored
    reason: str = ""


def _value(scale: Scale, value: object) -> object:
    """The score's number(s) if in range, else None."""
    if scale.is_list:
        if not isinstance(value, list) or not value:
            return None
        items = [_value(Scale(scale.name, scale.lo, scale.hi), v) for v in value]
        return None if any(v is None for v in items) else items
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        if not math.isfinite(value):
            return None
    except OverflowError:  # an integer too large for a float
        return None
    return float(value) if scale.lo <= value <= scale.hi else None


def _scores(obj: object, rubric: Rubric, subjects: int | None) -> tuple[dict | None, str]:
    if not isinstance(obj, dict):
        return None, "the JSON is not an object"
    lowered = {str(k).lower(): v for k, v in obj.items()}
    scores = {}
    for scale in rubric.scales:
        key = next((k for k in scale.keys() if k.lower() in lowered), None)
        if key is None:
            return None, f"no {scale.name} in the answer"
        value = _value(scale, lowered[key.lower()])
        if scale.is_list and value is not None and subjects is not None and len(value) != subjects:
            return None, f"{scale.name} has {len(value)} values for {subjects} subjects"
        if value is None:
            return None, f"{scale.name} = {lowered[key.lower()]!r} is outside {scale.lo:g}..{scale.hi:g}"
        scores[scale.name] = value
    return scores, ""


def _objects(text: str) -> list[object]:
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
            found.append(obj)
            start = text.find("{", end)
        except ValueError:
            start = text.find("{", start + 1)
    return found


def _ratings(text: str, rubric: Rubric) -> dict | None:
    scales = [s for s in rubric.scales if not s.is_list]
    if len(scales) != len(rubric.scales):
        return None
    scores = {}
    for scale in scales:
        keys = [*scale.keys(), "rating"] if len(scales) == 1 else list(scale.keys())
        match = re.search(_RATING.format(key="|".join(map(re.escape, keys))), text)
        value = _value(scale, float(match.group(1))) if match else None
        if value is None:
            return None
        scores[scale.name] = value
    return scores


def parse_answer(raw: str, rubric: Rubric, subjects: int | None = None) -> Parsed:
    """`subjects`: how many values a list score must hold (None: any number)."""
    text = raw.strip()
    fenced = _FENCE.match(text)
    try:
        scores, reason = _scores(json.loads(fenced.group(1) if fenced else text), rubric, subjects)
        if scores is not None:
            return Parsed(scores, "json")
    except ValueError:
        reason = "not JSON"
    for obj in reversed(_objects(text)):
        scores, _ = _scores(obj, rubric, subjects)
        if scores is not None:
            return Parsed(scores, "embedded")
    scores = _ratings(text, rubric)
    if scores is not None:
        return Parsed(scores, "rating")
    return Parsed(None, "unscored", reason if text else "empty answer")
