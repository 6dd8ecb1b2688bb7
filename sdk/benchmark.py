"""`edgeopt bench` on the host: the runtime's benchmark, recorded in the bundle's history."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeopt.bundle import append_history

__all__ = ["benchmark_here"]


def benchmark_here(
    bundle: str | Path,
    *,
    backend: str | None = None,
    warmup: int = 10,
    runs: int = 100,
    duration: float | None = None,
    threads: int | None = None,
    record: bool = True,
    on_record: Callable[[Path, int], None] | None = None,
    layers: bool = False,
    layer_runs: int = 20,
) -> Any:
    """Benchmark with `edgeopt.runtime` (the same code a device runs).

    With `record` (the default) a bundle folder's result is appended to its manifest's
    `benchmarks` (the report is redrawn, its checksum updated) and `on_record(manifest path,
    benchmarks now recorded)` is called; `record=False` leaves the bundle untouched. Bare
    artifacts and .tar.gz bundles are never written to. `layers` adds the per-layer table
    (runtime/layer_timings.py) from `layer_runs` profiled runs.
    """
    from edgeopt.runtime import load

    path = Path(bundle)
    with load(path, backend=backend, threads=threads, allow_stand_in=True) as model:
        result = model.benchmark(warmup=warmup, runs=runs, duration=duration, layers=layers, layer_runs=layer_runs)
    if record and (path / "manifest.json").is_file():
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **result.to_dict()}
        count = append_history(path, "benchmarks", entry)
        if on_record is not None:
            on_record(path / "manifest.json", count)
    return result
