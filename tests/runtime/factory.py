"""Small models and hand-written bundles for the runtime tests (docs/bundle.md, schema 1.0).

The SDK's bundle writer is tested on its own; here bundles are written by hand so the runtime's
reading of the contract is checked against the document, not against the writer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeopt.runtime.spec import TensorSpec

OPSET = 17
WEIGHTS = np.random.default_rng(7).standard_normal((4, 3)).astype(np.float32)
BIAS = np.array([0.1, -0.2, 0.3], dtype=np.float32)
INPUT_SCALE, INPUT_ZERO_POINT = 0.02, 3
OUTPUT_SCALE, OUTPUT_ZERO_POINT = 0.05, -4


def _model(nodes: list[onnx.NodeProto], inputs: list, outputs: list, initializers: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeopt-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def tiny_float_model(batch: int | str = 1) -> onnx.ModelProto:
    """y = relu(x @ W + b): x [batch, 4] float32 -> y [batch, 3]."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "b")],
    )


def tiny_float_reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ WEIGHTS + BIAS, 0.0)


def tiny_int8_io_model() -> onnx.ModelProto:
    """The float model between DequantizeLinear (int8 x) and QuantizeLinear (int8 y)."""
    return _model(
        [
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["x"]),
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
            helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["yq"]),
        ],
        [helper.make_tensor_value_info("xq", TensorProto.INT8, [1, 4])],
        [helper.make_tensor_value_info("yq", TensorProto.INT8, [1, 3])],
        [
            numpy_helper.from_array(WEIGHTS, "W"),
            numpy_helper.from_array(BIAS, "b"),
            numpy_helper.from_array(np.array(INPUT_SCALE, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(INPUT_ZERO_POINT, np.int8), "x_zp"),
            numpy_helper.from_array(np.array(OUTPUT_SCALE, np.float32), "y_scale"),
            numpy_helper.from_array(np.array(OUTPUT_ZERO_POINT, np.int8), "y_zp"),
        ],
    )


def two_input_model() -> onnx.ModelProto:
    """z = a + b over [1, 2] float32 and ids [1, 2] int64 -> count (float)."""
    return _model(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "ids_f"], ["z"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])],
        [],
    )


def conv_model(channels: int = 32, size: int = 56, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """A stack of 3x3 Conv + Relu on [1, channels, size, size] (a 'medium' CPU workload)."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "x"
    for i in range(layers):
        weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}" if i < layers - 1 else "y"]))
        current = f"r{i}"
    shape = [1, channels, size, size]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializers,
    )


# -- TFLite ---------------------------------------------------------------------------------


def tiny_tflite(int8: bool = False) -> bytes:
    """A one-op TFLite model, y = x + c over [1, 4], written with LiteRT's schema object API.

    With int8=True all tensors are int8 with scale 0.1, zero point 2 (so the artifact itself
    carries the quantization the runtime must read).
    """
    from ai_edge_litert import schema_py_generated as schema

    tensor_type = schema.TensorType.INT8 if int8 else schema.TensorType.FLOAT32
    constant = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
    if int8:
        constant_bytes = (np.round(constant / 0.1) + 2).astype(np.int8).tobytes()
    else:
        constant_bytes = constant.tobytes()

    def tensor(name: str, buffer: int) -> Any:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1, 4], tensor_type, buffer
        if int8:
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint = [0.1], [2]
            t.quantization = q
        return t

    def buffer(data: bytes | None) -> Any:
        b = schema.BufferT()
        if data is not None:
            b.data = list(data)
        return b

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 2 if int8 else 1
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType = schema.BuiltinOptions.AddOptions
    op.builtinOptions = schema.AddOptionsT()
    subgraph = schema.SubGraphT()
    subgraph.tensors = [tensor("x", 1), tensor("c", 2), tensor("y", 3)]
    subgraph.inputs, subgraph.outputs, subgraph.operators, subgraph.name = [0], [2], [op], "main"
    model = schema.ModelT()
    model.version, model.description = 3, "edgeopt runtime test"
    model.operatorCodes, model.subgraphs = [code], [subgraph]
    model.buffers = [buffer(None), buffer(None), buffer(constant_bytes), buffer(None)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# -- bundles --------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifact_entry(root: Path, relative: str, role: str, fmt: str) -> dict[str, Any]:
    """{path, format, bytes, sha256, role} computed independently of edgeopt.runtime.bundle."""
    path = root / relative
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
        lines = "".join(f"{rel}\0{sha256_file(p)}\n" for rel, p in files)
        return {"path": relative, "format": fmt, "bytes": sum(p.stat().st_size for _, p in files),
                "sha256": hashlib.sha256(lines.encode()).hexdigest(), "role": role}
    return {"path": relative, "format": fmt, "bytes": path.stat().st_size, "sha256": sha256_file(path), "role": role}


def write_bundle(
    root: Path,
    *,
    model_file: str,
    model_bytes: bytes,
    backend: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    reference_inputs: dict[str, np.ndarray] | None = None,
    reference_outputs: dict[str, np.ndarray] | None = None,
    tolerance: dict[str, float] | None = None,
    precision: str = "fp32",
    target: str = "onnxruntime-cpu",
    install: str = "pip install onnxruntime",
    options: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    schema_version: str = "1.0",
) -> Path:
    """A bundle folder per docs/bundle.md, with every artifact's bytes and sha256 in the manifest."""
    root.mkdir(parents=True)
    (root / model_file).write_bytes(model_bytes)
    formats = {".onnx": "onnx", ".tflite": "tflite", ".xml": "openvino-ir"}
    artifacts = [artifact_entry(root, model_file, "model", formats.get(Path(model_file).suffix, "other"))]
    for relative, data in (extra_files or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
        artifacts.append(artifact_entry(root, relative, "weights", "bin"))
    reference = None
    if reference_inputs is not None and reference_outputs is not None:
        (root / "reference").mkdir()
        np.savez(root / "reference" / "inputs.npz", **reference_inputs)
        np.savez(root / "reference" / "outputs.npz", **reference_outputs)
        artifacts += [
            artifact_entry(root, "reference/inputs.npz", "reference", "npz"),
            artifact_entry(root, "reference/outputs.npz", "reference", "npz"),
        ]
        samples = next(iter(reference_inputs.values())).shape[0]
        reference = {
            "inputs": "reference/inputs.npz",
            "outputs": "reference/outputs.npz",
            "samples": int(samples),
            "tolerance": tolerance or {"atol": 1e-5, "rtol": 1e-4},
            "measured": {"max_abs": 0.0, "max_rel": 0.0, "verified_with": backend},
        }
    manifest = {
        "schema_version": schema_version,
        "edgeopt_version": "0.1.0",
        "created_at": "2026-11-24T00:00:00+00:00",
        "name": "tiny",
        "target": {"name": target, "backend": backend, "artifact_format": formats.get(Path(model_file).suffix), "layout": None},
        "precision": precision,
        "toolchain": {"python": "3.11", "numpy": np.__version__},
        "source_model": {"file": "tiny.onnx", "sha256": "0" * 64, "bytes": 0, "opset": OPSET, "producer": "edgeopt-tests"},
        "artifacts": artifacts,
        "runtime": {"backend": backend, "model": model_file, "install": install, "threads": None, "options": options or {}},
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
        "compression": None,
        "quality": None,
        "reference": reference,
        "stages": [],
        "quantization": None,
        "lowering": {},
        "profiles": [],
        "benchmarks": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def float_bundle(root: Path, samples: int = 3, tolerance: dict[str, float] | None = None, wrong_reference: bool = False) -> Path:
    """The tiny float model as an onnxruntime-cpu bundle with reference data stacked per sample."""
    x = np.random.default_rng(1).standard_normal((samples, 1, 4)).astype(np.float32)
    y = np.stack([tiny_float_reference(sample) for sample in x])
    if wrong_reference:
        y = y + 0.5
    return write_bundle(
        root,
        model_file="model.onnx",
        model_bytes=tiny_float_model().SerializeToString(),
        backend="onnxruntime",
        inputs=[TensorSpec("x", (1, 4), "float32", None, None)],
        outputs=[TensorSpec("y", (1, 3), "float32", None, None)],
        reference_inputs={"x": x},
        reference_outputs={"y": y},
        tolerance=tolerance,
    )


def conv_tflite(channels: int = 32, size: int = 56, layers: int = 4, seed: int = 0) -> bytes:
    """The TFLite twin of `conv_model` (same weights): 3x3 CONV_2D + fused ReLU on [1, size, size, channels] (NHWC)."""
    from ai_edge_litert import schema_py_generated as schema

    rng = np.random.default_rng(seed)

    def buffer(data: bytes | None) -> Any:
        b = schema.BufferT()
        if data is not None:
            b.data = list(data)
        return b

    def tensor(name: str, shape: list[int], index: int) -> Any:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, schema.TensorType.FLOAT32, index
        return t

    activation_shape = [1, size, size, channels]
    buffers = [buffer(None), buffer(None)]
    tensors = [tensor("x", activation_shape, 1)]
    operators = []
    current = 0
    for i in range(layers):
        oihw = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
        weight = np.ascontiguousarray(oihw.transpose(0, 2, 3, 1))  # TFLite filters are OHWI
        bias = np.zeros(channels, np.float32)
        buffers += [buffer(weight.tobytes()), buffer(bias.tobytes()), buffer(None)]
        base = len(buffers) - 3
        tensors += [
            tensor(f"w{i}", list(weight.shape), base),
            tensor(f"b{i}", [channels], base + 1),
            tensor("y" if i == layers - 1 else f"r{i}", activation_shape, base + 2),
        ]
        options = schema.Conv2DOptionsT()
        options.padding, options.strideW, options.strideH = schema.Padding.SAME, 1, 1
        options.fusedActivationFunction = schema.ActivationFunctionType.RELU
        options.dilationWFactor = options.dilationHFactor = 1
        op = schema.OperatorT()
        first = len(tensors) - 3
        op.opcodeIndex, op.inputs, op.outputs = 0, [current, first, first + 1], [first + 2]
        op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.Conv2DOptions, options
        operators.append(op)
        current = first + 2
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CONV_2D
    code.version = 1
    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs = tensors, [0], [current]
    subgraph.operators, subgraph.name = operators, "main"
    model = schema.ModelT()
    model.version, model.description = 3, "edgeopt conv stack"
    model.operatorCodes, model.subgraphs, model.buffers = [code], [subgraph], buffers
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
