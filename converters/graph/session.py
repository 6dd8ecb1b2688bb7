"""The one place converters and the SDK build an ONNX Runtime session (the runtime keeps its own).

ONNX Runtime is an executor here: to run fp32 and QDQ graphs, read intermediate tensors, probe
shapes and optimize offline; never for its quantization tooling.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgeopt.converters.graph.shapes import with_outputs
from edgeopt.runtime.backends.onnxruntime import DISABLED_OPTIMIZERS

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["has_qdq", "ort_session", "run_model"]

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the graph carries QuantizeLinear/DequantizeLinear (quantized by edgeopt, or exported from QAT)."""
    return any(n.op_type in _QDQ_OPS for n in model.graph.node)


def ort_session(
    model: onnx.ModelProto | Path,
    *,
    threads: int = 0,
    graph_semantics: bool = True,
    optimized_model_path: Path | None = None,
    log_severity: int = 3,
    spin: bool = False,
    optimizations: bool = True,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session.

    With `graph_semantics` (the default) a graph with Q/DQ runs with graph optimizations off, so
    every DequantizeLinear -> op -> QuantizeLinear is evaluated in float exactly as the QDQ graph
    defines it. With optimizations on, ONNX Runtime fuses them into int8 kernels whose results
    depend on the CPU (x86 without VNNI saturates int16 pair sums); the quantizer's measurements
    and every int8 parity check need the graph's own semantics, and the backends' kernels are what
    gets checked against it. `optimized_model_path` saves the basic-optimized graph (offline
    optimization for the onnxruntime-cpu target) and implies `graph_semantics=False`; a model
    given as a path is loaded as it is, with ONNX Runtime's default optimizations.

    ONNX Runtime's intra-op threads busy-wait for work by default; here they sleep unless `spin`
    (for latency measurements): a converter runs a session on a few samples and drops it, and
    tearing down a spinning pool costs ~35 ms of CPU per session (measured: 100 sessions, 3.7 CPU s
    against 0.01 s), which was a quarter of an `--effort default` build's quantize stage.

    `optimizations=False` runs any graph unfused and in its own order: beside the default session it shows
    how far the model's outputs move with kernels and summation order alone (fp32 parity's allowance).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized_model_path)
    elif not optimizations or (graph_semantics and not isinstance(model, Path) and has_qdq(model)):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))


def run_model(
    model: onnx.ModelProto,
    samples: Iterable[Mapping[str, np.ndarray]],
    outputs: Sequence[str] | None = None,
    *,
    threads: int = 0,
    optimizations: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Run the model on each sample and yield {output name: array}; `outputs` adds intermediate tensors."""
    if outputs:
        model = with_outputs(model, outputs)
    runner = ort_session(model, threads=threads, optimizations=optimizations)
    names = [o.name for o in runner.get_outputs()]
    input_names = [i.name for i in runner.get_inputs()]
    for sample in samples:
        values = runner.run(names, {name: sample[name] for name in input_names})
        yield dict(zip(names, values))
