"""`edgeopt compare`: runs side by side — latency, memory, fidelity and per-layer time, with ratios.

A run is one measurement of one artifact: a bundle's benchmark or profile entry, a bench JSON
file (`edgeopt bench --json > a.json`), or, for a bundle never measured, its build alone (size and
fidelity, no latency). The first run is the baseline every other is set against; the verdict line
says what a person wants first: "B is 1.31× faster at p50 than A, top-1 agreement −0.4 points".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeopt.errors import OptionError
from edgeopt.runtime.bundle import read_manifest
from edgeopt.runtime.errors import BundleError
from edgeopt.runtime.manifest import HistoryEntry, JsonObject, Manifest

__all__ = ["Comparison", "Run", "compare", "load_run", "runs_of"]

_SELECTOR_HELP = (
    "BUNDLE, BUNDLE#benchmarks:N, BUNDLE#profiles:N (N may be negative: -1 is the newest), BUNDLE#HOST, "
    "a bench JSON file, or `edgeopt profile --json` output (FILE#HOST when it has several devices)"
)


@dataclass(frozen=True)
class Run:
    """One measurement: the benchmark document, the device it ran on, and its reference check.

    `bench` is the runtime's BenchmarkResult JSON ({} for a build never measured); `device` the
    device facts (a profile's, or the benchmark's own); `verify` the device's reference check
    (profiles only: `edgeopt bench` times and does not check); `manifest` the bundle's, when known.
    """

    source: str
    kind: str  # "benchmark", "profile" or "build"
    bench: JsonObject = field(default_factory=dict)
    device: JsonObject = field(default_factory=dict)
    verify: JsonObject | None = None
    time: str | None = None
    host: str | None = None
    warnings: tuple[str, ...] = ()
    manifest: Manifest | None = None

    @classmethod
    def from_history(cls, source: str, kind: str, entry: HistoryEntry, manifest: Manifest | None) -> Run:
        results = entry.results
        if kind == "profile":
            bench = results.get("bench") or {}
            return cls(source, kind, bench, results.get("device") or {}, results.get("verify"), entry.time, entry.host,
                       tuple(results.get("warnings") or ()), manifest)
        return cls(source, kind, results, results.get("device") or {}, None, entry.time or results.get("created_at"),
                   (results.get("device") or {}).get("hostname"), tuple(results.get("warnings") or ()), manifest)

    @property
    def device_name(self) -> str:
        return self.host or str(self.device.get("hostname") or "this host")

    @property
    def latency(self) -> Mapping[str, float]:
        return self.bench.get("latency_ms") or {}

    @property
    def samples(self) -> list[float]:
        return [float(s) for s in self.bench.get("samples_ms") or ()]

    @property
    def layers(self) -> JsonObject | None:
        """The benchmark's layer profile (runtime/layer_timings.py's document) when it has figures."""
        layers = self.bench.get("layers")
        return layers if isinstance(layers, dict) and layers.get("available") and layers.get("layers") else None

    @property
    def backend(self) -> str:
        backend = self.bench.get("backend") or {}
        if backend:
            return f"{backend.get('name')} {backend.get('version') or ''}".strip()
        return self.manifest.runtime.backend.value if self.manifest is not None else "?"

    @property
    def name(self) -> str:
        model = self.bench.get("model") or {}
        return str(model.get("name") or (self.manifest.name if self.manifest is not None else None) or Path(self.source).stem)

    @property
    def precision(self) -> str:
        model = self.bench.get("model") or {}
        if model.get("precision"):
            return str(model["precision"])
        return self.manifest.precision.value if self.manifest is not None and self.manifest.precision is not None else "?"

    def figures(self) -> dict[str, float | None]:
        """The figures compared, by name (None where this run does not have it)."""
        memory = self.bench.get("memory") or {}
        quality = {m.name: m.optimized for m in self.manifest.quality.metrics} if self.manifest is not None and self.manifest.quality else {}
        fidelity = self.manifest.quality.fidelity if self.manifest is not None and self.manifest.quality else {}
        artifact = self.manifest.model_artifact if self.manifest is not None else None
        return {
            **{f"latency {p}": _number(self.latency.get(p)) for p in ("p50", "p90", "p99", "mean")},
            "throughput": _number(self.bench.get("throughput_per_s")),
            "peak memory": _number(memory.get("peak_rss_bytes")),
            "load memory": _number(memory.get("load_delta_bytes")),
            "artifact size": _number(artifact.bytes if artifact is not None else None),
            "top-1 agreement": _number(quality.get("top1_agreement")),
            "accuracy": _number(quality.get("accuracy")),
            "cosine": _number(quality.get("cosine")),
            "SQNR": _number(fidelity.get("min_sqnr_db")),
        }

    def describe(self) -> str:
        what = f"{self.kind} on {self.device_name}" + (f" at {self.time}" if self.time else "")
        runs = f", {self.bench.get('runs')} runs" if self.bench.get("runs") else ""
        return f"{self.name} ({self.precision}, {self.backend}), {what}{runs} — {self.source}"


#: How each figure reads: unit, and whether lower is better (None: a quality figure, compared as a difference).
_FIGURES: dict[str, tuple[str, bool | None]] = {
    "latency p50": ("ms", True),
    "latency p90": ("ms", True),
    "latency p99": ("ms", True),
    "latency mean": ("ms", True),
    "throughput": ("/s", False),
    "peak memory": ("bytes", True),
    "load memory": ("bytes", True),
    "artifact size": ("bytes", True),
    "top-1 agreement": ("fraction", None),
    "accuracy": ("fraction", None),
    "cosine": ("", None),
    "SQNR": ("dB", None),
}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def runs_of(manifest: Manifest, source: str) -> list[Run]:
    """Every benchmark and profile recorded in a bundle, oldest first (by time, then as recorded)."""
    runs = [Run.from_history(f"{source}#benchmarks:{i}", "benchmark", e, manifest) for i, e in enumerate(manifest.benchmarks)]
    runs += [Run.from_history(f"{source}#profiles:{i}", "profile", e, manifest) for i, e in enumerate(manifest.profiles)]
    return sorted(runs, key=lambda run: run.time or "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"{path}: cannot read it as JSON ({exc})", hint=f"pass {_SELECTOR_HELP}") from None


def _bundle_of(bench: JsonObject, near: Path) -> Manifest | None:
    """The manifest of the bundle a bench JSON measured, when that bundle is still there (same artifact)."""
    model = bench.get("model") or {}
    source = model.get("source")
    if not source:
        return None
    for folder in (Path(source), near / source):
        if (folder / "manifest.json").is_file():
            try:
                manifest = read_manifest(folder)
            except BundleError:
                return None
            artifact = manifest.model_artifact
            if artifact is not None and artifact.sha256 == model.get("sha256"):
                return manifest
    return None


def load_run(spec: str) -> Run:
    """The run a command-line argument names (see _SELECTOR_HELP)."""
    text, _, selector = spec.partition("#")
    path = Path(text)
    if path.name == "manifest.json":
        path = path.parent
    if path.is_dir():
        manifest = read_manifest(path)
        return _select(manifest, str(path), selector)
    if path.is_file():
        return _from_file(path, selector)
    raise OptionError(f"{text}: no such bundle or file", hint=f"pass {_SELECTOR_HELP}")


def _profile_entry(source: str, document: JsonObject) -> Run:
    entry = HistoryEntry(document.get("time"), document.get("host"), {k: v for k, v in document.items() if k not in ("time", "host")})
    return Run.from_history(source, "profile", entry, None)


def _from_file(path: Path, selector: str) -> Run:
    """A bench result, one profile entry, or `edgeopt profile --json` output (FILE#HOST picks a device)."""
    document = _read_json(path)
    if not isinstance(document, dict):
        document = {}
    profiles = document.get("profiles")
    if isinstance(profiles, list):
        chosen = [p for p in profiles if isinstance(p, dict) and (not selector or p.get("host") == selector)]
        if len(chosen) != 1:
            hosts = ", ".join(str(p.get("host")) for p in profiles if isinstance(p, dict)) or "none"
            raise OptionError(f"{path}#{selector}: {len(chosen)} of its profiles match (hosts: {hosts})", hint=f"pick one host: {path}#HOST")
        return _profile_entry(f"{path}#{chosen[0].get('host')}", chosen[0])
    if selector:
        raise OptionError(f"{path}#{selector}: only `edgeopt profile --json` output has devices to pick from", hint=f"pass {_SELECTOR_HELP}")
    if "latency_ms" in document:
        return Run(str(path), "benchmark", document, document.get("device") or {}, None, document.get("created_at"),
                   (document.get("device") or {}).get("hostname"), tuple(document.get("warnings") or ()), _bundle_of(document, path.parent))
    if isinstance(document.get("bench"), dict):
        return _profile_entry(str(path), document)
    raise OptionError(f"{path}: not a bench result (no latency_ms), a profile entry (no bench) or `edgeopt profile --json` output (no profiles)",
                      hint="write one with `edgeopt bench BUNDLE --json > run.json`")


def _select(manifest: Manifest, source: str, selector: str) -> Run:
    runs = runs_of(manifest, source)
    if not selector:
        return runs[-1] if runs else Run(source, "build", manifest=manifest, time=manifest.created_at)
    key, _, index = selector.partition(":")
    if key in ("benchmarks", "profiles") and index:
        history = manifest.benchmarks if key == "benchmarks" else manifest.profiles
        try:
            number = int(index)
            entry = history[number]
        except (ValueError, IndexError):
            raise OptionError(f"{source}#{selector}: the bundle has {len(history)} {key}", hint=f"pick one with {key}:0 .. {key}:{len(history) - 1} or {key}:-1") from None
        position = number % len(history)
        return Run.from_history(f"{source}#{key}:{position}", "benchmark" if key == "benchmarks" else "profile", entry, manifest)
    on_host = [run for run in runs if run.device_name == selector]
    if not on_host:
        hosts = sorted({run.device_name for run in runs}) or ["none recorded"]
        raise OptionError(f"{source}#{selector}: no benchmark or profile on a device named {selector!r} (devices: {', '.join(hosts)})", hint=f"pass {_SELECTOR_HELP}")
    return on_host[-1]


@dataclass(frozen=True)
class LayerMatch:
    """One layer of the baseline and its time in each run (matched by shared ONNX node names)."""

    label: str
    times: tuple[float | None, ...]


@dataclass(frozen=True)
class Comparison:
    """Runs against the first: every figure with its ratio (or difference, for quality), matched
    layers, and one verdict line per run."""

    runs: tuple[Run, ...]
    figures: dict[str, tuple[float | None, ...]]
    layers: tuple[LayerMatch, ...]
    verdicts: tuple[str, ...]

    @property
    def letters(self) -> list[str]:
        return [chr(ord("A") + i) for i in range(len(self.runs))]

    def to_dict(self) -> dict[str, Any]:
        base = 0
        figures = []
        for name, values in self.figures.items():
            unit, lower_better = _FIGURES[name]
            row: dict[str, Any] = {"name": name, "unit": unit, "values": list(values)}
            if lower_better is None:
                row["differences"] = [None if v is None or values[base] is None else v - values[base] for v in values]
            else:
                row["ratios"] = [_ratio(v, values[base]) for v in values]
                row["lower_is_better"] = lower_better
            figures.append(row)
        return {
            "baseline": self.letters[0],
            "runs": [
                {"letter": letter, "source": run.source, "kind": run.kind, "name": run.name, "precision": run.precision, "backend": run.backend,
                 "device": run.device_name, "cpu": (run.device.get("cpu") or {}).get("model"), "threads": run.bench.get("threads"),
                 "time": run.time, "runs": run.bench.get("runs")}
                for letter, run in zip(self.letters, self.runs)
            ],
            "figures": figures,
            "layers": [{"layer": m.label, "times_ms": list(m.times), "ratios": [_ratio(t, m.times[0]) for t in m.times]} for m in self.layers],
            "verdicts": list(self.verdicts),
        }

    def table(self) -> list[tuple[str, list[str], list[str]]]:
        """Each figure some run has: (name, its value per run, each other run against the baseline), as shown."""
        rows = []
        for name, values in self.figures.items():
            if all(v is None for v in values):
                continue
            unit, lower_better = _FIGURES[name]
            if lower_better is None:
                against = [_difference(v, values[0], unit) for v in values[1:]]
            else:
                against = [_times(_ratio(v, values[0])) for v in values[1:]]
            rows.append((name, [_shown(v, unit) for v in values], against))
        return rows

    def format_text(self) -> str:
        letters = self.letters
        lines = [f"{letter}  {run.describe()}" for letter, run in zip(letters, self.runs)]
        header = f"{'':18}" + "".join(f"{letter:>14}" for letter in letters) + "".join(f"{f'{l}/{letters[0]}':>10}" for l in letters[1:])
        lines += ["", header]
        for name, values, against in self.table():
            lines.append(f"{name:18}" + "".join(f"{v:>14}" for v in values) + "".join(f"{a:>10}" for a in against))
        if self.layers:
            lines += ["", f"layers (slowest of {letters[0]} first, matched by ONNX node name):"]
            for match in self.layers:
                cells = "".join(f"{'–' if t is None else f'{t:.3f} ms':>14}" for t in match.times)
                ratios = "".join(f"{_times(_ratio(t, match.times[0])):>10}" for t in match.times[1:])
                lines.append(f"  {_short(match.label, 16):16}{cells}{ratios}")
        lines += [""] + [f"verdict: {verdict}" for verdict in self.verdicts]
        return "\n".join(lines)


def _short(label: str, limit: int) -> str:
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "bytes":
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 1024:.1f} KiB"
    if unit == "fraction":
        return f"{100 * value:.2f}%"
    if unit == "ms":
        return f"{value:.4g} ms"
    if unit == "/s":
        return f"{value:.1f}/s"
    if unit == "dB":
        return f"{value:.1f} dB"
    return f"{value:.5f}"


def _difference(value: float | None, base: float | None, unit: str) -> str:
    if value is None or base is None:
        return "–"
    delta = value - base
    if unit == "fraction":
        return _signed(100 * delta, "pt")
    return _signed(delta, "dB" if unit == "dB" else "")


def _signed(value: float, unit: str) -> str:
    """A difference with its sign, as people write it: +0.4 points, −1.2 dB, ±0.0 points."""
    text = f"{abs(value):.1f}" if unit else f"{abs(value):.2g}"
    if float(text) == 0:
        return f"±{text} {unit}".rstrip()
    return f"{'−' if value < 0 else '+'}{text} {unit}".rstrip()


def _layer_times(run: Run) -> dict[str, tuple[float, str]]:
    """ONNX node name -> (the time of the kernel it ran in, that kernel's label)."""
    layers = run.layers
    if layers is None:
        return {}
    owned: dict[str, tuple[float, str]] = {}
    for row in layers["layers"]:
        label = ", ".join(row.get("nodes") or ()) or str(row.get("kernel"))
        for node in row.get("nodes") or (row.get("kernel"),):
            owned.setdefault(str(node), (float(row["time_ms"]), label))
    return owned


def _match_layers(runs: Sequence[Run], count: int = 15) -> tuple[LayerMatch, ...]:
    """The baseline's slowest `count` kernels, each with the time the other runs spent on the same ONNX nodes."""
    base = runs[0].layers
    if base is None or not any(run.layers for run in runs[1:]):
        return ()
    others = [_layer_times(run) for run in runs[1:]]
    matches = []
    for row in base["layers"][:count]:
        nodes = [str(n) for n in row.get("nodes") or ()] or [str(row.get("kernel"))]
        times: list[float | None] = [float(row["time_ms"])]
        for owned in others:
            kernels = {owned[n][1]: owned[n][0] for n in nodes if n in owned}  # one time per kernel, however many nodes it fused
            times.append(sum(kernels.values()) if kernels else None)
        matches.append(LayerMatch(", ".join(nodes), tuple(times)))
    return tuple(matches)


def _verdict(letter: str, base_letter: str, run: Run, base: Run) -> str:
    figures, baseline = run.figures(), base.figures()
    parts = []
    p50, base_p50 = figures["latency p50"], baseline["latency p50"]
    if p50 and base_p50:
        speedup = base_p50 / p50
        parts.append(f"{letter} is {speedup:.2f}× faster at p50 than {base_letter}" if speedup >= 1 else f"{letter} is {1 / speedup:.2f}× slower at p50 than {base_letter}")
    else:
        parts.append(f"{letter} against {base_letter}: no latency to compare (a build never benchmarked: run `edgeopt bench` on it)")
    for name, unit in (("top-1 agreement", "points"), ("accuracy", "points")):
        value, reference = figures[name], baseline[name]
        if value is not None and reference is not None:
            parts.append(f"{name} {_signed(100 * (value - reference), unit)}")
            break
    else:
        value, reference = figures["SQNR"], baseline["SQNR"]
        if value is not None and reference is not None:
            parts.append(f"SQNR {_signed(value - reference, 'dB')}")
    memory, base_memory = figures["peak memory"], baseline["peak memory"]
    if memory and base_memory:
        parts.append(f"peak memory {memory / base_memory:.2f}×")
    notes = []
    if run.kind != "build" and base.kind != "build" and run.device_name != base.device_name:
        notes.append(f"(different devices: {run.device_name} and {base.device_name})")
    noisy = [note for name, each in ((base_letter, base), (letter, run)) if (note := _disturbed(name, each))]
    if noisy:
        notes.append(f"(noisy: {', '.join(noisy)}; repeat on a quiet machine before trusting the ratio)")
    return " ".join([", ".join(parts), *notes])


#: A run was disturbed (another load, clock changes) when its p90 is over 1.5 × its p50, or its
#: p50 over 2 × its fastest run: then its slow mode holds the median (ppocr_cls int8 on a loaded
#: 2-core machine: a third of the runs near 2 ms, the median at 10.7 ms, p90 only 1.1 × p50).
_NOISY_TAIL = 1.5
_NOISY_MEDIAN = 2.0


def _disturbed(letter: str, run: Run) -> str | None:
    p50, p90, fastest = (_number(run.latency.get(k)) for k in ("p50", "p90", "min"))
    if p50 and p90 and p90 > _NOISY_TAIL * p50:
        return f"{letter} p90 = {p90 / p50:.1f} × p50"
    if p50 and fastest and p50 > _NOISY_MEDIAN * fastest:
        return f"{letter} p50 = {p50 / fastest:.1f} × its fastest run"
    return None


def compare(runs: Sequence[Run]) -> Comparison:
    """Every run against the first."""
    if len(runs) < 2:
        raise OptionError(f"compare needs at least two runs, got {len(runs)}", hint=f"pass two or more of: {_SELECTOR_HELP}")
    figures: dict[str, tuple[float | None, ...]] = {name: tuple(run.figures()[name] for run in runs) for name in _FIGURES}
    letters = [chr(ord("A") + i) for i in range(len(runs))]
    verdicts = tuple(_verdict(letters[i], letters[0], runs[i], runs[0]) for i in range(1, len(runs)))
    return Comparison(tuple(runs), figures, _match_layers(runs), verdicts)
