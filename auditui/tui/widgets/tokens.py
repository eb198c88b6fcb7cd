"""Model tokens as text: per-token activation highlighting (the theme's background blended toward its
primary colour by activation / top) and a sparkline of values. Tokens always pass `visible`."""

from __future__ import annotations

from rich.text import Text
from textual.color import Color

BARS = "▁▂▃▄▅▆▇█"


def token_text(token: str) -> str:
    """One token shown on one line: control characters escaped, newlines as ⏎."""
    from auditui.text import visible

    return visible(token).replace("\n", "⏎").replace("\t", "⇥")


def heat(app: object, tokens: list[str], values: list[float], top: float | None = None, mark: int = -1) -> Text:
    """`tokens` with a background by their activation (0 none, `top` or the largest value full); token
    index `mark` (e.g. the maximum) also bold."""
    theme = app.current_theme  # type: ignore[attr-defined]
    base, accent = Color.parse(theme.background or "black"), Color.parse(theme.primary)
    top = top or max(values, default=0.0) or 1.0
    text = Text()
    for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
        strength = max(0.0, min(1.0, value / top))
        back = base.blend(accent, strength)
        style = f"{back.get_contrast_text().hex6} on {back.hex6}" if strength > 0 else ""
        text.append(token_text(token), style=style + (" bold" if i == mark else ""))
    return text


def sparkline(values: list[float]) -> str:
    """One bar character per value, from the smallest to the largest."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BARS[round((v - low) / span * (len(BARS) - 1))] for v in values)
