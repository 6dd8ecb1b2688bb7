"""ONNX → Core ML ML Program: every precision, checked against ONNX Runtime fp32 without a Mac.

Numbers come from the numpy reference evaluator reading the saved `.mlpackage`
(runtime/backends/coreml_reference.py); on macOS the same packages also run in Core ML itself.

Tolerances, on max|Δ| against max|ref| of the compared output:
- fp32: 1e-4·max|ref| + 1e-5 (float32 end to end; only summation order differs).
- fp16 (the default): 1e-2·max|ref| + 1e-3 (fp16 has an 11-bit mantissa, ~5e-4 relative per op).
- int8-weights: 3e-2·max|ref| + 1e-3 (per-channel symmetric 8-bit weights on top of fp16).
- palettized-8/6/4: 3e-2 / 8e-2 / 2.5e-1 ·max|ref| (one 256/64/16-entry k-means table per weight
  tensor; the zoo's random Gaussian weights are the worst case for a small table).
- int8 (W8A8): against ONNX Runtime running the same QDQ graph, 5e-2·max|ref| + 1e-3: the fp16
  values entering each `quantize` op can fall on the other side of a rounding boundary than ORT's
  fp32 ones, and each such flip is one activation quantization step that later layers carry on.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgeopt.converters.data import model_input_specs, open_dataset
from edgeopt.converters.errors import LoweringError, UnsupportedOpsError
from edgeopt.converters.lower import lower as dispatch_lower
from edgeopt.converters.lower.base import LoweringOptions, LoweringResult
from edgeopt.converters.lower.coreml import PACKAGE_NAME, lower
from edgeopt.converters.lower.coreml_ops import REGISTRY
from edgeopt.runtime.backends.coreml_reference import MilReferenceEvaluator
from edgeopt.converters.passes import simplify
from edgeopt.converters.quantize import quantize
from edgeopt.runtime.kinds import Precision
from edgeopt.targets import get_target
from tests import zoo

TARGET = get_target("apple-ane")
ON_MAC = platform.system() == "Darwin"
TOLERANCE = {
    "fp32": (1e-4, 1e-5),
    "fp16": (1e-2, 1e-3),
    "int8-weights": (3e-2, 1e-3),
    "palettized-8": (3e-2, 1e-3),
    "palettized-6": (8e-2, 1e-3),
    "palettized-4": (2.5e-1, 1e-3),
    "int8": (5e-2, 1e-3),
}


def _ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime without graph rewrites, so a QDQ graph runs exactly as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(feeds))))


def _qdq(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """The int8 QDQ graph the int8 precision lowers, made as the build pipeline makes it:
    simplify, then edgeopt's quantizer in the apple-ane scheme, calibrated on `samples`."""
    simplified, _ = simplify(model)
    dataset = open_dataset(list(samples), model_input_specs(simplified))
    return quantize(simplified, TARGET.quant_scheme, dataset).model


def _package_bytes(result_dir: Path) -> int:
    return sum(f.stat().st_size for f in (result_dir / PACKAGE_NAME).rglob("*") if f.is_file())


def _check(
    model: onnx.ModelProto,
    precision: str,
    out_dir: Path,
    samples: Sequence[Mapping[str, np.ndarray]],
    tolerance: tuple[float, float] | None = None,
    **extra: object,
) -> tuple[LoweringResult, float]:
    """Lower, run the saved package with the reference evaluator, assert the tolerance; return max|Δ|."""
    lowered = _qdq(model, samples) if precision == "int8" else model
    result = lower(lowered, TARGET, Precision(precision), out_dir, LoweringOptions(extra=extra))
    assert (out_dir / PACKAGE_NAME / "Data" / "com.apple.CoreML" / "model.mlmodel").is_file()
    assert result.runner is not None
    runner = result.runner
    rtol, atol = tolerance or TOLERANCE[precision]
    worst = 0.0
    for feeds in samples[:2]:
        expected = _ort(lowered, feeds)
        actual = runner(feeds)
        for name, reference in expected.items():
            error = float(np.abs(actual[name].astype(np.float64) - reference).max())
            bound = rtol * float(np.abs(reference).max()) + atol
            assert error <= bound, f"{precision} {name}: max|Δ| {error:.3g} > {bound:.3g}"
            worst = max(worst, error)
    return result, worst


def _logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The light models end in Softmax, which a random-weight net saturates to one-hot; compare the
    logits instead (the last Softmax becomes an Identity), so errors stay visible. DenseNet-121 has none."""
    for node in reversed(model.graph.node):
        if node.op_type == "Softmax":
            node.op_type = "Identity"
            del node.attribute[:]
            break
    return model


def _digits_samples(count: int = 8) -> list[dict[str, np.ndarray]]:
    data = np.load(zoo.DIGITS_DIR / "calib.npz", allow_pickle=False)
    images = data[data.files[0]]
    return [{"image": images[i : i + 1].astype(np.float32)} for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Coverage: model × precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", TARGET.precisions)
def test_digits_in_every_precision_matches_onnxruntime(precision: str, tmp_path: Path) -> None:
    # The digits weights are small, so compress everything above 256 elements to exercise each path.
    result, error = _check(zoo.digits_cnn(), precision, tmp_path, _digits_samples(), weight_threshold=256)
    if precision in ("int8-weights", "int8") or precision.startswith("palettized-"):
        assert result.summary["compressed_weights"] > 0
    logging.getLogger(__name__).info("digits %s max|Δ| %.3g bytes %d", precision, error, _package_bytes(tmp_path))


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-weights", "palettized-8"])
@pytest.mark.parametrize("name", ["mobilenet_v2_style", "unet_style", "transformer_encoder"])
def test_zoo_models_match_onnxruntime(name: str, precision: str, tmp_path: Path) -> None:
    model = getattr(zoo, name)()
    _check(model, precision, tmp_path, zoo.random_inputs(model, n=8))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "palettized-6", "palettized-4"])
@pytest.mark.parametrize("name", ["mobilenet_v2_style", "unet_style", "transformer_encoder"])
def test_zoo_models_in_the_other_precisions(name: str, precision: str, tmp_path: Path) -> None:
    model = getattr(zoo, name)()
    _check(model, precision, tmp_path, zoo.random_inputs(model, n=2))


def test_squeezenet_fp16(tmp_path: Path) -> None:
    model = _logits(zoo.light_model("squeezenet"))
    _check(model, "fp16", tmp_path, zoo.random_inputs(model, n=1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("squeezenet", "int8-weights"), ("squeezenet", "int8"), ("shufflenet", "fp16"), ("shufflenet", "int8"),
        ("resnet50", "fp16"), ("resnet50", "int8-weights"), ("inception_v1", "fp16"), ("inception_v2", "fp16"),
        ("densenet121", "fp16"), ("squeezenet", "palettized-8"),
    ],
)
def test_light_models(name: str, precision: str, tmp_path: Path) -> None:
    model = _logits(zoo.light_model(name))
    # These nets stack 26-121 weight layers with random weights; each compressed layer adds ~1%
    # independent noise, so the logits drift by up to √depth × 1% of their range (measured:
    # int8-weights 1.0-2.7%, palettized-8 0.7-2.7%, W8A8 1.0-2.8% on SqueezeNet, ShuffleNet,
    # ResNet-50, Inception v1/v2). Trained weights are far more forgiving.
    deep = (0.1, 1e-3) if precision != "fp16" else None
    _check(model, precision, tmp_path, zoo.random_inputs(model, n=4 if precision == "int8" else 1), tolerance=deep)


def test_compressed_precisions_shrink_the_package(tmp_path: Path) -> None:
    model = zoo.unet_style()
    sizes = {}
    for precision in ("fp16", "int8-weights", "palettized-4"):
        lower(model, TARGET, Precision(precision), tmp_path / precision, LoweringOptions())
        sizes[precision] = _package_bytes(tmp_path / precision)
    assert sizes["palettized-4"] < sizes["int8-weights"] < sizes["fp16"]


def test_ios18_compressed_ops_are_evaluated_from_the_file(tmp_path: Path) -> None:
    """iOS 18 writes int8 weights as constexpr_blockwise_shift_scale and palettes as per-block LUTs."""
    model = zoo.digits_cnn()
    for precision in ("int8", "palettized-4"):
        result, _ = _check(model, precision, tmp_path / precision, _digits_samples(), weight_threshold=256, deployment_target="iOS18")
        ops = result.summary["mil_ops"]
        assert ("constexpr_blockwise_shift_scale" if precision == "int8" else "constexpr_lut_to_dense") in ops


def test_w8a8_keeps_the_qdq_scales_as_quantize_ops(tmp_path: Path) -> None:
    qdq = _qdq(zoo.digits_cnn(), _digits_samples())
    result = lower(qdq, TARGET, Precision.INT8, tmp_path, LoweringOptions())
    assert result.summary["mil_ops"].get("quantize", 0) > 0
    assert result.summary["mil_ops"].get("constexpr_affine_dequantize", 0) > 0
    activation_scales = sorted(
        float(onnx.numpy_helper.to_array(i)) for i in qdq.graph.initializer
        if i.data_type == TensorProto.FLOAT and not i.dims and any(n.op_type == "QuantizeLinear" and n.input[1] == i.name for n in qdq.graph.node)
    )
    spec_scales = []
    evaluator = MilReferenceEvaluator(tmp_path / PACKAGE_NAME)
    for op in evaluator.block.operations:
        if op.type == "quantize":
            binding = op.inputs["scale"].arguments[0]
            spec_scales.append(float(evaluator._constants[binding.name]) if binding.name else float(evaluator._decode(binding.value)))
    # The program stores scales in fp16 (compute precision), so compare at fp16 resolution.
    assert spec_scales and all(np.isclose(s, activation_scales, rtol=1e-3).any() for s in spec_scales)


# ---------------------------------------------------------------------------------------------
# The artifact: names, shapes, dtypes, dispatch, manifest facts
# ---------------------------------------------------------------------------------------------


def _tiny_model(input_name: str = "x", dims: Sequence[int | str] = (1, 3, 8, 8)) -> onnx.ModelProto:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.random.default_rng(0).standard_normal(108).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", [input_name, "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["out.0"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("out.0", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lowering_result_describes_the_package(tmp_path: Path) -> None:
    model = zoo.transformer_encoder()
    result = dispatch_lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions())
    assert result.model_file == PACKAGE_NAME and result.artifacts[0].format == "mlpackage"
    assert result.runtime_backend == "coreml"
    assert (result.verify_backend, result.verified_with) == (
        ("coreml", "coreml") if ON_MAC else ("coreml-reference", "coreml-reference (numpy evaluator of the saved program), not Core ML")
    )
    assert [(s.name, s.shape, s.dtype) for s in result.inputs] == [("input_ids", (1, 32), "int32")]
    assert [(s.name, s.shape, s.dtype) for s in result.outputs] == [("logits", (1, 10), "float32")]
    assert result.summary["deployment_target"] == "iOS17" and result.summary["compute_precision"] == "fp16"


def test_illegal_feature_names_are_renamed_and_recorded(tmp_path: Path) -> None:
    result = lower(_tiny_model("input.1"), TARGET, Precision.FP16, tmp_path, LoweringOptions())
    assert result.summary["feature_names"] == {"input.1": "input_1", "out.0": "out_0"}
    assert [s.name for s in result.inputs] == ["input_1"] and [s.name for s in result.outputs] == ["out_0"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert set(result.runner({"input.1": x})) == {"out.0"}


def test_dynamic_input_is_a_clear_error_and_input_shapes_fix_it(tmp_path: Path) -> None:
    model = _tiny_model(dims=("batch", 3, 8, 8))
    with pytest.raises(LoweringError, match=r"input 'x' has dynamic shape") as caught:
        lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions())
    assert "--input-shape x=1,3,8,8" in caught.value.hint
    result = lower(model, TARGET, Precision.FP16, tmp_path, LoweringOptions(input_shapes={"x": (1, 3, 8, 8)}))
    assert result.inputs[0].shape == (1, 3, 8, 8)


def test_unsupported_ops_are_all_listed_before_any_work(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="relu"),
         helper.make_node("NonZero", ["a"], ["b"], name="nonzero"),
         helper.make_node("TopK", ["x", "k"], ["c", "d"], name="topk", axis=-1)],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("b", TensorProto.INT64, [2, None]), helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [2])],
    )
    with pytest.raises(UnsupportedOpsError) as caught:
        lower(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), TARGET, Precision.FP16, tmp_path, LoweringOptions())
    assert [(name, op) for name, op, _ in caught.value.nodes] == [("nonzero", "NonZero"), ("topk", "TopK")]
    assert not (tmp_path / PACKAGE_NAME).exists()


def test_int8_needs_a_qdq_graph_and_ios17(tmp_path: Path) -> None:
    with pytest.raises(LoweringError, match="needs a QDQ model"):
        lower(zoo.digits_cnn(), TARGET, Precision.INT8, tmp_path, LoweringOptions())
    qdq = _qdq(zoo.digits_cnn(), _digits_samples(4))
    with pytest.raises(LoweringError, match="iOS17/macOS14"):
        lower(qdq, TARGET, Precision.INT8, tmp_path, LoweringOptions(extra={"deployment_target": "iOS16"}))
    with pytest.raises(LoweringError, match="not offered"):
        lower(zoo.digits_cnn(), TARGET, "int4", tmp_path, LoweringOptions())


def test_the_lowering_registry_is_the_one_op_list() -> None:
    assert TARGET.supported_ops is None, "the profile keeps no hand-kept list beside the registry"
    assert {"Conv", "Resize", "QuantizeLinear", "DequantizeLinear"} <= REGISTRY.op_types
    assert {"Constant", "Shape", "Range", "Identity"} <= REGISTRY.op_types  # folded or passed through, never refused
    assert "Hardmax" not in REGISTRY and REGISTRY.why_unsupported("Hardmax") is not None


# ---------------------------------------------------------------------------------------------
# Neural Engine fit
# ---------------------------------------------------------------------------------------------


def test_ane_fit_report_flags_known_fallbacks_with_sources(tmp_path: Path) -> None:
    encoder = lower(zoo.transformer_encoder(), TARGET, Precision.FP16, tmp_path / "encoder", LoweringOptions()).summary["ane_fit"]
    rules = {f["rule"]: f for f in encoder["findings"]}
    assert rules["static-shapes"]["severity"] == "ok"
    assert rules["gather"]["severity"] == "fallback" and "heuristic" in rules["gather"]["source"]
    assert encoder["verdict"] == "partial-ane"
    assert all(f["source"] for f in encoder["findings"])

    fp32 = lower(zoo.digits_cnn(), TARGET, Precision.FP32, tmp_path / "fp32", LoweringOptions()).summary["ane_fit"]
    assert fp32["verdict"] == "gpu-or-cpu"
    assert "machinelearning.apple.com" in {f["rule"]: f for f in fp32["findings"]}["fp32-compute"]["source"]


# ---------------------------------------------------------------------------------------------
# Core ML itself (macOS only)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_MAC, reason="Core ML prediction needs macOS; elsewhere the reference evaluator stands in")
@pytest.mark.parametrize("precision", ["fp16", "int8-weights", "palettized-8", "int8"])
def test_core_ml_agrees_with_the_reference_evaluator(precision: str, tmp_path: Path) -> None:
    import coremltools as ct

    samples = _digits_samples()
    model = _qdq(zoo.digits_cnn(), samples) if precision == "int8" else zoo.digits_cnn()
    lower(model, TARGET, Precision(precision), tmp_path, LoweringOptions(extra={"weight_threshold": 256}))
    core_ml = ct.models.MLModel(str(tmp_path / PACKAGE_NAME))
    reference = MilReferenceEvaluator(tmp_path / PACKAGE_NAME)
    rtol, atol = TOLERANCE[precision]
    for feeds in samples[:4]:
        expected = _ort(model, feeds)
        predicted = core_ml.predict(feeds)
        emulated = reference(feeds)
        for name, value in expected.items():
            bound = rtol * float(np.abs(value).max()) + atol
            assert np.abs(predicted[name] - value).max() <= bound
            assert np.abs(predicted[name] - emulated[name]).max() <= bound
