"""`edgeopt bench` on the host: the runtime's benchmark, recorded in the bundle's history."""

from __future__ import annotations

import datetime as dt
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
) -> Any:
    """Benchmark with `edgeopt.runtime` (the same code a device runs) and append to the manifest."""
    from edgeopt.runtime import load

    path = Path(bundle)
    with load(path, backend=backend, threads=threads, allow_stand_in=True) as model:
        result = model.benchmark(warmup=warmup, runs=runs, duration=duration)
    if (path / "manifest.json").is_file():
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **result.to_dict()}
        append_history(path, "benchmarks", entry)
    return result
