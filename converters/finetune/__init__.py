"""Fine-tuning the QDQ graph that ships (the `train` extra: importing this package needs torch).

`TrainableGraph` runs an ONNX graph, fp32 or QDQ, as a torch module with its initializers as
parameters and its Q/DQ as LSQ fake-quants (`fake_quant`); `quant_params()` maps them back to the graph.
"""

from edgeopt.converters.finetune.fake_quant import FakeQuantizer, QuantizerMode, QuantSpec
from edgeopt.converters.finetune.interpreter import QuantRecord, TrainableGraph

__all__ = ["FakeQuantizer", "QuantRecord", "QuantSpec", "QuantizerMode", "TrainableGraph"]
