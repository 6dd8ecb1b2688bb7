"""Rewrite the variadic ``Sum`` as a chain of ``Add``."""

from __future__ import annotations

__all__ = ["SumToAddPass"]

import logging

import onnx_ir as ir

from edgeopt.converters.passes.base import GraphPass

logger = logging.getLogger(__name__)


class SumToAddPass(GraphPass):
    """``Sum(a, b, ...)`` becomes ``Add(Add(a, b), ...)``.

    Caffe2-era exports (ResNet-50 and ShuffleNet in the onnx package) write residual additions as
    ``Sum``. Quantizers, TensorRT's Q/DQ fusion, OpenVINO's low-precision transformations and TFLite
    all know residual ``Add`` and leave ``Sum`` in float, so the rewrite keeps those blocks int8.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rewritten = 0
        for node in list(graph):
            if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            if any(value is None for value in node.inputs):
                continue
            adds: list[ir.Node] = []
            running = node.inputs[0]
            for index, operand in enumerate(node.inputs[1:], start=1):
                add = ir.Node("", "Add", inputs=[running, operand], name=f"{node.name or 'sum'}_add{index}")
                adds.append(add)
                running = add.outputs[0]
            old = node.outputs[0]
            running.name, running.shape, running.type = old.name, old.shape, old.type
            ir.convenience.replace_nodes_and_values(graph, node, [node], adds, [old], [running])
            rewritten += 1
        if rewritten:
            logger.info("rewrote %d Sum node(s) as Add", rewritten)
        return ir.passes.PassResult(model, modified=bool(rewritten))
