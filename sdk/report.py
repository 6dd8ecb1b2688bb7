"""report.html: the build's story as tables and inline SVG charts, one self-contained file."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from edgeopt.bundle import write_text_atomically
from edgeopt.runtime.manifest import JsonObject, Manifest

__all__ = ["write_report"]

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:980px;color:#1d232a}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#667}svg text{font:11px system-ui,sans-serif}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td class='n'>{_e(c)}</td>" if isinstance(c, (int, float)) else f"<td>{_e(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _bars(items: list[tuple[str, float]], unit: str, width: int = 640) -> str:
    """Horizontal bar chart; where a person would rather look than read."""
    if not items:
        return ""
    peak = max(v for _, v in items) or 1.0
    row, label_w = 22, 190
    parts = [f"<svg width='{width}' height='{row * len(items) + 6}' role='img'>"]
    for i, (label, value) in enumerate(items):
        w = max(1.0, (width - label_w - 90) * value / peak)
        y = i * row + 3
        parts.append(f"<text x='0' y='{y + 14}'>{_e(label[:30])}</text>")
        parts.append(f"<rect x='{label_w}' y='{y}' width='{w:.1f}' height='{row - 6}' fill='#4f7fbf'/>")
        parts.append(f"<text x='{label_w + w + 4:.1f}' y='{y + 14}'>{value:.4g} {_e(unit)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _histogram(samples: list[float], width: int = 640, height: int = 140, bins: int = 40) -> str:
    """Latency distribution of one benchmark run up to p99, with the median marked.

    The range stops at p99 so that one slow outlier (a page fault, a context switch) does not
    squash the distribution into one bar; the runs beyond are counted in the caption.
    """
    if len(samples) < 2:
        return ""
    ordered = sorted(samples)
    lo, hi = ordered[0], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    span = (hi - lo) or 1e-9
    counts = [0] * bins
    beyond = 0
    for s in samples:
        if s > hi:
            beyond += 1
            continue
        counts[min(bins - 1, int((s - lo) / span * bins))] += 1
    peak = max(counts)
    bar_w = width / bins
    parts = [f"<svg width='{width}' height='{height + 20}' role='img'>"]
    for i, c in enumerate(counts):
        h = (height - 10) * c / peak
        parts.append(f"<rect x='{i * bar_w:.1f}' y='{height - h:.1f}' width='{bar_w - 1:.1f}' height='{h:.1f}' fill='#5a9e6f'/>")
    median = ordered[len(ordered) // 2]
    x = (median - lo) / span * width
    parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{height}' stroke='#c33'/>")
    parts.append(f"<text x='0' y='{height + 15}'>{lo:.3g} ms</text><text x='{width - 280}' y='{height + 15}'>{hi:.3g} ms (p99; {beyond} slower run(s) not drawn)</text>")
    parts.append(f"<text x='{min(x + 4, width - 90):.1f}' y='12'>p50 {median:.3g} ms</text></svg>")
    return "".join(parts)


def _bench_section(title: str, bench: JsonObject) -> str:
    latency = bench.get("latency_ms", {})
    rows = [[k, round(float(v), 4)] for k, v in latency.items() if isinstance(v, (int, float))]
    samples = bench.get("samples_ms") or []
    return f"<h3>{_e(title)}</h3>" + _table(["latency", "ms"], rows) + _histogram([float(s) for s in samples])


def all_float(manifest: Manifest) -> bool:
    """The accuracy budget held only with every quantized layer kept in float."""
    return bool(((manifest.quantization or {}).get("budget") or {}).get("all_float"))


def precision_label(manifest: Manifest) -> str:
    """The precision as built: an int8 build whose budget kept every layer in float is not called int8."""
    if all_float(manifest):
        return "float: the accuracy budget kept every layer out of int8"
    return str(manifest.precision)


def _rounded(value: float | None) -> float | str:
    """A quality figure for the table; null in the manifest (not finite) stays visible as such."""
    return "-" if value is None else round(value, 5)


def render(manifest: Manifest) -> str:
    m = manifest
    assert m.target is not None and m.compression is not None and m.reference is not None and m.reference.measured is not None
    comp, measured = m.compression, m.reference.measured
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>edgeopt: {_e(m.name)} for {_e(m.target.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(m.name)} → {_e(m.target.name)} ({_e(m.target.artifact_format)}, {_e(precision_label(m))})</h1>",
        f"<p class='muted'>edgeopt {_e(m.edgeopt_version)}, {_e(m.created_at)}; runtime backend {_e(m.runtime.backend)}</p>",
        "<h2>Size and compute</h2>",
        _table(
            ["", "before", "after"],
            [
                ["bytes", comp.bytes_before, comp.bytes_after],
                ["parameters", comp.parameters_before, comp.parameters_after],
                ["MACs", comp.macs_before, comp.macs_after],
                ["nodes", comp.nodes_before, comp.nodes_after],
            ],
        ),
        _bars([("source model", comp.bytes_before / 1e6), ("bundle artifact", comp.bytes_after / 1e6)], "MB"),
        "<h2>Stages</h2>",
        _bars([(s.name, float(s.seconds)) for s in m.stages], "s"),
        f"<h2>Lowering parity: the artifact against its {_e(measured.against)} graph</h2>",
        _table(
            ["output", "max |Δ|", "allowed"],
            [
                [name, float(f"{o['max_abs']:.4g}"), float(f"{o['allowed']:.4g}") if "allowed" in o else "not checked"]
                for name, o in measured.outputs.items()
            ],
        ),
    ]
    if m.quality:
        parts += [f"<h2>Quantization quality against fp32 ({m.quality.samples} samples of {_e(m.quality.data)})</h2>",
                  _table(["metric", "output", "fp32", "optimized", "delta"], [
            [q.name, q.output, _rounded(q.fp32), _rounded(q.optimized), _rounded(q.delta)] for q in m.quality.metrics
        ])]
    quant = m.quantization or {}
    if quant.get("per_layer_sqnr"):
        layers = sorted(quant["per_layer_sqnr"], key=lambda r: r.get("sqnr_db", 0.0))[:25]
        parts += ["<h2>Quantization: the 25 noisiest tensors (SQNR, dB; higher is better)</h2>",
                  _bars([(str(r.get("tensor", r.get("node", "?"))), float(r.get("sqnr_db", 0.0))) for r in layers], "dB")]
    if quant.get("float_fallback"):
        parts += ["<p>Kept in float to meet the budget: " + _e(", ".join(quant["float_fallback"])) + "</p>"]
    for bench in m.benchmarks:
        parts.append(_bench_section(f"Benchmark on {bench.results.get('device', {}).get('hostname', 'this host')}", bench.results))
    for profile in m.profiles:
        parts.append(_bench_section(f"Profile on {profile.host} at {profile.time}", profile.results.get("bench", {})))
    parts.append("<h2>Artifacts</h2>")
    parts.append(_table(["path", "role", "bytes", "sha256"], [[a.path, a.role, a.bytes, (a.sha256 or "")[:16] + "…"] for a in m.artifacts]))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(bundle_dir: Path, manifest: Manifest) -> Path:
    path = bundle_dir / "report.html"
    write_text_atomically(path, render(manifest))
    return path
