"""ONNX→ONNX passes and lowerings to device formats. Functions of a model; no CLI, no printing."""
