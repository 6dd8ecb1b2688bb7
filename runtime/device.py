"""Facts about the machine a benchmark ran on, read from what the OS exposes; never fails.

Everything optional (temperatures, governors, Raspberry Pi throttling, Jetson power mode) is
left out or null when the machine does not expose it.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

from edgeopt.runtime.isa import REPORTED_FLAGS, host_isa, host_isa_flags

__all__ = ["CpuFacts", "DeviceFacts", "ThermalFacts", "decode_throttled", "device_facts", "thermal_facts"]

#: bits of `vcgencmd get_throttled` (Raspberry Pi documentation, "vcgencmd")
THROTTLE_BITS: dict[int, str] = {
    0: "under_voltage_now",
    1: "frequency_capped_now",
    2: "throttled_now",
    3: "soft_temperature_limit_now",
    16: "under_voltage_occurred",
    17: "frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}


class PowerMode(TypedDict):
    mode: str | None  # Jetson's "NV Power Mode" name
    raw: str  # `nvpmodel -q` as printed


class ThermalFacts(TypedDict):
    """What changes during a run (None where the machine does not expose it)."""

    cpu_governor: dict[str, str] | None  # per CPU
    cpu_frequency_mhz: dict[str, float] | None  # per CPU
    temperatures_c: dict[str, float] | None  # per thermal zone
    throttled: dict[str, bool | str] | None  # Raspberry Pi: decode_throttled
    power_mode: PowerMode | None  # Jetson


class OsFacts(TypedDict):
    system: str
    release: str
    version: str
    machine: str
    distribution: str | None


class CpuFacts(TypedDict):
    model: str | None
    logical_cores: int | None
    usable_cores: int | None
    isa_class: str | None  # IsaClass value
    isa_flags: list[str]  # the REPORTED_FLAGS this CPU has


class MemoryFacts(TypedDict):
    total_bytes: int | None
    available_bytes: int | None


class PythonFacts(TypedDict):
    version: str
    implementation: str
    executable: str


class DeviceFacts(ThermalFacts):
    hostname: str
    os: OsFacts
    board: str | None
    cpu: CpuFacts
    memory: MemoryFacts
    python: PythonFacts
    libraries: dict[str, str | None]  # numpy and each backend distribution -> version


def device_facts() -> DeviceFacts:
    """OS, CPU, memory, Python, numpy and backend versions, plus thermal and power state."""
    return {
        "hostname": platform.node(),
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "version": platform.version(),
            "machine": platform.machine(),
            "distribution": _os_release(),
        },
        "board": _read_text("/proc/device-tree/model") or _read_text("/sys/firmware/devicetree/base/model"),
        "cpu": _cpu(),
        "memory": _memory(),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "libraries": _libraries(),
        **thermal_facts(),
    }


def thermal_facts() -> ThermalFacts:
    """The facts that change during a run: governor, clocks, temperatures, throttling, power mode."""
    return {
        "cpu_governor": _governors(),
        "cpu_frequency_mhz": _frequencies(),
        "temperatures_c": _temperatures(),
        "throttled": _throttled(),
        "power_mode": _nvpmodel(),
    }


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n") or None
    except OSError:
        return None


def _os_release() -> str | None:
    text = _read_text("/etc/os-release")
    if text:
        for line in text.splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return None


def _cpu() -> CpuFacts:
    model = None
    text = _read_text("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                model = line.split(":", 1)[1].strip()
                break
        if model:
            break
    if model is None and sys.platform == "darwin":
        model = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    isa = host_isa()
    return {
        "model": model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "isa_class": isa.value if isa is not None else None,
        "isa_flags": sorted(host_isa_flags() & frozenset(REPORTED_FLAGS)),
    }


def _memory() -> MemoryFacts:
    text = _read_text("/proc/meminfo")
    if text:
        values = {}
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[name] = int(parts[0]) * 1024
        return {"total_bytes": values.get("MemTotal"), "available_bytes": values.get("MemAvailable")}
    if sys.platform == "darwin":
        total = _run(["sysctl", "-n", "hw.memsize"])
        return {"total_bytes": int(total) if total and total.isdigit() else None, "available_bytes": None}
    return {"total_bytes": None, "available_bytes": None}


def _libraries() -> dict[str, str | None]:
    """numpy plus every backend library's version (None when absent), without importing backends."""
    from edgeopt.runtime.backends import BACKENDS, backend_class

    versions: dict[str, str | None] = {}
    try:
        import numpy

        versions["numpy"] = numpy.__version__
    except ImportError:
        versions["numpy"] = None
    for name in BACKENDS:
        cls = backend_class(name)
        versions[cls.distributions[0]] = cls.library_version()
        for extra in cls.distributions[1:]:
            version = _distribution(extra)
            if version:
                versions[extra] = version
    return versions


def _distribution(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _governors() -> dict[str, str] | None:
    governors = {}
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")):
        value = _read_text(path)
        if value:
            governors[path.split("/")[5]] = value
    return governors or None


def _frequencies() -> dict[str, float] | None:
    frequencies = {}
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")):
        value = _read_text(path)
        if value and value.isdigit():
            frequencies[path.split("/")[5]] = int(value) / 1000.0
    return frequencies or None


def _temperatures() -> dict[str, float] | None:
    temperatures = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        raw = _read_text(f"{zone}/temp")
        if raw is None or not raw.lstrip("-").isdigit():
            continue
        kind = _read_text(f"{zone}/type") or Path(zone).name
        name = kind if kind not in temperatures else f"{kind}.{Path(zone).name}"
        temperatures[name] = int(raw) / 1000.0
    return temperatures or None


def decode_throttled(value: int) -> dict[str, bool | str]:
    """`vcgencmd get_throttled` as named flags."""
    flags = {name: bool(value >> bit & 1) for bit, name in THROTTLE_BITS.items()}
    return {"raw": hex(value), **flags}


def _throttled() -> dict[str, bool | str] | None:
    output = _run(["vcgencmd", "get_throttled"])
    if not output or "=" not in output:
        return None
    try:
        return decode_throttled(int(output.split("=", 1)[1], 16))
    except ValueError:
        return None


def _nvpmodel() -> PowerMode | None:
    output = _run(["nvpmodel", "-q"])
    if not output:
        return None
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    mode = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("NV Power Mode")), None)
    return {"mode": mode, "raw": output.strip()}


def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
