"""The report's charts: matplotlib figures drawn with the Agg backend and embedded as PNG data URIs.

One function per chart; each takes plain figures (lists, dicts of the manifest's JSON) and returns
an `<img>` element, so report.html and the comparison page stay one self-contained file that
reads offline on a device. matplotlib is imported here only (never by the runtime), and only the
object-oriented API is used: `pyplot` keeps global state and is slower to import.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PRECISION_COLOURS",
    "HistoryPoint",
    "LayerRow",
    "Percentiles",
    "compare_latency",
    "compare_layers",
    "history",
    "float_or_none",
    "latency_histogram",
    "layer_times",
    "parse_time",
    "percentiles",
    "sizes",
    "sqnr",
    "stage_times",
]

#: Colours by what a kernel computes in (LayerPrecision values), the same on every chart.
PRECISION_COLOURS = {"int8": "#2f6db3", "float": "#e07b24", "other": "#a3a9b0"}
_RUN_COLOURS = ("#2f6db3", "#e07b24", "#3a9a5b", "#a2479e", "#c23b3b", "#6b6b6b")
_WIDTH_IN = 9.0  # inches at _DPI: 900 px, the page's text width
_DPI = 100
_LABEL_CHARS = 42
_SHARE_DRAWN = 200.0


@dataclass(frozen=True)
class Percentiles:
    """A latency distribution's figures (ms), computed from its samples."""

    p50: float
    p90: float
    p99: float
    min: float
    max: float
    runs: int


def percentiles(samples_ms: Sequence[float]) -> Percentiles:
    """p50/p90/p99 by linear interpolation (numpy's default, as the runtime's benchmark computes them)."""
    values = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return Percentiles(float(p50), float(p90), float(p99), float(values.min()), float(values.max()), int(values.size))


@dataclass(frozen=True)
class LayerRow:
    """One bar of a layer chart: its label, median time, precision and (when known) its SQNR."""

    label: str
    time_ms: float
    precision: str
    sqnr_db: float | None = None


@dataclass(frozen=True)
class HistoryPoint:
    """One benchmark or profile of a device: when, and its latency percentiles."""

    device: str
    time: datetime
    p50: float
    p90: float | None = None


def _figure(height_in: float, *, laid_out: bool = True) -> Figure:
    """A figure on the Agg canvas; `laid_out=False` leaves the margins to `_fit_labels` (a build's
    one-axis bar charts: constrained layout draws each figure twice, and every build draws them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(_WIDTH_IN, height_in), dpi=_DPI, layout="constrained" if laid_out else None)
    FigureCanvasAgg(figure)
    figure.set_facecolor("white")
    return figure


def _fit_labels(figure: Figure, labels: Sequence[str], fontsize: float) -> None:
    """Margins for one axis with bar labels on the left: as wide as the widest label, measured."""
    from matplotlib.font_manager import FontProperties

    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    font = FontProperties(size=fontsize)
    widest = max((renderer.get_text_width_height_descent(label, font, ismath=False)[0] for label in labels), default=0.0)
    width, height = figure.get_size_inches() * figure.dpi
    figure.subplots_adjust(left=(widest + 16) / width, right=1 - 12 / width, top=1 - 8 / height, bottom=44 / height)


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)
    ax.grid(axis="x", color="#e3e6ea", linewidth=0.8)
    ax.set_axisbelow(True)


def _img(figure: Figure, alt: str) -> str:
    """The figure as an <img> with a PNG data URI (decodes anywhere, no script, no external file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (round(v) for v in figure.get_size_inches() * _DPI)
    return f"<img class='chart' src='data:image/png;base64,{encoded}' width='{width}' height='{height}' alt='{html.escape(alt, quote=True)}'>"


def _short(label: str, limit: int = _LABEL_CHARS) -> str:
    """A long node name shortened from the left: its end (`.../layer3/conv2`) says which one it is."""
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _ms(value: float) -> str:
    return f"{value:.3g} ms" if value < 100 else f"{value:.0f} ms"


def latency_histogram(samples_ms: Sequence[float]) -> tuple[str, Percentiles]:
    """The latency distribution of one run with its real p50, p90 and p99 marked.

    When the slowest runs lie far out (max > 1.5 × p99: a page fault, a context switch), the axis
    stops a little past p99 so the body of the distribution stays readable (the report's caption
    counts the runs left out); when p99 itself is over 4 × p50, the axis is logarithmic.
    """
    figures = percentiles(samples_ms)
    values = np.asarray(samples_ms, dtype=np.float64)
    high = figures.p99 * 1.1 if figures.max > 1.5 * figures.p99 else figures.max
    low = figures.min
    if high <= low:
        high = low * 1.01 + 1e-6
    drawn = values[values <= high]
    logarithmic = low > 0 and figures.p99 > 4 * figures.p50
    count = int(min(50, max(10, math.sqrt(drawn.size) * 2)))
    bins = np.geomspace(low, high, count + 1) if logarithmic else np.linspace(low, high, count + 1)
    figure = _figure(2.6)
    ax = figure.add_subplot()
    _style(ax)
    ax.hist(drawn, bins=bins, color="#8fb8de", edgecolor="#5b8fc2", linewidth=0.5)
    if logarithmic:
        from matplotlib.ticker import LogLocator, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter() if high / low < 3 else "")
    for name, value, style in (("p50", figures.p50, "-"), ("p90", figures.p90, "--"), ("p99", figures.p99, ":")):
        ax.axvline(value, color="#b3261e", linestyle=style, linewidth=1.4, label=f"{name} {_ms(value)}")
    ax.set_xlabel("latency of one run (ms" + (", log scale)" if logarithmic else ")"), fontsize=10)
    ax.set_ylabel("runs", fontsize=10)
    ax.legend(fontsize=9, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    alt = f"latency histogram of {figures.runs} runs: p50 {figures.p50:.4g} ms, p90 {figures.p90:.4g} ms, p99 {figures.p99:.4g} ms"
    return _img(figure, alt), figures


def _bar_height(rows: int) -> float:
    return 0.7 + 0.26 * max(rows, 2)


def stage_times(stages: Sequence[tuple[str, float]]) -> str:
    """Seconds per build stage, in the order they ran."""
    figure = _figure(_bar_height(len(stages)), laid_out=False)
    ax = figure.add_subplot()
    _style(ax)
    names = [name for name, _ in stages][::-1]
    _fit_labels(figure, names, 9)
    seconds = [value for _, value in stages][::-1]
    bars = ax.barh(names, seconds, color="#4f7fbf", height=0.65)
    ax.bar_label(bars, labels=[f"{s:.3g} s" for s in seconds], padding=3, fontsize=9)
    ax.set_xlabel("seconds", fontsize=10)
    ax.margins(x=0.12)
    return _img(figure, "seconds per build stage: " + ", ".join(f"{n} {s:.3g} s" for n, s in stages))


def sizes(rows: Sequence[tuple[str, float, float, str]]) -> str:
    """After as a share of before, one bar per measure; rows are (measure, before, after, before → after text)."""
    figure = _figure(_bar_height(len(rows)), laid_out=False)
    ax = figure.add_subplot()
    _style(ax)
    names = [name for name, *_ in rows][::-1]
    _fit_labels(figure, names, 9)
    shares = [100.0 * after / before if before else 0.0 for _, before, after, _ in rows][::-1]
    texts = [f"{text} ({share:.0f}%)" for (*_, text), share in zip(rows[::-1], shares)]
    drawn = [min(share, _SHARE_DRAWN) for share in shares]  # a growth past 200% is drawn to the edge, its text says how far
    bars = ax.barh(names, drawn, color=["#3a9a5b" if s < 100 else "#c23b3b" if s > 100 else "#a3a9b0" for s in shares], height=0.6)
    ax.bar_label(bars, labels=texts, padding=3, fontsize=9)
    ax.axvline(100, color="#555", linewidth=0.8)
    ax.set_xlim(0, 1.6 * max(100.0, max(drawn)))
    ax.set_xlabel("after the build, % of the source model (100% = unchanged)", fontsize=10)
    return _img(figure, "sizes after the build as a share of the source model: " + "; ".join(texts[::-1]))


def _precision_legend(ax: Axes, present: set[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=f"computes in {name}" if name != "other" else "moves data (other)") for name, colour in PRECISION_COLOURS.items() if name in present]
    ax.legend(handles=handles, fontsize=9, frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=len(handles))


def layer_times(rows: Sequence[LayerRow], *, with_sqnr: bool) -> str:
    """Layers slowest first, coloured by precision; with `with_sqnr`, each layer's SQNR beside it."""
    labels = [_short(r.label) for r in rows][::-1]
    times = [r.time_ms for r in rows][::-1]
    colours = [PRECISION_COLOURS.get(r.precision, PRECISION_COLOURS["other"]) for r in rows][::-1]
    figure = _figure(_bar_height(len(rows)))
    if with_sqnr:
        ax, ax_sqnr = figure.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1.4]})
        figure.get_layout_engine().set(wspace=0.01)  # type: ignore[union-attr]
    else:
        ax, ax_sqnr = figure.add_subplot(), None
    _style(ax)
    bars = ax.barh(labels, times, color=colours, height=0.7)
    ax.bar_label(bars, labels=[_ms(t) for t in times], padding=3, fontsize=8)
    ax.margins(x=0.18)
    ax.set_xlabel("median time per run (ms)", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    _precision_legend(ax, {r.precision for r in rows})
    if ax_sqnr is not None:
        _style(ax_sqnr)
        known = [r.sqnr_db for r in rows][::-1]
        values = [v if v is not None else 0.0 for v in known]
        sqnr_bars = ax_sqnr.barh(labels, values, color=["#7a5fb0" if v is not None else "#ffffff" for v in known], height=0.7)
        ax_sqnr.bar_label(sqnr_bars, labels=["–" if v is None else f"{v:.1f} dB" for v in known], padding=3, fontsize=8)
        ax_sqnr.margins(x=0.2)
        ax_sqnr.set_xlabel("output SQNR vs fp32 (dB)", fontsize=10)
        ax_sqnr.tick_params(axis="y", left=False)
    alt = "layer times: " + ", ".join(f"{r.label} {r.time_ms:.3g} ms {r.precision}" for r in rows[:10])
    return _img(figure, alt)


def sqnr(rows: Sequence[tuple[str, float]]) -> str:
    """SQNR per tensor or layer, noisiest first."""
    figure = _figure(_bar_height(len(rows)), laid_out=False)
    ax = figure.add_subplot()
    _style(ax)
    labels = [_short(name) for name, _ in rows][::-1]
    _fit_labels(figure, labels, 8)
    values = [value for _, value in rows][::-1]
    bars = ax.barh(labels, values, color="#7a5fb0", height=0.7)
    ax.bar_label(bars, labels=[f"{v:.1f} dB" for v in values], padding=3, fontsize=8)
    ax.margins(x=0.12)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("SQNR against fp32 (dB, higher is better)", fontsize=10)
    return _img(figure, "SQNR, noisiest first: " + ", ".join(f"{n} {v:.1f} dB" for n, v in rows[:10]))


def history(points: Sequence[HistoryPoint]) -> str:
    """Latency over time, one line per device: p50 as the line, p90 as the bar above each point."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    figure = _figure(3.0)
    ax = figure.add_subplot()
    _style(ax)
    ax.grid(axis="y", color="#e3e6ea", linewidth=0.8)
    devices = sorted({p.device for p in points})
    for index, device in enumerate(devices):
        own = sorted((p for p in points if p.device == device), key=lambda p: p.time)
        colour = _RUN_COLOURS[index % len(_RUN_COLOURS)]
        times = [p.time for p in own]
        p50 = [p.p50 for p in own]
        above = [max(0.0, (p.p90 if p.p90 is not None else p.p50) - p.p50) for p in own]
        ax.errorbar(times, p50, yerr=[[0.0] * len(own), above], color=colour, marker="o", markersize=4, capsize=3, linewidth=1.4, label=device)
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time of the run (UTC)", fontsize=10)
    ax.set_ylabel("latency p50 (ms; bar to p90)", fontsize=10)
    ax.legend(fontsize=9, frameon=False, loc="best")
    return _img(figure, f"latency over time on {len(devices)} device(s), {len(points)} runs")


def compare_latency(runs: Sequence[tuple[str, Mapping[str, float | None]]], samples: Mapping[str, Sequence[float]]) -> str:
    """Runs side by side: p50/p90/p99 bars (left) and their latency distributions (right, where samples exist)."""
    figure = _figure(3.2)
    with_samples = [label for label, _ in runs if samples.get(label)]
    ax, ax_dist = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1]}) if with_samples else (figure.add_subplot(), None)
    _style(ax)
    ax.grid(axis="x", visible=False)
    ax.grid(axis="y", color="#e3e6ea", linewidth=0.8)
    names = ("p50", "p90", "p99")
    width = 0.8 / max(len(runs), 1)
    for index, (label, latency) in enumerate(runs):
        values = [float(latency.get(n) or 0.0) for n in names]
        positions = [i + (index - (len(runs) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(positions, values, width=width * 0.95, color=_RUN_COLOURS[index % len(_RUN_COLOURS)], label=_short(label, 30))
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=2, fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("latency (ms)", fontsize=10)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    if ax_dist is not None:
        _style(ax_dist)
        everything = np.concatenate([np.asarray(samples[label], dtype=np.float64) for label in with_samples])
        low = float(everything.min())
        high = 1.1 * max(float(np.percentile(samples[label], 99)) for label in with_samples)
        for index, (label, _) in enumerate(runs):
            if label in with_samples:
                ax_dist.hist(
                    np.clip(samples[label], low, high), bins=40, range=(low, high if high > low else low + 1e-6), histtype="step",
                    linewidth=1.6, color=_RUN_COLOURS[index % len(_RUN_COLOURS)], label=_short(label, 30),
                )
        ax_dist.set_xlabel("latency of one run (ms; past 1.1 × p99: at the edge)", fontsize=10)
        ax_dist.legend(fontsize=8, frameon=False, loc="upper right")
        ax_dist.set_ylabel("runs", fontsize=10)
    return _img(figure, "latency percentiles side by side: " + "; ".join(f"{label} p50 {latency.get('p50')}" for label, latency in runs))


def compare_layers(labels: Sequence[str], names: Sequence[str], times: Sequence[Sequence[float | None]]) -> str:
    """Per-layer time of each run side by side, for the layers matched by ONNX node name (slowest first)."""
    figure = _figure(_bar_height(len(names) * max(1, len(labels)) // 2 + 2))
    ax = figure.add_subplot()
    _style(ax)
    height = 0.8 / max(len(labels), 1)
    positions = np.arange(len(names))[::-1]
    for index, label in enumerate(labels):
        values = [t if t is not None else 0.0 for t in times[index]]
        bars = ax.barh(positions - (index - (len(labels) - 1) / 2) * height, values, height=height * 0.95, color=_RUN_COLOURS[index % len(_RUN_COLOURS)], label=_short(label, 30))
        ax.bar_label(bars, labels=["–" if t is None else f"{t:.3g}" for t in times[index]], padding=2, fontsize=7)
    ax.set_yticks(positions, [_short(n) for n in names], fontsize=8)
    ax.set_xlabel("median time per run (ms)", fontsize=10)
    ax.margins(x=0.12)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return _img(figure, "per-layer time side by side for " + ", ".join(labels))


def parse_time(text: str | None) -> datetime | None:
    """An ISO time from the manifest's history; None when absent or unreadable."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None
