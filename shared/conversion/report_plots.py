"""report.html's plots, drawn by matplotlib without pyplot (a bare Figure never touches a GUI
backend or any global state) and written as inline SVG with fixed ids and no metadata: the
same report gives the same page."""
from __future__ import annotations

import io
import math
import re
from html import escape

import matplotlib
from matplotlib.figure import Figure

TOLERANCE_COLOR, HALF_COLOR, MARGIN_COLOR = "#cf222e", "#bc4c00", "#6e7781"
LABELLED_SITES = 48  # up to this many sites the plots name each; more are numbered
_SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "attnonly-report", "font.size": 9}
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_plot(name: str, names, series, lines, ylabel: str, xlabel: str, labelled: bool = False) -> str:
    """Markers per x position on a log y axis, with horizontal reference lines. An error of 0
    (a log axis has none) sits hollow on the bottom edge, marked "0"; a non-finite one hollow
    on the top edge."""
    values = [v for _, ys, _, _ in series for v in ys if finite(v) and v > 0] + [y for y, *_ in lines]
    low, high = (min(values), max(values)) if values else (1e-8, 1.0)
    floor, ceiling = low / 10, high * 10
    fig = Figure(figsize=(10, 3.4 + _label_height(names, labelled)), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    limit = lines[0][0] if lines else None
    for label, ys, marker, color in series:
        ax.plot(xs, [_clip(v, floor, ceiling) if finite(v) else math.nan for v in ys], marker=marker, color=color,
                label=label, linewidth=1, markersize=5, alpha=0.9, clip_on=False)
        over = [(x, v) for x, v in zip(xs, ys) if limit is not None and finite(v) and v > limit]
        if over:  # over the first reference line (the tolerance): ringed
            ax.plot(*zip(*over), linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                    markeredgecolor=TOLERANCE_COLOR, markeredgewidth=1.5)
        for x, v in zip(xs, ys):
            if not (finite(v) and v > 0):
                y = _clip(v, floor, ceiling)
                ax.plot([x], [y], linestyle="none", marker=marker, markersize=10, markerfacecolor="none",
                        markeredgecolor=color, clip_on=False)
                ax.annotate("0" if finite(v) else "∞/NaN", (x, y), xytext=(8, 4), textcoords="offset points",
                            fontsize=8, color=color)
    for y, label, color, style in lines:
        ax.axhline(y, color=color, linestyle=style, linewidth=1.2, label=label)
    ax.set_yscale("log")
    ax.set_ylim(floor, ceiling)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    _site_ticks(ax, names, labelled)
    fig.legend(loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return svg_of(fig, name)


def construction_plot(names, heads_per_unit, omega) -> str:
    n = len(names)
    fig = Figure(figsize=(10, 4.4 + _label_height(names, False)), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(n))
    top.bar(xs, [v if finite(v) else 0 for v in heads_per_unit], color="#0969da", width=min(0.6, 0.15 * len(xs) + 0.1),
            label="heads per unit (M)")
    top.set_ylabel("heads per unit (M)")
    top.yaxis.get_major_locator().set_params(integer=True)
    top.grid(True, axis="y", alpha=0.3)
    bottom.plot(xs, [v if finite(v) else math.nan for v in omega], marker="o", color="#8250df", linewidth=1,
                label="self bias Ω of the neuron heads")
    bottom.set_ylabel("self bias Ω")
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.set_xlabel("FFN site")
    _site_ticks(bottom, names, False)
    fig.legend(loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return svg_of(fig, "construction")


def _site_ticks(ax, names, labelled: bool) -> None:
    """labelled: names are short (indices), shown level; else site paths, rotated, up to
    LABELLED_SITES of them (more: every few indices; the tables name them)."""
    n = len(names)
    ax.set_xlim(-0.6, n - 0.4)
    if not labelled and n <= LABELLED_SITES:
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, rotation=0 if n == 1 else 90, fontsize=8 if n <= 24 else 7)
        return
    step = max(1, math.ceil(n / 40))
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels([names[i] if labelled else str(i) for i in range(0, n, step)], fontsize=8)
    if not labelled:
        ax.set_xlabel(ax.get_xlabel() + " (index; the table names them)")


def _label_height(names, labelled: bool) -> float:
    """Inches the rotated site names take below the axis."""
    if labelled or len(names) <= 1 or len(names) > LABELLED_SITES:
        return 0.0
    return min(0.075 * max(len(str(n)) for n in names), 3.0)


def svg_of(fig: Figure, name: str) -> str:
    """The figure as inline SVG: no XML prolog or DTD, text as text, ids prefixed with the plot's
    name (unique in the page: matplotlib numbers every figure's elements from 1)."""
    buffer = io.StringIO()
    with matplotlib.rc_context(_SVG_RC):
        fig.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    prefix = f"{name}-"
    text = re.sub(r'\bid="', f'id="{prefix}', text)
    text = text.replace('xlink:href="#', f'xlink:href="#{prefix}').replace("url(#", f"url(#{prefix}")
    return text


def figure_html(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def zero_note(series) -> str:
    if any(not (finite(v) and v > 0) for _, ys, _, _ in series for v in ys):
        return (" Hollow markers: an error of exactly 0, on the bottom edge (a log axis has no 0), "
                "or a non-finite one, on the top edge.")
    return ""


def _clip(value, floor: float, ceiling: float) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ceiling
    if not finite(value):
        return ceiling
    return floor if value <= 0 else value
