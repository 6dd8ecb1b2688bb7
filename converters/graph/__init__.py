"""The one graph layer: every pass, analysis and lowering works on onnx_ir graphs through it.

- `rewrite`: constants, fresh names, new initializers, bypassing nodes (onnx_ir surgery)
- `opset`: the model's opset and raising it
- `shapes`: shape and type queries (element types by inference, intermediate tensors as outputs)
- `qdq`: reading the Q/DQ nodes of a graph (quantization source, parameters, channel axis)
- `session`: the one ONNX Runtime session helper for converters and the SDK, and `run_model`
The folding passes (`converters/passes/fold_constants.py`, `fold_batchnorm.py`) are the only
constant folding and BatchNorm folding in edgeopt; lowerings run them, they do not fold by hand.
"""
