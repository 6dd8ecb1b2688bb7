"""The `coreml-reference` backend's numpy MIL evaluator reads saved `.mlpackage` files on its own
and emulates fp16 compute.

coremltools' own reader of saved programs (milproto.load, then each constexpr op's materialized value)
is the oracle for what the compressed weights must decode to; the evaluator itself never uses it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.converters.lower.base import LoweringOptions
from edgeopt.converters.lower.coreml import PACKAGE_NAME, lower
from edgeopt.runtime.backends import coreml_kernels, coreml_reference
from edgeopt.runtime.backends.coreml_kernels import KERNELS, Args
from edgeopt.runtime.backends.coreml_reference import MilReferenceEvaluator, read_weight_blob
from edgeopt.runtime.errors import BackendUnavailableError, BundleError, InputSpecError
from edgeopt.runtime.kinds import Precision
from edgeopt.targets import get_target
from tests import zoo

TARGET = get_target("apple-ane")


def _add_constant_model(constant: float) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.full((1, 4), constant, np.float32), "c")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_evaluator_depends_only_on_the_file_format() -> None:
    """No import of the lowering or of coremltools at all, in the evaluator or its kernels: numpy, the
    standard library and the runtime (coremltools' protobuf classes are imported by name when a package
    is loaded)."""
    sources = [inspect.getsource(coreml_reference)]
    sources += [path.read_text(encoding="utf-8") for path in Path(coreml_kernels.__file__).parent.glob("*.py")]
    imported = {
        alias.name if isinstance(node, ast.Import) else f"{node.module}"
        for source in sources
        for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    kernel_modules = {f"edgeopt.runtime.backends.coreml_kernels{suffix}" for suffix in ("", ".base", ".elementwise", ".windows")}
    assert imported <= {"__future__", "importlib", "json", "math", "collections.abc", "pathlib", "types", "typing",
                        "numpy", "numpy.lib.stride_tricks", "edgeopt.runtime.backends.base",
                        "edgeopt.runtime.backends.coreml", "edgeopt.runtime.errors", "edgeopt.runtime.library_output",
                        "edgeopt.runtime.kinds", "edgeopt.runtime.op_registry", "edgeopt.runtime.spec", "logging",
                        *kernel_modules}


def test_fp16_programs_round_between_ops(tmp_path: Path) -> None:
    """1 + 1e-4 is 1.0 in fp16 (spacing 2**-10 near 1), but 1.0001 in fp32."""
    model = _add_constant_model(1e-4)
    x = np.ones((1, 4), np.float32)
    fp16 = lower(model, TARGET, Precision.FP16, tmp_path / "fp16", LoweringOptions()).runner({"x": x})["y"]
    fp32 = lower(model, TARGET, Precision.FP32, tmp_path / "fp32", LoweringOptions()).runner({"x": x})["y"]
    assert np.all(fp16 == 1.0)
    assert np.allclose(fp32, 1.0001, rtol=0, atol=1e-7)


def test_weight_blob_holds_the_weights_coremltools_wrote(tmp_path: Path) -> None:
    model = zoo.digits_cnn()
    lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions())
    weights = tmp_path / PACKAGE_NAME / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    header = np.frombuffer(weights.read_bytes()[:8], dtype="<u4")
    evaluator = MilReferenceEvaluator(tmp_path / PACKAGE_NAME)
    blob_constants = [
        (op.outputs[0].name, op.attributes["val"].blobFileValue.offset)
        for op in evaluator.block.operations
        if op.type == "const" and op.attributes["val"].HasField("blobFileValue")
    ]
    assert header.tolist() == [len(blob_constants), 2]  # count, storage format version 2
    initializers = sorted((numpy_helper.to_array(t) for t in model.graph.initializer), key=lambda a: a.size)
    largest = initializers[-1].astype(np.float16)
    decoded = [read_weight_blob(weights, offset) for _, offset in blob_constants]
    assert any(d.dtype == np.float16 and d.size == largest.size and np.array_equal(np.sort(d), np.sort(largest.reshape(-1))) for d in decoded)


@pytest.mark.parametrize(("precision", "deployment"), [("palettized-4", "iOS17"), ("palettized-6", "iOS17"), ("int8-weights", "iOS17"), ("palettized-4", "iOS18"), ("int8-weights", "iOS18")])
def test_compressed_weights_decode_like_coremltools(precision: str, deployment: str, tmp_path: Path) -> None:
    """Sub-byte LUT indices and int8 affine weights, unpacked from the file, equal coremltools' own decompression."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    model = zoo.digits_cnn()
    lower(model, TARGET, Precision(precision), tmp_path, LoweringOptions(extra={"weight_threshold": 256, "deployment_target": deployment}))
    package = tmp_path / PACKAGE_NAME
    saved = ct.models.MLModel(str(package), skip_model_load=True)
    spec = saved.get_spec()
    program = load_milproto(spec, spec.specificationVersion, saved.weights_dir)
    expected = {
        op.outputs[0].name: op.materialized_val_inference()
        for op in program.functions["main"].operations
        if op.op_type.startswith("constexpr")
    }
    assert expected
    evaluator = MilReferenceEvaluator(package)
    for op in evaluator.block.operations:
        if op.type.startswith("constexpr"):
            decoded = KERNELS.handler(op.type)(Args(op, dict(evaluator._constants), evaluator.decode))
            reference = expected[op.outputs[0].name]
            assert decoded.shape == reference.shape
            np.testing.assert_allclose(decoded, reference.astype(np.float32), rtol=1e-3, atol=1e-6)


def test_missing_input_and_unknown_op_are_named(tmp_path: Path) -> None:
    lower(_add_constant_model(1.0), TARGET, Precision.FP16, tmp_path, LoweringOptions())
    evaluator = MilReferenceEvaluator(tmp_path / PACKAGE_NAME)
    with pytest.raises(InputSpecError, match="input 'x' missing"):
        evaluator({})
    operation = next(op for op in evaluator.block.operations if op.type == "add")
    operation.type = "made_up_op"
    with pytest.raises(BackendUnavailableError, match="no kernel for MIL op 'made_up_op'") as caught:
        evaluator({"x": np.zeros((1, 4), np.float32)})
    assert "--backend coreml" in caught.value.hint


def test_kernel_limits_are_support_checks_beside_the_kernels() -> None:
    """What a kernel does not implement is said by its registry entry, before it runs."""

    def args(op_type: str, **attributes: object) -> Args:
        operation = SimpleNamespace(type=op_type, inputs={}, attributes=attributes)
        return Args(operation, {}, lambda value: value)

    assert KERNELS.why_unsupported("pad", args("pad", mode="reflect")) is None
    assert KERNELS.why_unsupported("pad", args("pad", mode="wrap")) == "pad mode 'wrap' is not implemented"
    assert KERNELS.why_unsupported("concat", args("concat", interleave=True)) == "interleaved concat is not implemented"
    assert KERNELS.why_unsupported("cast", args("cast", dtype="complex64")) == "cast to dtype 'complex64' is not implemented"
    assert KERNELS.why_unsupported("made_up_op") == "edgeopt's Core ML reference evaluator does not handle made_up_op yet"
    assert {"conv", "conv_transpose", "max_pool", "resize_bilinear", "constexpr_lut_to_dense", "add", "relu"} <= KERNELS.op_types


def test_a_weight_file_outside_the_package_is_refused(tmp_path: Path) -> None:
    """A hostile package whose constants point out of it (`../../secret`) is a damaged bundle, not a read."""
    lower(zoo.digits_cnn(), TARGET, Precision.FP16, tmp_path, LoweringOptions())
    spec_path = tmp_path / PACKAGE_NAME / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = spec_path.read_bytes()
    assert b"@model_path/weights/weight.bin" in spec
    outside = b"@model_path/../../../../etc/xx"  # same length: the protobuf's sizes stay valid
    spec_path.write_bytes(spec.replace(b"@model_path/weights/weight.bin", outside))
    with pytest.raises(BundleError, match="points outside the package"):
        MilReferenceEvaluator(tmp_path / PACKAGE_NAME)
