"""CPU classes: which CPUs run which int8 bundles exactly, read from the flags the OS reports."""

from __future__ import annotations

import platform

import pytest

from edgeopt.runtime.device import device_facts
from edgeopt.runtime.isa import IsaClass, classify, host_isa, host_isa_flags, isa_mismatch
from edgeopt.runtime.kinds import BackendName


@pytest.mark.parametrize(
    "machine,flags,expected",
    [
        ("x86_64", {"sse4_1", "avx", "avx2", "fma"}, IsaClass.AVX2),  # Zen 2/3, Haswell..Coffee Lake
        ("x86_64", {"sse4_1", "sse4_2"}, IsaClass.AVX2),  # Atom/Celeron without AVX: the same int16 pair sums
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, IsaClass.VNNI),  # Cascade Lake, Ice Lake, Zen 4
        ("x86_64", {"avx2", "avx_vnni"}, IsaClass.VNNI),  # Alder Lake and later client cores
        ("AMD64", {"avx2", "avx512_vnni", "amx_tile", "amx_int8"}, IsaClass.AMX),  # Sapphire Rapids
        ("aarch64", {"asimd", "asimddp"}, IsaClass.ARM64),
        ("arm64", set(), IsaClass.ARM64),
        ("riscv64", {"v"}, None),
    ],
)
def test_cpu_flags_map_to_a_class(machine: str, flags: set[str], expected: IsaClass | None) -> None:
    assert classify(machine, frozenset(flags)) == expected


def test_only_x86_without_vnni_saturates_and_only_bundles_for_other_classes_differ_there() -> None:
    assert [c for c in IsaClass if c.saturates_pair_sums] == [IsaClass.AVX2]
    for bundle in IsaClass:
        assert IsaClass.AVX2.runs_exactly(bundle) == (bundle is IsaClass.AVX2)
        for host in (IsaClass.VNNI, IsaClass.AMX, IsaClass.ARM64):
            assert host.runs_exactly(bundle), "7-bit weights are exact everywhere; 8-bit ones wherever sums are int32"


def test_a_vnni_bundle_on_an_avx2_cpu_warns_with_the_fix_for_the_backends_that_saturate() -> None:
    openvino = isa_mismatch("vnni", BackendName.OPENVINO, host=IsaClass.AVX2)
    assert openvino is not None and "--isa avx2" in openvino and "saturate" in openvino
    onnxruntime = isa_mismatch("vnni", BackendName.ONNXRUNTIME, host=IsaClass.AVX2)
    assert onnxruntime is not None and "--isa avx2" in onnxruntime and "slower U8U8 kernels" in onnxruntime
    assert isa_mismatch("vnni", BackendName.TFLITE, host=IsaClass.AVX2) is None, "XNNPACK widens to int32"
    assert isa_mismatch("avx2", BackendName.ONNXRUNTIME, host=IsaClass.VNNI) is None
    assert isa_mismatch(None, BackendName.ONNXRUNTIME, host=IsaClass.AVX2) is None, "float bundles have no class"


def test_this_machine_has_a_class_and_device_facts_record_it() -> None:
    expected = classify(platform.machine(), host_isa_flags())
    assert host_isa() == expected
    cpu = device_facts()["cpu"]
    assert cpu["isa_class"] == (expected.value if expected else None)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert expected is not None and "sse4_1" in cpu["isa_flags"] or not host_isa_flags()
