"""Read an ONNX model and describe it: what it takes and returns, how big and how costly it is,
what a target cannot run, and where int8 quantization will hurt.

- `loading`: `load_model`, the one reader of model files (the only protobuf work here)
- `stats`: `io_specs`, `model_stats`, `is_qdq`
- `support`: `unsupported_nodes`, derived from what each target's lowering or runtime reads
- `advice`: `quantization_advice`
Everything except `load_model` is read-only on the model and works on onnx_ir.
"""

from __future__ import annotations

from edgeopt.converters.analysis.advice import Advice, quantization_advice
from edgeopt.converters.analysis.loading import OPSET_CONVERTED_FROM_KEY, load_model
from edgeopt.converters.analysis.stats import ModelStats, io_specs, is_qdq, model_stats
from edgeopt.converters.analysis.support import unsupported_nodes

__all__ = [
    "OPSET_CONVERTED_FROM_KEY",
    "Advice",
    "ModelStats",
    "io_specs",
    "is_qdq",
    "load_model",
    "model_stats",
    "quantization_advice",
    "unsupported_nodes",
]
