"""Fine-tuning the QDQ graph that ships (the `train` extra: importing this package needs torch).

`TrainableGraph` runs an ONNX graph, fp32 or QDQ, as a torch module with its initializers as
parameters and its Q/DQ as LSQ fake-quants (`fake_quant`); `quant_params()` maps them back to the graph.
`finetune` trains a QDQ graph (QAT, or QAD from its fp32 model) and `write_back` puts the result into it.
"""

from edgeopt.converters.finetune.fake_quant import FakeQuantizer, QuantizerMode, QuantSpec
from edgeopt.converters.finetune.interpreter import QuantRecord, TrainableGraph
from edgeopt.converters.finetune.data import TrainingData, load_training_data
from edgeopt.converters.finetune.train import FinetuneOptions, FinetuneResult, finetune
from edgeopt.converters.finetune.writeback import write_back

__all__ = [
    "FakeQuantizer", "FinetuneOptions", "FinetuneResult", "QuantRecord", "QuantSpec", "QuantizerMode", "TrainableGraph", "TrainingData",
    "finetune", "load_training_data", "write_back",
]
