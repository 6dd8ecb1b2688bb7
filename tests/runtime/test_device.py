"""device_facts: always a complete dict, whatever this machine exposes."""

from __future__ import annotations

import platform

import numpy as np

from edgeopt.runtime import device_facts
from edgeopt.runtime.device import decode_throttled


def test_device_facts_describe_this_machine() -> None:
    facts = device_facts()
    assert facts["os"]["system"] == platform.system()
    assert facts["python"]["version"] == platform.python_version()
    assert facts["libraries"]["numpy"] == np.__version__
    assert facts["libraries"]["onnxruntime"]
    assert facts["cpu"]["logical_cores"] >= 1
    for optional in ("cpu_governor", "cpu_frequency_mhz", "temperatures_c", "throttled", "power_mode", "board"):
        assert optional in facts  # null where the machine does not expose it


def test_raspberry_pi_throttle_bits_are_named() -> None:
    # 0x50005: under-voltage now, throttled now, and both have occurred (Raspberry Pi docs example)
    decoded = decode_throttled(0x50005)
    assert decoded["raw"] == "0x50005"
    assert decoded["under_voltage_now"] and decoded["throttled_now"]
    assert decoded["under_voltage_occurred"] and decoded["throttling_occurred"]
    assert not decoded["frequency_capped_now"] and not decoded["soft_temperature_limit_occurred"]
