"""SVG figures of judged steering runs for the HTML report and `--plot FILE.svg` (matplotlib, Agg).

    sweep_svg(result)     score (b·c or (1-b)·c) per strength with 95% intervals per curve, the
                          random band (5-95%, median dashed) under it; behaviour and coherence beside
    validate_svg(result)  Δ behaviour per latent, toward and away, for both sets, against the band

Text in the figures is auditui's own (labels, numbers); matplotlib escapes it in the SVG.
"""

from __future__ import annotations

import io
from typing import Any

from auditui.store.reports import SVG_MARK


def _figure(panels: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, panels, figsize=(4.2 * panels, 3.2), squeeze=False)
    return figure, axes[0]


def _svg(figure: Any) -> str:
    from matplotlib import pyplot

    figure.tight_layout()
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None})
    pyplot.close(figure)
    text = out.getvalue()
    return f"{SVG_MARK}\n{text[text.index('<svg'):]}"  # inline: no XML prolog or doctype


def _series(points: list[dict], name: str) -> tuple[list[float], list[float], list[list[float]]]:
    kept = [p for p in points if p[name]["mean"] is not None]
    xs = [p["strength"] for p in kept]
    ys = [p[name]["mean"] for p in kept]
    errors = [[y - (p[name]["low"] if p[name]["low"] is not None else y) for p, y in zip(kept, ys, strict=True)],
              [(p[name]["high"] if p[name]["high"] is not None else y) - y for p, y in zip(kept, ys, strict=True)]]
    return xs, ys, errors


def sweep_svg(result: dict) -> str:
    figure, (score_ax, parts_ax) = _figure(2)
    band = [p for p in result["band"]["points"] if p["score"]]
    if band:
        xs = [p["strength"] for p in band]
        score_ax.fill_between(xs, [p["score"]["low"] for p in band], [p["score"]["high"] for p in band],
                              color="0.85", label="random latents 5-95%")
        score_ax.plot(xs, [p["score"]["median"] for p in band], "--", color="0.5", label="random median")
    for curve in result["curves"]:
        xs, ys, errors = _series(curve["points"], "score")
        score_ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=curve["label"])
    first = result["curves"][0]["points"]
    for name in ("behaviour", "coherence"):
        xs, ys, errors = _series(first, name)
        parts_ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
    measure = "behaviour × coherence" if result["direction"] == "toward" else "(1 − behaviour) × coherence"
    score_ax.set(xlabel="strength", ylabel=measure, ylim=(-0.05, 1.05), title="score per strength")
    parts_ax.set(xlabel="strength", ylabel="judge score (0-1)", ylim=(-0.05, 1.05),
                 title=f"{result['curves'][0]['label']}: behaviour and coherence")
    for ax in (score_ax, parts_ax):
        ax.legend(fontsize=7)
    return _svg(figure)


def validate_svg(result: dict) -> str:
    figure, axes = _figure(2)
    for ax, direction in zip(axes, ("toward", "away"), strict=True):
        edge = result["band"]["edges"][direction]
        if edge:
            ax.axhspan(edge["low"], edge["high"], color="0.85", label="random latents 5-95%")
            ax.axhline(edge["median"], linestyle="--", color="0.5")
        for offset, (name, latents) in enumerate(result["sets"].items()):
            values = [(i, r[direction]["delta_behaviour"]) for i, r in enumerate(latents)
                      if r[direction]["delta_behaviour"] is not None]
            ax.plot([i + 0.15 * offset for i, _ in values], [v for _, v in values], "o", label=f"top Δ-{name[:4]}.")
        ax.set(xlabel="rank in its set", ylabel="Δ behaviour (steered − unsteered)",
               title=f"{result['site']}: steered {direction} (s = {result['strength']:g})")
        ax.legend(fontsize=7)
    return _svg(figure)
