"""Reading what a device reported: its facts, whether it throttled during the run, and the figures
the profile table shows.

The device side is `edgeopt.runtime.device`: the runtime's `info --json` before verify and
bench, and the benchmark's own `thermal_after`; the thermal part of both is kept, so a reader of
the profile history can see what the run did to the device.
"""

from __future__ import annotations

from edgeopt.runtime.manifest import JsonObject

__all__ = [
    "HOT_CELSIUS",
    "RISE_CELSIUS",
    "CLOCK_DROP",
    "bench_figures",
    "device_facts",
    "device_summary",
    "parity_summary",
    "temperature_summary",
]

THERMAL_KEYS = ("cpu_governor", "cpu_frequency_mhz", "temperatures_c", "throttled", "power_mode")
"""The keys of `edgeopt.runtime.device.thermal_facts()`: what changes while a device works."""

HOT_CELSIUS = 80.0
"""A Raspberry Pi starts soft-throttling at 80 °C (60 °C on some configurations); most SoCs near it."""

RISE_CELSIUS = 15.0
"""A rise this large over one benchmark means later runs were measured on a hotter, maybe slower chip."""

CLOCK_DROP = 0.9
"""Under the `performance` governor the clock should not move; a fall below 90 % is throttling."""


def device_facts(info: JsonObject, after: JsonObject) -> tuple[JsonObject, list[str]]:
    """The device entry of a profile and its warnings.

    `info` is the runtime's `info --json` from before verify and bench; `after` its thermal facts
    right after the benchmark (the BenchmarkResult's `thermal_after`).
    """
    before = _device_part(info)
    thermal_before = {key: before.get(key) for key in THERMAL_KEYS}
    thermal_after = {key: after.get(key) for key in THERMAL_KEYS}
    throttled, warnings = _throttling(thermal_before, thermal_after)
    facts = {key: value for key, value in before.items() if key not in THERMAL_KEYS}
    facts.update(thermal_before=thermal_before, thermal_after=thermal_after, throttled_during_run=throttled)
    return facts, warnings


def _device_part(info: JsonObject) -> JsonObject:
    device = info.get("device")
    return device if isinstance(device, dict) else info


def _throttling(before: JsonObject, after: JsonObject) -> tuple[bool, list[str]]:
    """(throttled during the run, warnings) from Pi throttle flags, clocks, temperatures, power mode."""
    warnings: list[str] = []
    throttled = False

    flags_before = before.get("throttled") or {}
    flags_after = after.get("throttled") or {}
    now = [name for name, value in flags_after.items() if name.endswith("_now") and value is True]
    new = [
        name
        for name, value in flags_after.items()
        if name.endswith("_occurred") and value is True and flags_before.get(name) is not True
    ]
    if now or new:
        throttled = True
        warnings.append(f"device throttled during the run (vcgencmd get_throttled={flags_after.get('raw')}: {', '.join(now + new)})")

    governors = set((before.get("cpu_governor") or {}).values())
    clocks_before = before.get("cpu_frequency_mhz") or {}
    clocks_after = after.get("cpu_frequency_mhz") or {}
    if governors == {"performance"} and clocks_before and clocks_after:
        high, low = max(clocks_before.values()), max(clocks_after.values())
        if low < CLOCK_DROP * high:
            throttled = True
            warnings.append(f"CPU clock fell from {high:.0f} to {low:.0f} MHz during the run under the performance governor")
    elif governors and governors != {"performance"}:
        warnings.append(f"CPU governor is {'/'.join(sorted(governors))}, not performance: latency includes clock ramp-up")

    temps_before = before.get("temperatures_c") or {}
    temps_after = after.get("temperatures_c") or {}
    if temps_after:
        hottest = max(temps_after.values())
        if hottest >= HOT_CELSIUS:
            warnings.append(f"device at {hottest:.0f} °C after the run, at the point where SoCs throttle")
        if temps_before:
            rise = hottest - max(temps_before.values())
            if rise >= RISE_CELSIUS:
                warnings.append(f"temperature rose {rise:.0f} °C during the run: later runs were measured on a hotter chip")

    mode_before = (before.get("power_mode") or {}).get("mode")
    mode_after = (after.get("power_mode") or {}).get("mode")
    if mode_before is not None and mode_after is not None and mode_before != mode_after:
        warnings.append(f"Jetson power mode changed during the run: {mode_before} -> {mode_after}")
    return throttled, warnings


def parity_summary(verify: JsonObject) -> str:
    outputs = verify.get("outputs") or []
    worst = max((o.get("max_abs") or 0.0 for o in outputs), default=0.0)
    if verify.get("passed"):
        return f"pass (max|Δ| {worst:.2g})"
    failed = [o["name"] for o in outputs if not o.get("passed")]
    return f"FAIL ({', '.join(failed)}; max|Δ| {worst:.2g})"


def device_summary(device: JsonObject) -> str:
    """Board (or CPU model), core count, OS and machine, e.g. 'Raspberry Pi 5 Model B, 4 cores, Linux aarch64'."""
    cpu = device.get("cpu") or {}
    system = device.get("os") or {}
    name = device.get("board") or cpu.get("model") or "unknown device"
    cores = f"{cpu['logical_cores']} cores" if cpu.get("logical_cores") else None
    where = " ".join(str(part) for part in (system.get("system"), system.get("machine")) if part) or None
    return ", ".join(part for part in (str(name), cores, where) if part)


def temperature_summary(device: JsonObject) -> str:
    before = (device.get("thermal_before") or {}).get("temperatures_c") or {}
    after = (device.get("thermal_after") or {}).get("temperatures_c") or {}
    if not before and not after:
        return "-"
    start = f"{max(before.values()):.0f}" if before else "?"
    end = f"{max(after.values()):.0f}" if after else "?"
    return f"{start}→{end}"


def bench_figures(bench: JsonObject) -> dict[str, str]:
    """The table's cells from a runtime BenchmarkResult dict (runtime/benchmark.schema.json)."""
    latency = bench.get("latency_ms") or {}
    backend = bench.get("backend") or {}
    peak = (bench.get("memory") or {}).get("peak_rss_bytes")
    return {
        "backend": " ".join(str(part) for part in (backend.get("name"), backend.get("version")) if part) or "-",
        "threads": str(bench.get("threads") or "default"),
        "p50": _number(latency.get("p50")),
        "p90": _number(latency.get("p90")),
        "p99": _number(latency.get("p99")),
        "throughput": _number(bench.get("throughput_per_s"), 1),
        "load": _number(bench.get("load_ms"), 1),
        "first": _number(bench.get("first_inference_ms"), 2),
        "rss": "-" if peak is None else f"{peak / 2**20:.1f}",
    }


def _number(value: float | None, decimals: int = 3) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"
