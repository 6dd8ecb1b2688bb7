"""ONNX (float or QDQ) → OpenVINO IR (model.xml + model.bin) with `openvino.convert_model`.

OpenVINO's ONNX frontend turns each QuantizeLinear/DequantizeLinear pair on an activation into a
FakeQuantize with the QDQ's own scale and zero point, and each DequantizeLinear of an int8 weight
into an int8 constant followed by Convert/Subtract/Multiply. The CPU plugin's low-precision
transformations then run Convolution/MatMul in int8. So the int8 IR carries exactly the scales
edgeopt calibrated; nothing is re-quantized here.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict

import numpy as np
import onnx

from edgeopt.converters.errors import LoweringError, UnsupportedOpsError
from edgeopt.converters.lower.base import LoweredArtifact, LoweringOptions, LoweringResult
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision, unreachable
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target

__all__ = ["DEVICES", "PERFORMANCE_HINTS", "INFERENCE_PRECISIONS", "runtime_config", "lower"]

_log = logging.getLogger(__name__)

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "f16", "bf16")

_MODEL_FILE = "model.xml"
_WEIGHTS_FILE = "model.bin"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Protobuf cannot serialize a model of 2 GiB or more; larger weights go to an external data file.
_INLINE_WEIGHT_LIMIT = 1 << 30
# Layers of the CPU plugin's execution graph whose runtime precision tells whether int8 kernels run.
_COMPUTE_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul"})


class DeviceOptions(TypedDict):
    """The profile's OpenVINO options after the user's overrides, checked."""

    device: str
    performance_hint: str
    inference_precision: str | None  # OpenVINO's element type name ("f32", "f16", "bf16"); None: the device's default
    compress_to_fp16: bool


class _IrFigures(TypedDict):
    fake_quantize: int
    int8_weight_constants: int
    ops: dict[str, int]


class _Lowered(DeviceOptions, _IrFigures):
    source_qdq: bool
    openvino_version: str
    bytes: dict[str, int]


class OpenVinoSummary(_Lowered, total=False):
    """The manifest's `lowering` figures; the CPU plugin's execution check only for an int8 IR."""

    cpu_execution: dict[str, dict[str, int]]  # compute layer type -> OpenVINO element type -> count
    warnings: list[str]


def _import_openvino() -> ModuleType:
    try:
        import openvino
    except ImportError as exc:
        raise LoweringError(
            "the intel-openvino lowering needs the openvino package, which is not installed",
            hint="pip install 'edgeopt[openvino]'",
        ) from exc
    return openvino


def _device_options(target: Target, options: LoweringOptions) -> DeviceOptions:
    """Profile options overridden by the user's `options.extra`, checked against what OpenVINO accepts."""
    merged = {**target.options, **{k: v for k, v in options.extra.items() if k in target.options}}
    device = str(merged.get("device", "CPU")).upper()
    hint = str(merged.get("performance_hint", "LATENCY")).upper()
    precision_hint = merged.get("inference_precision")
    precision_hint = None if precision_hint is None else str(precision_hint)
    base_device = device.split(":", 1)[0]
    if base_device not in DEVICES + ("HETERO", "MULTI"):
        raise LoweringError(
            f"unknown OpenVINO device '{device}' in the {target.name} options",
            hint=f"use one of {', '.join(DEVICES)} (or AUTO:GPU,CPU / HETERO:GPU,CPU)",
        )
    if hint not in PERFORMANCE_HINTS:
        raise LoweringError(
            f"unknown OpenVINO performance hint '{hint}' in the {target.name} options",
            hint=f"use one of {', '.join(PERFORMANCE_HINTS)}",
        )
    if precision_hint is not None and precision_hint not in INFERENCE_PRECISIONS:
        raise LoweringError(
            f"unknown OpenVINO inference precision '{precision_hint}' in the {target.name} options",
            hint=f"use one of {', '.join(INFERENCE_PRECISIONS)}, or leave it out for the device default",
        )
    return {
        "device": device,
        "performance_hint": hint,
        "inference_precision": precision_hint,
        "compress_to_fp16": bool(merged.get("compress_to_fp16", True)),
    }


def runtime_config(device_options: DeviceOptions) -> dict[str, str]:
    """The manifest's runtime options for the device: what edgeopt.runtime's openvino backend reads.

    `device` picks the plugin; `performance_hint` and `inference_precision` become the properties
    PERFORMANCE_HINT and INFERENCE_PRECISION_HINT of `compile_model`.
    """
    config = {"device": device_options["device"], "performance_hint": device_options["performance_hint"]}
    if device_options["inference_precision"]:
        config["inference_precision"] = device_options["inference_precision"]
    return config


class _CpuRunner:
    """Runs the IR on this host's CPU plugin with f32 pinned, whatever device the bundle is for.

    The CPU plugin's default precision hint is bf16 on CPUs with AVX-512 BF16 or AMX, which would
    make an fp32 parity check measure bf16 rounding instead of the IR.
    """

    def __init__(self, ov: ModuleType, xml_path: Path, performance_hint: str) -> None:
        self._ov = ov
        self._xml_path = xml_path
        self._config = {"PERFORMANCE_HINT": performance_hint, "INFERENCE_PRECISION_HINT": "f32"}
        self._compiled: Any = None

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._compiled is None:
            self._compiled = self._ov.Core().compile_model(str(self._xml_path), "CPU", self._config)
        results = self._compiled(dict(feeds))
        return {port.get_any_name(): np.asarray(results[port]) for port in self._compiled.outputs}


def _refuse_passthrough_outputs(model: onnx.ModelProto, target: Target) -> None:
    """An output that is a graph input unchanged (a model with no nodes, say) cannot keep its name in
    OpenVINO IR: the frontend renames it and adds a second input, so the bundle could not be run."""
    inputs = {value.name for value in model.graph.input}
    passed = [value.name for value in model.graph.output if value.name in inputs]
    if passed:
        what = "the model has no nodes: " if not model.graph.node else ""
        raise LoweringError(
            f"{what}output(s) {', '.join(repr(n) for n in passed)} of '{model.graph.name}' are graph inputs passed through "
            f"unchanged, which {target.name} (OpenVINO IR) cannot express",
            hint="remove those outputs from the model (their value is the input itself), or choose another --target",
        )


def _is_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in _QDQ_OPS for node in model.graph.node)


def _openvino_reason(exc: Exception) -> str:
    """OpenVINO's message without its C++ source locations."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Check '", "Exception from src/", "FrontEnd API failed"))]
    return " ".join(useful or lines[:1])


def _unconverted_nodes(model: onnx.ModelProto, reason: str, target: Target) -> UnsupportedOpsError | None:
    """Every node of an op type OpenVINO's ONNX frontend has no conversion rule for, by name."""
    match = re.search(r"No conversion rule found for operations: ([^\n]+?)(?:\s+--|$)", reason)
    if match is None:
        return None
    missing = {op.strip() for op in match.group(1).split(",")}
    nodes = [
        (node.name, node.op_type, "OpenVINO's ONNX frontend has no conversion rule for it")
        for node in model.graph.node
        if (f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type) in missing
    ]
    return UnsupportedOpsError(target.name, nodes) if nodes else None


def _convert(ov: ModuleType, model: onnx.ModelProto, target: Target) -> Any:
    """`convert_model` reads ONNX from a file only, so the model goes through a temporary folder."""
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    with tempfile.TemporaryDirectory(prefix="edgeopt-ov-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=weight_bytes >= _INLINE_WEIGHT_LIMIT)
        try:
            return ov.convert_model(str(path), share_weights=False)
        except Exception as exc:  # OpenVINO raises its own Error/RuntimeError types
            reason = _openvino_reason(exc)
            unsupported = _unconverted_nodes(model, reason, target)
            if unsupported is not None:
                raise unsupported from exc
            raise LoweringError(
                f"OpenVINO could not convert the ONNX model: {reason}",
                hint="check the ops against OpenVINO's ONNX frontend (docs: 'Supported Operations - ONNX'); "
                "`edgeopt build --target onnxruntime-cpu` runs any ONNX model",
            ) from exc


def _reshape(ov_model: Any, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    names = {name for port in ov_model.inputs for name in port.get_names()}
    unknown = sorted(set(input_shapes) - names)
    if unknown:
        raise LoweringError(
            f"--input-shape names {', '.join(unknown)}, which the model does not have as inputs",
            hint=f"the model's inputs are {', '.join(sorted(names))}",
        )
    try:
        ov_model.reshape({name: list(shape) for name, shape in input_shapes.items()})
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with C++ context
        raise LoweringError(
            f"OpenVINO cannot reshape the model to {dict(input_shapes)}: {_openvino_reason(exc)}",
            hint="give every input a shape the model's layers accept (batch, then the exported layout)",
        ) from exc


def _tensor_specs(ports: Any, layout: str | None) -> list[TensorSpec]:
    specs = []
    for port in ports:
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        rank_matches = layout is not None and len(layout) == len(shape)
        specs.append(
            TensorSpec(
                name=port.get_any_name(),
                shape=shape,
                dtype=port.get_element_type().to_dtype().name,
                layout=layout if rank_matches else None,
            )
        )
    return specs


def _ir_summary(ov_model: Any) -> _IrFigures:
    ops = Counter(node.get_type_name() for node in ov_model.get_ordered_ops())
    int8_constants = sum(
        1
        for node in ov_model.get_ordered_ops()
        if node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")
    )
    return {
        "fake_quantize": ops.get("FakeQuantize", 0),
        "int8_weight_constants": int8_constants,
        "ops": dict(sorted(ops.items())),
    }


# Runs in a child process: a crash inside the CPU plugin's compiler (OpenVINO 2026.4 raises SIGFPE
# on some QDQ graphs) must become a LoweringError, not take the build down with it.
_CPU_PROBE = """
import json, sys
import openvino as ov
compiled = ov.Core().compile_model(sys.argv[1], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
layers = []
for node in compiled.get_runtime_model().get_ordered_ops():
    info = node.get_rt_info()
    layers.append([info["layerType"].astype(str), info["runtimePrecision"].astype(str)])
print(json.dumps(layers))
"""


def _cpu_execution(xml_path: Path) -> dict[str, dict[str, int]]:
    """Which precision each compute layer runs in on this host's CPU plugin (f32 pinned).

    The plugin runs a FakeQuantize-fed Convolution/MatMul in int8 only when the QDQ placement suits
    its low-precision transformations, so this is the honest answer to "is it really int8?".
    """
    completed = subprocess.run(
        [sys.executable, "-c", _CPU_PROBE, str(xml_path)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        if completed.returncode < 0:
            reason = f"the compiler crashed with {signal.Signals(-completed.returncode).name}"
        else:
            reason = (completed.stderr.strip().splitlines() or ["exit code %d" % completed.returncode])[-1]
        raise LoweringError(
            f"OpenVINO's CPU plugin cannot compile the int8 IR {xml_path}: {reason}",
            hint="quantize with the intel-openvino scheme (Q/DQ only on activation inputs of compute ops and of "
            "all-activation Add/Mul/Concat); OpenVINO 2026.4 crashes on symmetric Q/DQ that also quantizes the "
            "constant bias of an Add after MatMul",
        )
    by_type: dict[str, Counter[str]] = {}
    for layer_type, element_type in json.loads(completed.stdout):
        if layer_type in _COMPUTE_LAYERS:
            by_type.setdefault(layer_type, Counter())[element_type] += 1
    return {layer: dict(sorted(counts.items())) for layer, counts in sorted(by_type.items())}


def _int8_warnings(execution: Mapping[str, Mapping[str, int]]) -> list[str]:
    """`execution` counts OpenVINO's own element types per layer ("f32", "u8", "i8", ...)."""
    integer = sum(n for counts in execution.values() for element_type, n in counts.items() if element_type in ("u8", "i8"))
    total = sum(sum(counts.values()) for counts in execution.values())
    if total and not integer:
        return [
            f"none of the {total} Convolution/MatMul layers runs in int8 on the CPU plugin: the Q/DQ placement "
            "does not match OpenVINO's low-precision transformations, so the int8 IR runs in f32"
        ]
    return []


def _compresses_to_fp16(precision: Precision, int8_float_weights_fp16: bool) -> bool:
    """Whether `save_model` stores the IR's float weights as fp16 (the plugin decompresses them)."""
    match precision:
        case Precision.FP16:
            return True
        case Precision.INT8:
            return int8_float_weights_fp16
        case Precision.FP32:
            return False
        case Precision.INT8_WEIGHTS | Precision.PALETTIZED_8 | Precision.PALETTIZED_6 | Precision.PALETTIZED_4:
            raise LoweringError(f"OpenVINO IR has no {precision} lowering", hint="use fp32, fp16 or int8")
        case _:
            unreachable(precision)


def lower(
    model: onnx.ModelProto, target: Target, precision: Precision, out_dir: Path, options: LoweringOptions
) -> LoweringResult:
    """Write `model.xml` + `model.bin` into `out_dir`.

    fp32 keeps float32 weights; fp16 stores float weights as fp16 (the plugin decompresses them);
    int8 needs a QDQ graph and keeps its scales (its remaining float weights follow
    `compress_to_fp16` from the profile).
    """
    if precision not in target.precisions:
        raise LoweringError(
            f"precision '{precision}' is not offered by target {target.name}",
            hint=f"use one of {', '.join(target.precisions)}",
        )
    quantized = _is_qdq(model)
    if precision == Precision.INT8 and not quantized:
        raise LoweringError(
            f"int8 for {target.name} needs a QDQ ONNX graph, but model "
            f"'{model.graph.name or options.model_name}' has no QuantizeLinear/DequantizeLinear node",
            hint="quantize first (edgeopt build --precision int8 --calibration data.npz), "
            "or pass a QAT model exported with Q/DQ nodes",
        )
    _refuse_passthrough_outputs(model, target)
    ov = _import_openvino()
    device = _device_options(target, options)
    compress_to_fp16 = _compresses_to_fp16(precision, device["compress_to_fp16"])

    ov_model = _convert(ov, model, target)
    if options.input_shapes:
        _reshape(ov_model, options.input_shapes)
    ov_model.set_friendly_name(options.model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml_path = out_dir / _MODEL_FILE
    ov.save_model(ov_model, str(xml_path), compress_to_fp16=compress_to_fp16)
    _log.info("wrote %s (%s, compress_to_fp16=%s)", xml_path, precision, compress_to_fp16)

    layout = options.io_layout or target.layout
    saved = ov.Core().read_model(str(xml_path))
    summary: OpenVinoSummary = {
        **device,
        "compress_to_fp16": compress_to_fp16,
        "source_qdq": quantized,
        "openvino_version": ov.get_version(),
        "bytes": {_MODEL_FILE: xml_path.stat().st_size, _WEIGHTS_FILE: (out_dir / _WEIGHTS_FILE).stat().st_size},
        **_ir_summary(saved),
    }
    if quantized:
        summary["cpu_execution"] = _cpu_execution(xml_path)
        summary["warnings"] = _int8_warnings(summary["cpu_execution"])
    return LoweringResult(
        artifacts=[
            LoweredArtifact(_MODEL_FILE, ArtifactFormat.OPENVINO_IR, "model"),
            LoweredArtifact(_WEIGHTS_FILE, ArtifactFormat.OPENVINO_IR, "weights"),
        ],
        model_file=_MODEL_FILE,
        runtime_backend=BackendName.OPENVINO,
        verify_backend=BackendName.OPENVINO,
        inputs=_tensor_specs(saved.inputs, layout),
        outputs=_tensor_specs(saved.outputs, None),
        summary=summary,
        runner=_CpuRunner(ov, xml_path, device["performance_hint"]),
        verified_with=f"OpenVINO {ov.get_version().split('-')[0]} CPU plugin, INFERENCE_PRECISION_HINT f32",
        runtime_options=runtime_config(device),
    )
