"""report.html: the build's story — tables and matplotlib charts in one self-contained file.

The page is redrawn whenever a benchmark or profile is appended, so it also carries each run's
latency distribution, device facts and reference check, the layer timings beside each layer's
quantization error, and latency over time per device. Images are PNG data URIs: the file opens
offline, on a device, with no script. `comparison_page` draws `edgeopt compare --html`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeopt import report_charts as charts
from edgeopt.bundle import write_text_atomically
from edgeopt.compare import Comparison, Run, runs_of
from edgeopt.runtime.manifest import JsonObject, Manifest

__all__ = ["SECTIONS", "all_float", "comparison_page", "precision_label", "render", "write_report"]

#: Section ids of report.html, in page order (the test checks each one the manifest has data for).
SECTIONS = ("sizes", "stages", "parity", "quality", "layers", "quantization", "runs", "history", "artifacts")
#: The newest runs drawn in full; older ones are in the history chart and table.
_RUNS_DRAWN = 5
_LAYERS_DRAWN = 25

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:920px;padding:0 1rem;color:#1d232a}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2.2rem;border-bottom:1px solid #d8dde3;padding-bottom:.2rem}
h3{font-size:1rem;margin:1.6rem 0 .4rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .6rem;border-bottom:1px solid #eceff2;text-align:left;vertical-align:top}
th{font-weight:600;color:#3b4450}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td{overflow-wrap:break-word}td:first-child{white-space:nowrap}
.muted{color:#5f6b78}.bad{color:#b3261e;font-weight:600}.good{color:#1e7b3c;font-weight:600}
img.chart{display:block;max-width:100%;height:auto;margin:.4rem 0}
.facts{display:grid;grid-template-columns:1fr 1fr;gap:0 1.5rem}.verdict{font-size:1.1rem;font-weight:600;margin:.4rem 0}
code{font-size:.92em;background:#f3f5f7;padding:0 .2em;border-radius:3px}
table.figures td:not(:first-child),table.figures th:not(:first-child){text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"<td class='n'>{_e(value)}</td>"
    return f"<td>{_e(value)}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, figures: bool = False) -> str:
    """A table; with `figures`, every column after the first is right-aligned (formatted numbers)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table{' class=figures' if figures else ''}><tr>{head}</tr>{body}</table>"


def _section(key: str, title: str, *body: str) -> str:
    return f"<section id='{key}'><h2>{_e(title)}</h2>{''.join(body)}</section>"


def _page(title: str, heading: str, body: Sequence[str]) -> str:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{heading}{''.join(body)}</body></html>\n"
    )


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


def _bytes(count: float | None) -> str:
    if count is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g}\u00a0{unit}"  # a no-break space: a table cell never splits 43 kB
    return f"{count:.0f}\u00a0B"


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


# -- the build -----------------------------------------------------------------------------------


def _sizes(m: Manifest) -> str:
    comp = m.compression
    assert comp is not None
    rows = [
        ("bytes", comp.bytes_before, comp.bytes_after, f"{_bytes(comp.bytes_before)} → {_bytes(comp.bytes_after)}"),
        ("parameters", comp.parameters_before, comp.parameters_after, f"{_count(comp.parameters_before)} → {_count(comp.parameters_after)}"),
        ("MACs", comp.macs_before, comp.macs_after, f"{_count(comp.macs_before)} → {_count(comp.macs_after)}"),
        ("nodes", comp.nodes_before, comp.nodes_after, f"{comp.nodes_before} → {comp.nodes_after}"),
    ]
    table = _table(["", "source model", "bundle artifact"], [[name, before, after] for name, before, after, _ in rows])
    share = f"<p class='muted'>Quantized op share {comp.quantized_op_share:.0%}; pruned {comp.pruning_ratio:.0%} of parameters.</p>"
    return _section("sizes", "Size and compute: source model → bundle", table, charts.sizes(rows), share)


def _stage_facts(m: Manifest, name: str, details: JsonObject) -> tuple[str, str, str]:
    """(nodes, size, fidelity against fp32) a stage leaves, where the build recorded them."""
    comp, quant, quality = m.compression, m.quantization or {}, m.quality
    nodes = size = fidelity = ""
    if "nodes_before" in details and "nodes_after" in details:
        nodes = f"{details['nodes_before']} → {details['nodes_after']}"
    elif "nodes" in details:
        nodes = str(details["nodes"])
    if name == "load" and comp is not None:
        size = _bytes(comp.bytes_before)
    if name == "quantize":
        search = (quant.get("techniques") or {}).get("search") or {}
        if isinstance(search.get("sqnr_db"), (int, float)):
            fidelity = f"held-out SQNR {search['sqnr_db']:.1f} dB"
        if quant.get("quantized_nodes") is not None:
            nodes = f"{nodes} ({quant['quantized_nodes']} quantized)".strip()
    if name == "lower" and comp is not None:
        size = _bytes(comp.bytes_after)
    if name == "verify" and isinstance(details.get("max_abs"), (int, float)):
        fidelity = f"max |Δ| {details['max_abs']:.3g} against {details.get('against', 'the graph')}"
    if name == "evaluate" and quality is not None:
        figures = {q.name: q.optimized for q in quality.metrics}
        parts = [f"top-1 agreement {100 * figures['top1_agreement']:.2f}%" if figures.get("top1_agreement") is not None else ""]
        sqnr = quality.fidelity.get("min_sqnr_db")
        parts.append(f"SQNR {sqnr:.1f} dB" if isinstance(sqnr, (int, float)) else "")
        fidelity = ", ".join(p for p in parts if p)
    return nodes, size, fidelity


def _details(details: JsonObject) -> str:
    shown = [f"{k}={v}" for k, v in details.items() if isinstance(v, (str, int, float, bool)) and k not in ("nodes", "nodes_before", "nodes_after")]
    lists = [f"{k}: {', '.join(map(str, v))}" for k, v in details.items() if isinstance(v, list) and v and all(isinstance(x, str) for x in v)]
    text = "; ".join(shown + lists)
    return text if len(text) <= 120 else text[:119] + "…"


def _stages(m: Manifest) -> str:
    rows = []
    for stage in m.stages:
        nodes, size, fidelity = _stage_facts(m, stage.name, stage.details)
        rows.append([stage.name, round(stage.seconds, 3), "yes" if stage.changed else "no", nodes, size, fidelity, _details(stage.details)])
    note = ("<p class='muted'>The build does not time the model after each stage: latency is measured on the final artifact by "
            "<code>edgeopt bench</code> and <code>edgeopt profile</code> (below); <code>edgeopt compare</code> sets an fp32 and an "
            "int8 bundle side by side.</p>")
    return _section(
        "stages", "What each stage did",
        _table(["stage", "seconds", "changed", "nodes", "size", "fidelity vs fp32", "details"], rows),
        charts.stage_times([(s.name, float(s.seconds)) for s in m.stages]), note,
    )


def _parity(m: Manifest) -> str:
    assert m.reference is not None and m.reference.measured is not None
    measured = m.reference.measured
    rows = [
        [name, float(f"{o['max_abs']:.4g}"), float(f"{o['allowed']:.4g}") if "allowed" in o else "not checked"]
        for name, o in measured.outputs.items()
    ]
    note = f"<p class='muted'>{_e(measured.note)}</p>" if measured.note else ""
    return _section("parity", f"Lowering parity: the artifact against its {measured.against} graph ({measured.verified_with})",
                    _table(["output", "max |Δ|", "allowed"], rows), note)


def _quality(m: Manifest) -> str:
    assert m.quality is not None
    q = m.quality
    rows = [[x.name, x.output, _rounded(x.fp32), _rounded(x.optimized), _rounded(x.delta)] for x in q.metrics]
    budget = ""
    if q.budget is not None:
        budget = f"<p>Budget: {_e(q.budget.metric)} may drop {q.budget.max_drop:g} points; it dropped {q.budget.drop:.2f}.</p>"
    return _section("quality", f"Quantization quality against fp32 ({q.samples} samples of {q.data})",
                    _table(["metric", "output", "fp32", "optimized", "delta"], rows), budget)


def _layer_sqnr(m: Manifest) -> dict[str, float]:
    """ONNX node -> the SQNR (dB) of its output against fp32, from the quantizer's per-layer report."""
    rows = (m.quantization or {}).get("per_layer_sqnr") or []
    return {str(r["node"]): float(r["sqnr_db"]) for r in rows if r.get("kind") == "layer" and isinstance(r.get("sqnr_db"), (int, float))}


def _layer_rows(layers: JsonObject, sqnr_by_node: dict[str, float]) -> list[charts.LayerRow]:
    rows = []
    for row in layers["layers"][:_LAYERS_DRAWN]:
        nodes = [str(n) for n in row.get("nodes") or ()]
        known = [sqnr_by_node[n] for n in nodes if n in sqnr_by_node]
        label = f"{row.get('op_type')} {nodes[0] if nodes else row.get('kernel')}" + (f" +{len(nodes) - 1}" if len(nodes) > 1 else "")
        rows.append(charts.LayerRow(label, float(row["time_ms"]), str(row.get("precision")), min(known) if known else None))
    return rows


def _layer_figures(layers: JsonObject) -> str:
    figures = [f"{len(layers['layers'])} kernels over {layers.get('runs')} profiled runs ({_e(layers.get('profiler'))})"]
    if layers.get("coverage") is not None:
        figures.append(f"the layers sum to {layers['coverage']:.0%} of a profiled run ({layers.get('profiled_run_ms'):.3g} ms)")
    if layers.get("overhead") is not None:
        figures.append(f"profiler overhead ×{layers['overhead']:.2f}")
    if layers.get("unmapped_kernels"):
        figures.append(f"{layers['unmapped_kernels']} kernels not mapped to ONNX nodes")
    return f"<p class='verdict'>{_e(layers.get('summary'))}</p><p class='muted'>{'; '.join(figures)}.</p>"


def _layers(m: Manifest, run: Run) -> str:
    layers = run.layers
    assert layers is not None
    sqnr_by_node = _layer_sqnr(m)
    rows = _layer_rows(layers, sqnr_by_node)
    with_sqnr = any(r.sqnr_db is not None for r in rows)
    title = f"Where the time goes: layers on {run.device_name} ({run.backend})" + (", beside each layer's quantization error" if with_sqnr else "")
    shown = min(len(layers["layers"]), _LAYERS_DRAWN)
    caption = f"<p class='muted'>The {shown} slowest of {len(layers['layers'])} kernels, from the {run.kind} at {_e(_when(run.time))} UTC."
    if with_sqnr:
        caption += " SQNR is the layer output's against fp32 on calibration data (–: not quantized or not measured)."
    return _section("layers", title, _layer_figures(layers), charts.layer_times(rows, with_sqnr=with_sqnr), caption + "</p>")


def _quantization(m: Manifest) -> str:
    quant = m.quantization or {}
    rows = [r for r in quant.get("per_layer_sqnr") or [] if isinstance(r.get("sqnr_db"), (int, float))]
    by_layer = [r for r in rows if r.get("kind") == "layer"] or rows
    noisiest = sorted(by_layer, key=lambda r: float(r["sqnr_db"]))[:_LAYERS_DRAWN]
    items = [(f"{r.get('op', '')} {r.get('node') or r.get('tensor') or '?'}".strip(), float(r["sqnr_db"])) for r in noisiest]
    kind = "layers" if by_layer is not rows else "tensors"
    parts = [charts.sqnr(items)] if items else []
    if quant.get("float_fallback"):
        parts.append("<p>Kept in float to meet the budget: " + _e(", ".join(quant["float_fallback"])) + "</p>")
    return _section("quantization", f"Quantization error: the {len(items)} noisiest {kind} (SQNR against fp32, dB; higher is better)", *parts)


# -- the runs ------------------------------------------------------------------------------------


def _thermal(run: Run) -> tuple[JsonObject, JsonObject]:
    """(before, after) thermal facts: a profile keeps both in its device entry, a benchmark its own."""
    before = run.device.get("thermal_before") or run.device
    after = run.device.get("thermal_after") or run.bench.get("thermal_after") or {}
    return before, after


def _temperature(facts: JsonObject) -> str:
    temperatures = [v for v in (facts.get("temperatures_c") or {}).values() if isinstance(v, (int, float))]
    return f"{max(temperatures):.1f} °C" if temperatures else "not exposed"


def _clock(facts: JsonObject) -> str:
    clocks = [v for v in (facts.get("cpu_frequency_mhz") or {}).values() if isinstance(v, (int, float))]
    governors = sorted(set((facts.get("cpu_governor") or {}).values()))
    text = f"{sum(clocks) / len(clocks):.0f} MHz mean over {len(clocks)} CPUs" if clocks else "not exposed"
    return text + (f" ({', '.join(governors)})" if governors else "")


def _before_after(before: str, after: str) -> str:
    return before if before == after == "not exposed" else f"{before} → {after}"


def _when(text: str | None) -> str:
    """An ISO time as people read it in a table (UTC): 2026-12-04 15:51:34."""
    when = charts.parse_time(text)
    return "?" if when is None else when.strftime("%Y-%m-%d %H:%M:%S")


def _device_rows(run: Run) -> list[list[Any]]:
    device, bench = run.device, run.bench
    cpu, system = device.get("cpu") or {}, device.get("os") or {}
    before, after = _thermal(run)
    backend = bench.get("backend") or {}
    stand_in = f" (stand-in for {backend['stand_in_for']})" if backend.get("stand_in_for") else ""
    rows = [
        ["device", f"{device.get('hostname', run.device_name)}" + (f", {device['board']}" if device.get("board") else "")],
        ["CPU", f"{cpu.get('model') or 'unknown'}, {cpu.get('usable_cores') or '?'} of {cpu.get('logical_cores') or '?'} cores, ISA {cpu.get('isa_class') or '?'}"],
        ["OS", f"{system.get('distribution') or system.get('system', '?')}, {system.get('machine', '?')}, kernel {system.get('release', '?')}"],
        ["backend", f"{backend.get('name', '?')} {backend.get('version') or ''}{stand_in}, threads {bench.get('threads') or 'default'}"],
        ["temperature before → after", _before_after(_temperature(before), _temperature(after))],
        ["CPU clock before → after", _before_after(_clock(before), _clock(after))],
    ]
    if device.get("throttled_during_run") is not None:
        rows.append(["throttled during the run", "yes" if device["throttled_during_run"] else "no"])
    if (after.get("power_mode") or {}).get("mode"):
        rows.append(["power mode", after["power_mode"]["mode"]])
    return rows


def _parity_of(run: Run) -> str:
    verify = run.verify
    if verify is None:
        return ("<p class='muted'>Reference parity: not checked by this run (<code>edgeopt bench</code> only times; "
                "<code>edgeopt verify</code> and <code>edgeopt profile</code> check the reference outputs).</p>")
    passed = verify.get("passed")
    outputs = verify.get("outputs") or []
    rows = [[o.get("name"), "pass" if o.get("passed") else "FAIL", _maybe(o.get("max_abs")), _maybe(o.get("rms")), _maybe(o.get("allowed_rms")), o.get("mismatched", "")]
            for o in outputs]
    verdict = "<span class='good'>passed</span>" if passed else "<span class='bad'>FAILED</span>"
    return (f"<p>Reference parity on the device: {verdict} ({verify.get('samples')} samples, {_e(verify.get('backend'))} "
            f"{_e(verify.get('backend_version') or '')})</p>" + _table(["output", "", "max |Δ|", "RMS", "allowed RMS", "mismatched"], rows))


def _maybe(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, (int, float)) and not isinstance(value, bool) else ("–" if value is None else value)


def _run(run: Run) -> str:
    bench = run.bench
    latency = bench.get("latency_ms") or {}
    memory = bench.get("memory") or {}
    heading = f"<h3>{_e(run.kind.capitalize())} on {_e(run.device_name)}, {_e(_when(run.time))} UTC</h3>"
    parts = [heading, "<div class='facts'>", _table(["fact", ""], _device_rows(run))]
    figures = [[f"latency {k}", f"{float(v):.4g} ms"] for k, v in latency.items() if isinstance(v, (int, float))]
    figures += [["throughput", f"{float(bench.get('throughput_per_s') or 0.0):.1f} /s"], ["peak RSS", _bytes(memory.get("peak_rss_bytes"))],
                ["load", f"{float(bench.get('load_ms') or 0.0):.3g} ms"]]
    parts += [_table(["figure", ""], figures), "</div>"]
    samples = run.samples
    if len(samples) >= 2:
        image, drawn = charts.latency_histogram(samples)
        slower = sum(1 for s in samples if s > drawn.p99)
        parts.append(image)
        parts.append(f"<p class='muted'>{drawn.runs} runs after {bench.get('warmup', '?')} warm-up: p50 {drawn.p50:.4g} ms, "
                     f"p90 {drawn.p90:.4g} ms, p99 {drawn.p99:.4g} ms, max {drawn.max:.4g} ms ({slower} run(s) slower than p99).</p>")
    if run.layers is not None:
        parts.append(f"<p>Layers: {_e(run.layers.get('summary'))}</p>")
    elif isinstance(bench.get("layers"), dict) and not bench["layers"].get("available"):
        parts.append(f"<p class='muted'>Layers: {_e(bench['layers'].get('reason'))}</p>")
    parts.append(_parity_of(run))
    parts += [f"<p class='bad'>warning: {_e(w)}</p>" for w in run.warnings]
    return "".join(parts)


def _runs(runs: Sequence[Run]) -> str:
    drawn = runs[-_RUNS_DRAWN:]
    older = f"<p class='muted'>The {len(drawn)} newest of {len(runs)} runs; all are in the history below.</p>" if len(runs) > len(drawn) else ""
    return _section("runs", "Benchmarks and profiles", older, *(_run(run) for run in reversed(drawn)))


def _history(runs: Sequence[Run]) -> str:
    points = []
    for run in runs:
        when, p50 = charts.parse_time(run.time), charts.float_or_none(run.latency.get("p50"))
        if when is not None and p50 is not None:
            points.append(charts.HistoryPoint(f"{run.device_name} ({run.kind})", when, p50, charts.float_or_none(run.latency.get("p90"))))
    rows = [[_when(run.time), run.device_name, run.kind, run.backend, _maybe(run.latency.get("p50")), _maybe(run.latency.get("p99")),
             "–" if run.verify is None else ("pass" if run.verify.get("passed") else "FAIL")] for run in runs]
    chart = charts.history(points) if len(points) >= 2 else "<p class='muted'>One run so far: the chart starts with the second.</p>"
    return _section("history", "Latency over time, per device", chart,
                    _table(["time (UTC)", "device", "run", "backend", "p50 (ms)", "p99 (ms)", "reference parity"], rows))


def _summary(m: Manifest, runs: Sequence[Run]) -> str:
    """What a person looks for first: size, fidelity against fp32, and the newest latency."""
    assert m.compression is not None
    comp = m.compression
    parts = [f"{_bytes(comp.bytes_after)} ({comp.bytes_after / comp.bytes_before:.0%} of the source)" if comp.bytes_before else _bytes(comp.bytes_after)]
    figures = {q.name: q.optimized for q in m.quality.metrics} if m.quality else {}
    if figures.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement with fp32 {100 * figures['top1_agreement']:.2f}%")
    elif figures.get("cosine") is not None:
        parts.append(f"cosine with fp32 {figures['cosine']:.5f}")
    measured = [run for run in runs if run.latency.get("p50") is not None]
    if measured:
        newest = measured[-1]
        parts.append(f"p50 {float(newest.latency['p50']):.4g} ms on {newest.device_name} ({newest.kind}, {_when(newest.time)} UTC)")
    else:
        parts.append("latency not measured yet: run edgeopt bench or edgeopt profile on it")
    return "; ".join(parts)


def render(manifest: Manifest) -> str:
    m = manifest
    assert m.target is not None and m.compression is not None and m.reference is not None and m.reference.measured is not None
    runs = runs_of(m, "this bundle")
    heading = (f"<h1>{_e(m.name)} → {_e(m.target.name)} ({_e(m.target.artifact_format)}, {_e(precision_label(m))})</h1>"
               f"<p class='muted'>edgeopt {_e(m.edgeopt_version)}, built {_e(m.created_at)}; runtime backend {_e(m.runtime.backend)}; "
               f"toolchain {_e(', '.join(f'{k} {v}' for k, v in m.toolchain.items()))}</p>"
               f"<p class='verdict'>{_e(_summary(m, runs))}</p>")
    body = [_sizes(m), _stages(m), _parity(m)]
    if m.quality:
        body.append(_quality(m))
    with_layers = [run for run in runs if run.layers is not None]
    if with_layers:
        body.append(_layers(m, with_layers[-1]))
    if (m.quantization or {}).get("per_layer_sqnr"):
        body.append(_quantization(m))
    if runs:
        body += [_runs(runs), _history(runs)]
    body.append(_section("artifacts", "Artifacts", _table(["path", "role", "bytes", "sha256"],
                                                         [[a.path, a.role, a.bytes, (a.sha256 or "")[:16] + "…"] for a in m.artifacts])))
    return _page(f"edgeopt: {m.name} for {m.target.name}", heading, body)


def write_report(bundle_dir: Path, manifest: Manifest) -> Path:
    path = bundle_dir / "report.html"
    write_text_atomically(path, render(manifest))
    return path


# -- edgeopt compare --html ------------------------------------------------------------------------


def comparison_page(comparison: Comparison) -> str:
    """`edgeopt compare --html`: the verdicts, the figures with ratios, and the charts, one file."""
    document = comparison.to_dict()
    letters = comparison.letters
    runs = _table(["", "model", "precision", "backend", "device", "CPU, threads", "run (UTC)", "source"],
                  [[r["letter"], r["name"], r["precision"], r["backend"], r["device"], f"{r['cpu'] or '?'}, {r['threads'] or 'default'}",
                    f"{r['kind']} at {_when(r['time'])}" + (f", {r['runs']} runs" if r["runs"] else ""), r["source"]] for r in document["runs"]])
    figure_rows = [[name, *values, *against] for name, values, against in comparison.table()]
    figures = _table(["figure", *letters, *(f"{l} vs {letters[0]}" for l in letters[1:])], figure_rows, figures=True)
    labelled = [(f"{letter}: {Path(run.source.split('#')[0]).name} ({run.precision})", run) for letter, run in zip(letters, comparison.runs)]
    body = [
        _section("verdict", "Verdict", *(f"<p class='verdict'>{_e(v)}</p>" for v in comparison.verdicts), runs),
        _section("figures", "Figures side by side (ratios: against the baseline; quality: differences)", figures),
    ]
    measured = [(label, run.latency) for label, run in labelled if run.latency]
    if measured:
        body.append(_section("latency", "Latency", charts.compare_latency(measured, {label: run.samples for label, run in labelled if len(run.samples) >= 2})))
    if comparison.layers:
        rows = [[m.label, *(_maybe(t) for t in m.times), *("–" if t is None else f"{t / m.times[0]:.2f}×" for t in m.times[1:])]
                for m in comparison.layers]
        chart = charts.compare_layers([label for label, _ in labelled], [m.label for m in comparison.layers],
                                      [[m.times[i] for m in comparison.layers] for i in range(len(letters))])
        body.append(_section("layers", f"Per-layer time (the slowest of {letters[0]}, matched by ONNX node name; ms)", chart,
                             _table(["layer", *letters, *(f"{l} vs {letters[0]}" for l in letters[1:])], rows, figures=True)))
    heading = f"<h1>edgeopt compare: {_e(' vs '.join(label for label, _ in labelled))}</h1>"
    return _page("edgeopt compare", heading, body)
