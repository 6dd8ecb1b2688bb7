"""The CPU's int8 instruction-set class: what decides whether an int8 bundle runs exactly on it.

x86 CPUs without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, which sums each
pair of products in a saturating int16 (|a1*w1 + a2*w2| <= 32767). ONNX Runtime (MLAS) and
OpenVINO (oneDNN) both use it for non-depthwise Conv, Gemm and MatMul, so 8-bit weights against
large activations clip silently there. With weights within [-64, 64] the pair sum cannot overflow
(2 x 255 x 64 = 32640). VNNI (AVX-512 VNNI, AVX-VNNI), AMX and Arm64 accumulate in int32.

Standard library only (and the runtime's kinds): the runtime reads this on the device to warn about a
bundle made for another class.
"""

from __future__ import annotations

import enum
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

from edgeopt.runtime.kinds import BackendName, unreachable

__all__ = ["IsaClass", "host_isa", "host_isa_flags", "isa_mismatch"]

#: CPU flags (as /proc/cpuinfo spells them) that benchmarks record.
REPORTED_FLAGS = (
    "sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16", "avx512_fp16", "asimd", "asimddp", "i8mm", "sve",
)


class IsaClass(str, enum.Enum):
    """How the CPU accumulates int8 products; the quantization scheme depends on it."""

    AVX2 = "avx2"  # x86 without VNNI (AVX2 and older): int16 pair sums that saturate
    VNNI = "vnni"  # AVX-512 VNNI or AVX-VNNI: u8 x s8 dot products into int32
    AMX = "amx"  # AMX-INT8 tiles (Sapphire Rapids and later), VNNI besides
    ARM64 = "arm64"  # NEON widening multiplies, SDOT/UDOT, I8MM: int32 accumulation

    @property
    def saturates_pair_sums(self) -> bool:
        return self is IsaClass.AVX2

    @property
    def description(self) -> str:
        match self:
            case IsaClass.AVX2:
                return "x86-64 without VNNI (AVX2 or older: int8 products summed pairwise in int16)"
            case IsaClass.VNNI:
                return "x86-64 with AVX-512 VNNI or AVX-VNNI (int8 dot products into int32)"
            case IsaClass.AMX:
                return "x86-64 with AMX-INT8 (Sapphire Rapids and later)"
            case IsaClass.ARM64:
                return "Arm64 (NEON, dot-product and I8MM int8 kernels)"

    def runs_exactly(self, bundle: "IsaClass") -> bool:
        """Whether a bundle made for `bundle` computes on this CPU exactly what its QDQ graph says."""
        return not (self.saturates_pair_sums and not bundle.saturates_pair_sums)


def classify(machine: str, flags: frozenset[str]) -> IsaClass | None:
    """The class of a CPU from its architecture and feature flags; None for other architectures."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686", "i386", "x86"):
        if "amx_int8" in flags:
            return IsaClass.AMX
        if "avx512_vnni" in flags or "avx_vnni" in flags or "avx512vnni" in flags or "avxvnni" in flags:
            return IsaClass.VNNI
        return IsaClass.AVX2
    if machine in ("aarch64", "arm64", "armv8l"):
        return IsaClass.ARM64
    return None


@cache
def host_isa_flags() -> frozenset[str]:
    """The CPU feature flags this OS reports, lower case (Linux /proc/cpuinfo, macOS sysctl)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            for line in cpuinfo.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
        except OSError:
            pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True, text=True, timeout=5, check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset(f.lower().replace(".", "_") for f in out.split())
    return frozenset()


@cache
def host_isa() -> IsaClass | None:
    return classify(platform.machine(), host_isa_flags())


def isa_mismatch(bundle: IsaClass | str | None, backend: BackendName, host: IsaClass | None = None) -> str | None:
    """A warning when a CPU of class `host` (this one by default) cannot run a bundle made for class
    `bundle` on `backend` exactly, else None.

    Only ONNX Runtime's and OpenVINO's CPU int8 kernels saturate; LiteRT (XNNPACK) widens to int32.
    """
    if bundle is None or not _saturating_kernels(backend):
        return None
    host = host if host is not None else host_isa()
    wanted = IsaClass(bundle)
    if host is None or host.runs_exactly(wanted):
        return None
    made_for = f"this bundle was built for {wanted.value} CPUs ({wanted.description}) but this CPU is {host.value} ({host.description})"
    if backend is BackendName.ONNXRUNTIME:
        return (
            f"{made_for}: ONNX Runtime runs its 8-bit weights on slower U8U8 kernels here to stay exact; "
            f"rebuild with `--isa {host.value}` for the fast kernels"
        )
    return (
        f"{made_for}: its 8-bit weights can saturate the int16 pair sums here and the outputs will differ "
        f"from the verified ones; rebuild with `--isa {host.value}` for this CPU"
    )


def _saturating_kernels(backend: BackendName) -> bool:
    """Whether `backend` runs int8 on x86 with the saturating int16 pair sums (see the module's docstring)."""
    match backend:
        case BackendName.ONNXRUNTIME | BackendName.OPENVINO:
            return True
        case BackendName.TFLITE | BackendName.COREML | BackendName.TENSORRT | BackendName.COREML_REFERENCE:
            return False
        case _:
            unreachable(backend)
