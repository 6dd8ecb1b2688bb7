"""ONNX (float or QDQ) → TFLite flatbuffer for LiteRT, written with the schema's object API (no TensorFlow).

The graph is converted to NHWC as a whole: each value lives in whatever layout its producer made,
and a TRANSPOSE appears only where an op's semantics need another one (a flatten feeding a dense
layer, a user-visible boundary). In the int8 precision every Q→DQ pair of the QDQ graph becomes an
int8 tensor with exactly its scale and zero point; float I/O gets QUANTIZE/DEQUANTIZE at the edges
unless `options.extra["int_io"]` asks for int8 I/O.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgeopt.converters.errors import ArtifactRejectedError, LoweringError, UnsupportedOpsError
from edgeopt.converters.lower.base import LoweredArtifact, LoweringOptions, LoweringResult
from edgeopt.converters.lower.tflite_builder import QuantParams, TFLiteBuilder
from edgeopt.converters.lower.tflite_graph import Conversion, identity, input_names, nhwc_perm, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY
from edgeopt.converters.lower.tflite_ops.common import NOT_YET
from edgeopt.converters.lower.tflite_prepare import prepare_graph
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import Target

__all__ = ["INSTALL_HINT", "lower", "lower_to_bytes"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install ai-edge-litert (Python >= 3.9, 64-bit Raspberry Pi OS); tflite-runtime on older systems"

_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8_WEIGHTS, Precision.INT8)
# Oldest TFLite runtime whose builtin kernels cover an op as emitted here (conservative).
_MIN_RUNTIME = {"GELU": "2.13", "RELU_0_TO_1": "2.14", "BATCH_MATMUL": "2.4", "SELECT_V2": "2.2", "HARD_SWISH": "2.2"}
_BASE_RUNTIME = "2.4"


def _io_layout(options: LoweringOptions) -> str:
    layout = (options.io_layout or "nchw").lower()
    if layout not in ("nchw", "nhwc"):
        raise LoweringError(f"io_layout '{options.io_layout}' is not one of nchw, nhwc", hint="use --io-layout nchw or nhwc")
    return layout


def _check_supported(graph: ir.Graph, target_name: str) -> None:
    """Every node the lowering cannot write, named at once before anything is written."""
    problems = [
        (node.name, node.op_type, why)
        for node in graph
        if (why := _why_unsupported(node)) is not None
    ]
    if problems:
        raise UnsupportedOpsError(
            target_name, problems,
            hint="replace these ops (or fold them with static shapes) before export, or choose another --target",
        )


def _why_unsupported(node: ir.Node) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain '{node.domain}'"
    if node.op_type not in REGISTRY:
        return f"{NOT_YET} {node.op_type} yet"
    return REGISTRY.why_unsupported(node.op_type, node, True)


def _parse_precision(precision: str) -> Precision:
    try:
        parsed = Precision(precision)
    except ValueError:
        parsed = None
    if parsed not in _PRECISIONS:
        raise LoweringError(f"precision '{precision}' is not one of {', '.join(_PRECISIONS)} for TFLite")
    return parsed


def _input_quant(c: Conversion, name: str) -> QuantParams | None:
    params = {c.q_params(u) for u in c.consumers.get(name, []) if u.op_type == "QuantizeLinear"}
    if len(params) != 1 or any(u.op_type != "QuantizeLinear" for u in c.consumers.get(name, [])):
        return None
    only = params.pop()
    if only.dtype == "uint8":
        return QuantParams(only.scale, tuple(z - 128 for z in only.zero_point), "int8")
    return only


def _layout_name(rank: int, perm: tuple[int, ...]) -> str | None:
    if rank != 4:
        return None
    return "NHWC" if perm == nhwc_perm(4) else "NCHW"


def lower_to_bytes(
    model: onnx.ModelProto, precision: Precision, options: LoweringOptions, target_name: str = "raspberry-pi"
) -> tuple[bytes, list[TensorSpec], list[TensorSpec], dict]:
    """The .tflite bytes, its input and output specs, and the lowering summary."""
    precision = _parse_precision(precision)
    started = time.perf_counter()
    layout = _io_layout(options)
    int_io = bool(options.extra.get("int_io", False))
    prepared = prepare_graph(model, options.input_shapes)
    graph = prepared.model.graph
    has_qdq = any(n.op_type == "QuantizeLinear" for n in graph)
    if precision == Precision.INT8 and not has_qdq:
        raise LoweringError(
            "precision int8 needs a QDQ model, but this graph has no QuantizeLinear nodes",
            hint="quantize first (edgeopt build --precision int8 --calibration ...) or pick fp32/fp16/int8-weights",
        )
    _check_supported(graph, target_name)

    builder = TFLiteBuilder(f"{options.model_name}: edgeopt ONNX->TFLite lowering ({precision})")
    c = Conversion(prepared, builder, precision)
    input_specs: list[TensorSpec] = []
    input_tensors: list[int] = []
    graph_inputs = [value.name for value in graph.inputs]
    for name in graph_inputs:
        shape = c.graph_shape(name)
        dtype = str(c.graph_dtype(name))
        perm = nhwc_perm(4) if layout == "nhwc" and len(shape) == 4 else identity(len(shape))
        quant = _input_quant(c, name) if precision == Precision.INT8 and int_io and dtype == "float32" else None
        value = c.add_value(name, shape, dtype)
        index = builder.tensor(name, [shape[p] for p in perm], quant.dtype if quant else dtype, quant)
        value.variants[(perm, quant)] = index
        input_tensors.append(index)
        input_specs.append(
            TensorSpec(name, tuple(builder.shapes[index]), builder.dtypes[index], _layout_name(len(shape), perm), quant.to_dict() if quant else None)
        )

    # Dequantized constants (weights, biases, constant operands) are known before any op needs them,
    # whatever the node order: a fused bias may be read before its DequantizeLinear comes up.
    for node in graph:
        if node.op_type == "DequantizeLinear" and input_names(node)[0] in c.constants:
            REGISTRY.handler(node.op_type)(c, node)
            c.skip.add(id(node))
    quantized_ops: Counter[str] = Counter()
    float_ops: Counter[str] = Counter()
    for node in graph:
        if id(node) in c.skip:
            continue
        REGISTRY.handler(node.op_type)(c, node)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity", "Dropout", "Transpose"):
            continue
        outputs = [c.values.get(o) for o in output_names(node) if o in c.values]
        if outputs and any(q is not None for v in outputs for _, q in v.variants if v is not None):
            quantized_ops[node.op_type] += 1
        else:
            float_ops[node.op_type] += 1

    output_specs: list[TensorSpec] = []
    output_tensors: list[int] = []
    for name in [value.name for value in graph.outputs]:
        if name in c.constants:
            raise LoweringError(f"output '{name}' is a constant after folding", hint="the model computes nothing from its inputs")
        rank = len(c.shape(name))
        perm = nhwc_perm(4) if layout == "nhwc" and rank == 4 else identity(rank)
        quantized = precision == Precision.INT8 and int_io and c.quant_of(name) is not None
        index = c.get(name, perm, "q" if quantized else None)
        builder.rename(index, name)
        output_tensors.append(index)
        quant = builder.quant[index]
        output_specs.append(
            TensorSpec(name, tuple(builder.shapes[index]), builder.dtypes[index], _layout_name(rank, perm), quant.to_dict() if quant else None)
        )
    for index, name in zip(input_tensors, graph_inputs):
        builder.rename(index, name)
    builder.set_io(input_tensors, output_tensors)
    flatbuffer = builder.serialize()

    histogram = dict(sorted(builder.op_histogram.items()))
    compute = sum(quantized_ops.values()) + sum(float_ops.values())
    summary = {
        "io_layout": layout,
        "int_io": int_io and precision == Precision.INT8,
        "transpose_ops": histogram.get("TRANSPOSE", 0),
        "ops": histogram,
        "tflite_ops_total": sum(histogram.values()),
        "onnx_nodes_lowered": compute,
        "quantized_onnx_ops": dict(quantized_ops),
        "float_onnx_ops": dict(float_ops),
        "quantized_op_share": (sum(quantized_ops.values()) / compute) if compute and precision == Precision.INT8 else 0.0,
        "adaptations": list(dict.fromkeys(c.adaptations)),
        "folded_nodes": prepared.folded_nodes,
        "fused_patterns": {**prepared.fused, **({"MatMul+Add bias->FULLY_CONNECTED": c.fused_bias} if c.fused_bias else {})},
        "min_tflite_runtime": max((_MIN_RUNTIME.get(op, _BASE_RUNTIME) for op in histogram), key=lambda v: tuple(map(int, v.split("."))), default=_BASE_RUNTIME),
        "litert_version": _litert_version(),
        "install": INSTALL_HINT,
        "bytes": len(flatbuffer),
        "conversion_seconds": round(time.perf_counter() - started, 3),
    }
    return flatbuffer, input_specs, output_specs, summary


def _litert_version() -> str:
    try:
        from importlib.metadata import version

        return version("ai-edge-litert")
    except Exception:  # metadata missing in unusual installs
        return "unknown"


_CHECK = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
for detail in interpreter.get_input_details():
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
interpreter.invoke()
"""


def _check_loads(path: Path) -> None:
    """Let LiteRT itself read, plan and run the file once on zeros, in a child process: a malformed
    model can make a LiteRT kernel abort (SIGABRT) rather than raise, and that must fail the build
    with a message, not take the build down."""
    import signal
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _CHECK, str(path)], capture_output=True, text=True, timeout=600)
    if run.returncode == 0:
        return
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("INFO:")]
    if run.returncode < 0:
        try:
            how = f"crashes ({signal.Signals(-run.returncode).name})"
        except ValueError:
            how = f"crashes (signal {-run.returncode})"
    else:
        how = "rejects it"
    detail = lines[-1][:400] if lines else ""
    raise ArtifactRejectedError(
        f"LiteRT {how} loading and running the written model {path.name}" + (f": {detail}" if detail else "") + " — an edgeopt lowering bug",
        hint="please report it with the model; --precision fp32 or another target builds without this path",
    )


def lower(model: onnx.ModelProto, target: Target, precision: Precision, out_dir: Path, options: LoweringOptions) -> LoweringResult:
    """Write `model.tflite` into `out_dir`; verified on LiteRT's interpreter (backend "tflite")."""
    if precision not in target.precisions:
        raise LoweringError(f"{target.name} has no precision '{precision}' (choose from {', '.join(target.precisions)})")
    flatbuffer, inputs, outputs, summary = lower_to_bytes(model, precision, options, target.name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    file_name = "model.tflite"  # the bundle's fixed artifact name (docs/bundle.md)
    path = out_dir / file_name
    path.write_bytes(flatbuffer)
    _check_loads(path)
    log.info("wrote %s (%d bytes, %d TRANSPOSE ops)", path, len(flatbuffer), summary["transpose_ops"])
    return LoweringResult(
        artifacts=[LoweredArtifact(file_name, ArtifactFormat.TFLITE)],
        model_file=file_name,
        runtime_backend=BackendName.TFLITE,
        verify_backend=BackendName.TFLITE,
        inputs=inputs,
        outputs=outputs,
        summary=summary,
    )
