"""QuantizeLinear/DequantizeLinear: absorbed into the int8 types of the tensors they touch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lower.tflite_builder import QuantParams
from edgeopt.converters.lower.tflite_graph import Conversion, QConst, Ref, input_names, output_names
from edgeopt.converters.lower.tflite_ops import REGISTRY


@REGISTRY.register("QuantizeLinear")
def lower_quantize(c: Conversion, node: ir.Node) -> None:
    """Q is absorbed: its params become the int8 type of its input (see lower_dequantize)."""
    c.pending_q[output_names(node)[0]] = (input_names(node)[0], c.q_params(node))


@REGISTRY.register("DequantizeLinear")
def lower_dequantize(c: Conversion, node: ir.Node) -> None:
    source, out = input_names(node)[0], output_names(node)[0]
    if source in c.constants:
        params = c.q_params(node)
        values = c.constants[source]
        if values.dtype == np.uint8:
            values, params = _uint8_to_int8(c, values, params, source)
        if not params.per_tensor:
            params = QuantParams(params.scale, params.zero_point, params.dtype, params.axis % values.ndim)
        c.qconsts[out] = QConst(values, params)
        return
    if source in c.pending_q:
        base, params = c.pending_q[source]
        if params.dtype == "uint8":
            c.adapt(f"'{base}': uint8 activation params moved to int8 (zero point - 128, same scale; exact)")
            params = QuantParams(params.scale, tuple(z - 128 for z in params.zero_point), "int8", params.axis)
        value, _ = c.resolve(base) if not c.is_const(base) else (None, None)
        if value is None:
            raise LoweringError(f"QuantizeLinear of constant '{base}' feeding '{node.name}' was not folded")
        c.refs[out] = Ref(value.name, params)
        return
    raise LoweringError(
        f"DequantizeLinear '{node.name}' reads '{source}', which no QuantizeLinear produces",
        hint="integer model inputs are not supported; quantize float inputs with a QuantizeLinear",
    )


def _uint8_to_int8(c: Conversion, values: np.ndarray, params: QuantParams, name: str) -> tuple[np.ndarray, QuantParams]:
    c.adapt(f"constant '{name}': uint8 moved to int8 (values and zero point - 128; exact)")
    shifted = (values.astype(np.int16) - 128).astype(np.int8)
    return shifted, QuantParams(params.scale, tuple(z - 128 for z in params.zero_point), "int8", params.axis)

