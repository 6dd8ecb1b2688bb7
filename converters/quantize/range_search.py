"""Range selection by output error: per tensor, the clipping that hurts the consumer's output least.

One calibration pass with histogram observers gives every activation tensor its candidate ranges:
min-max, a few percentiles, entropy (KL) and MSE. A tensor's own quantization error is the wrong
judge (clipping a rare outlier can be cheap for the tensor and ruinous for the layer that reads it,
or the reverse), so each candidate is judged by what it does to the consumers: the tensor is
fake-quantized with the candidate's scale and zero point, each consumer node runs alone in ONNX
Runtime (its weights int8 as the scheme says, its other inputs fp32) on held-out calibration
samples, and the candidate with the lowest output MSE against the fp32 consumer (relative to the
output's energy, summed over consumers) wins. Tensors that must share one scale (a scale group)
are chosen together; a tensor that is a graph output is its own consumer.

A consumer cannot see what a clipped value means further down (on ppocr_cls, clipping the stem's
rare large values by 4% looks better at the next node and costs 10 dB at the model output), so the
per-tensor plan is then judged against the uniform plans (one method everywhere) by the whole QDQ
model's output error on the same held-out samples, and the best plan is kept. "auto" is therefore
never worse than the best single method on those samples.

Captures are streamed one sample at a time, so memory is one forward pass's activations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeopt.converters.data import Dataset
from edgeopt.converters.graph.session import ort_session, run_model
from edgeopt.converters.graph.shapes import tensor_types, with_outputs
from edgeopt.converters.quantize.observers import HistogramObserver, Observer
from edgeopt.converters.quantize.placement import DATA_MOVEMENT_OPS, QuantPlan
from edgeopt.converters.quantize.qdq import QParams, activation_params, group_format, group_params, insert_qdq, quantize_weight, qrange
from edgeopt.targets import QuantScheme

__all__ = ["FALLBACK", "UNIFORM_PLANS", "RangeSearchOptions", "RangeSearchReport", "RangeSearch", "choose_ranges", "split_samples"]

log = logging.getLogger(__name__)

#: The candidate a group gets when no consumer can be measured (only value-independent or
#: un-runnable consumers): the baseline's range, never a guess at clipping.
FALLBACK = "minmax"
#: Consumers whose output does not depend on the values read.
VALUE_INDEPENDENT_OPS = frozenset({"Shape", "Size"})
#: Uniform plans (one method for every tensor) the per-tensor plan is judged against at the model output.
UNIFORM_PLANS = ("minmax", "percentile_99.99", "entropy", "mse")
#: Plans are judged in rounds of this many held-out samples; after a round, plans whose output error is
#: over JUDGE_MARGIN times the best's are dropped (the best needs all samples; a bad plan shows early).
JUDGE_ROUND = 8
JUDGE_MARGIN = 1.5
#: How many groups the report lists with their errors (those with the largest min-max error).
REPORTED_WORST = 5

Adjust = Callable[[str, tuple[float, float]], tuple[float, float]]


@dataclass(frozen=True)
class RangeSearchOptions:
    """`samples`: calibration samples held out from the histograms, on which the plans are judged at
    the model output; the consumer errors use the first `consumer_samples` of them (each is summed
    over a whole tensor, so fewer suffice; they are most of the search's time). `percentiles`: the
    percentile candidates. `threads`: ONNX Runtime intra-op threads (0: its default)."""

    samples: int = 32
    consumer_samples: int = 8
    percentiles: tuple[float, ...] = (99.9, 99.99, 99.999)
    threads: int = 0


class WorstGroup(TypedDict):
    tensors: list[str]
    method: str
    error_minmax: float
    error_chosen: float


class RangeSearchReport(TypedDict):
    """What the search chose (JSON-able). `error_*` are consumer-output MSE over output energy, summed
    over consumers and over the groups of the plan; `output_error` is each judged plan's model-output
    MSE over output energy on the held-out samples, and `plan` the one kept."""

    candidates: list[str]
    plan: str  # "per_tensor", or the uniform method that did better at the model output
    output_error: dict[str, float]
    fallback: str
    chosen: dict[str, int]  # candidate -> activation tensors that use its range
    fallback_tensors: list[str]
    groups: int
    samples: int  # held-out samples the plans were judged on
    consumer_samples: int  # of which the consumer errors used
    range_samples: int  # samples the histograms saw
    error_minmax: float
    error_chosen: float
    error_reduction: float  # 1 - chosen / minmax
    worst: list[WorstGroup]
    seconds: float


@dataclass(frozen=True)
class _Choice:
    method: str  # the candidate with the lowest consumer error
    ranges: dict[str, tuple[float, float]]  # candidate -> the group's range
    errors: dict[str, float] | None  # candidate -> consumer error; None: not measured
    fallback: bool = False  # no consumer could be measured


def _ranges_key(ranges: Mapping[str, tuple]) -> tuple:
    """A hashable form of a plan's ranges (per-channel sites hold arrays)."""
    return tuple(sorted((name, tuple(np.ravel(low).tolist()), tuple(np.ravel(high).tolist())) for name, (low, high) in ranges.items()))


def split_samples(dataset: Dataset, samples: int) -> tuple[Dataset, Dataset]:
    """(histogram samples, held-out samples): the last `samples` (at most half) are held out; a set
    of one sample is used for both."""
    held = min(samples, len(dataset) // 2)
    if held == 0:
        return dataset, dataset
    return dataset.take(len(dataset) - held), dataset.skip(len(dataset) - held)


def candidate_names(options: RangeSearchOptions) -> list[str]:
    return ["minmax", *(f"percentile_{p:g}" for p in options.percentiles), "entropy", "mse"]


def _candidate_range(observer: Observer, name: str, symmetric: bool) -> tuple[float, float]:
    if not isinstance(observer, HistogramObserver):
        return observer.range(symmetric)
    if name.startswith("percentile_"):
        return observer.range_by("percentile", symmetric, float(name.split("_", 1)[1]))
    return observer.range_by(name, symmetric)


def _fake_quantize(values: np.ndarray, params: QParams) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear, as ONNX Runtime computes them in float32."""
    qmin, qmax = qrange(params.dtype)
    scale = np.float32(params.scale)
    quantized = np.rint(values / scale)
    quantized += params.zero_point
    np.clip(quantized, qmin, qmax, out=quantized)
    quantized -= params.zero_point
    quantized *= scale
    return quantized


def _energy(values: np.ndarray) -> float:
    flat = values.ravel()
    with np.errstate(over="ignore"):
        energy = float(np.dot(flat, flat))
    if not math.isfinite(energy):  # e.g. an attention mask at the float32 minimum: square in float64
        flat = flat.astype(np.float64)
        energy = float(np.dot(flat, flat))
    return energy


SCALE, ZERO_POINT = "scale", "zero_point"


class _Consumer:
    """One node of the fp32 model as a piece of the consumers graph, on captured fp32 inputs: the
    inputs of the group being judged pass through QuantizeLinear/DequantizeLinear with the
    candidate's scale and zero point (fed as inputs), weights are fake-quantized as the plan says,
    and the piece outputs each float output's squared error against the captured fp32 output (so
    only scalars cross into Python). Its own names start with `prefix`, so pieces of many
    consumers (the same node read through two groups, too) live in one graph."""

    def __init__(self, prefix: str, node: onnx.NodeProto, quantized: frozenset[str], initializers: Mapping[str, onnx.TensorProto], plan: QuantPlan, scheme: QuantScheme, types: Mapping[str, int]) -> None:
        weights = {(w.node, w.initializer): w for w in plan.weights}
        constants = {(c[0], c[2]) for c in plan.constants}
        zero_point_type = helper.np_dtype_to_tensor_dtype(np.dtype(group_format(plan, quantized, scheme)[0]))
        self.node = node.name
        self.scale, self.zero_point = f"{prefix}{SCALE}", f"{prefix}{ZERO_POINT}"
        self.graph_inputs = [helper.make_tensor_value_info(self.scale, onnx.TensorProto.FLOAT, []), helper.make_tensor_value_info(self.zero_point, zero_point_type, [])]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        renamed: dict[str, str] = {}
        self.inputs: list[str] = []  # captured fp32 tensors it reads (shared by every piece)
        for name in dict.fromkeys(i for i in node.input if i):
            if name in initializers:
                renamed[name] = f"{prefix}{name}"
                self.initializers.append(numpy_helper.from_array(_stored_weight(node.name, name, initializers[name], weights, constants, scheme), renamed[name]))
                continue
            self.inputs.append(name)
            self.graph_inputs.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
            if name in quantized:
                renamed[name] = f"{prefix}{name}__fake_quantized"
                self.nodes.append(helper.make_node("QuantizeLinear", [name, self.scale, self.zero_point], [f"{prefix}{name}__quantized"]))
                self.nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}{name}__quantized", self.scale, self.zero_point], [renamed[name]]))
        consumer = onnx.NodeProto()
        consumer.CopyFrom(node)
        consumer.name = f"{prefix}{node.name}"
        consumer.input[:] = [renamed.get(i, i) for i in node.input]
        consumer.output[:] = [f"{prefix}{o}" if o else o for o in node.output]
        self.nodes.append(consumer)
        self.outputs = [o for o in node.output if o and types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
        if not self.outputs:
            raise ValueError(f"{node.name} has no float32 output")
        self.sse_names = []
        for output in self.outputs:
            self.graph_inputs.append(helper.make_tensor_value_info(f"{output}__reference", onnx.TensorProto.FLOAT, None))
            self.nodes.append(helper.make_node("Sub", [f"{prefix}{output}", f"{output}__reference"], [f"{prefix}{output}__error"]))
            self.nodes.append(helper.make_node("ReduceSumSquare", [f"{prefix}{output}__error"], [f"{prefix}{output}__sse"], keepdims=0))
            self.sse_names.append(f"{prefix}{output}__sse")
        self.feeds = {**{name: name for name in self.inputs}, **{f"{o}__reference": o for o in self.outputs}}  # graph input -> captured tensor


class _ConsumersGraph:
    """Every consumer of a search in one ONNX Runtime session: one run per sample and candidate
    measures all groups at once (a session and a run per consumer and candidate cost ppocr_cls 133
    sessions and ~6,000 runs). A piece's output depends only on its own inputs, so each error is
    what the piece computes alone."""

    def __init__(self, consumers: list[_Consumer], model: onnx.ModelProto, threads: int) -> None:
        inputs = {i.name: i for c in consumers for i in c.graph_inputs}
        graph = helper.make_graph(
            [n for c in consumers for n in c.nodes],
            "range_search_consumers",
            list(inputs.values()),
            [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for c in consumers for name in c.sse_names],
            [i for c in consumers for i in c.initializers],
        )
        single = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        self.consumers = consumers
        self.session = ort_session(single, threads=threads)
        self.sse_names = [name for c in consumers for name in c.sse_names]
        self.feeds = {name: tensor for c in consumers for name, tensor in c.feeds.items()}

    def squared_errors(self, values: Mapping[str, np.ndarray], params: Sequence[QParams]) -> list[float]:
        """Each consumer's output SSE with its quantized inputs at `params[i]`."""
        feed = {name: values[tensor] for name, tensor in self.feeds.items()}
        for consumer, p in zip(self.consumers, params):
            feed[consumer.scale] = np.array(p.scale, np.float32)
            feed[consumer.zero_point] = np.array(p.zero_point, np.dtype(p.dtype))
        sse = dict(zip(self.sse_names, self.session.run(self.sse_names, feed)))
        return [float(sum(float(sse[name]) for name in c.sse_names)) for c in self.consumers]


def _stored_weight(node: str, name: str, tensor: onnx.TensorProto, weights: Mapping, constants: set, scheme: QuantScheme) -> np.ndarray:
    """An initializer as the QDQ model computes with it: dequantized int8 when the plan quantizes it."""
    array = numpy_helper.to_array(tensor)
    site = weights.get((node, name))
    if site is not None:
        q, scale, zero_point = quantize_weight(array, site.axis, scheme.weight_dtype, scheme.weight_symmetric, site.bits)
        shape = [1] * array.ndim
        if site.axis is not None:
            shape[site.axis] = -1
        return ((q.astype(np.float32) - zero_point.reshape(shape)) * scale.reshape(shape)).astype(array.dtype)
    if (node, name) in constants:
        q, scale, zero_point = quantize_weight(array, None, scheme.weight_dtype, scheme.weight_symmetric)
        return ((q.astype(np.float32) - zero_point) * scale).astype(array.dtype)
    return array


def _score_tensors(model: onnx.ModelProto) -> set[str]:
    """Inputs and outputs of the Sigmoid/Softmax nodes whose outputs reach a graph output through data
    movement only, and the tensors on that way: a classifier's or detector's scores and their logits.
    Their rare high values are the detections and the top classes; an error summed over all values (most
    of them background) prefers to clip exactly those: on yolov8n_nudenet (OpenVINO) a searched range
    capped every class score at 0.16 (fp32 up to 0.83) and box F1 fell from 0.77 to 0, while the output
    SQNR, ruled by the box coordinates, rose by 2.98 dB."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def way_out(tensor: str) -> list[str] | None:
        """The tensors from `tensor` to a graph output through data movement only; None if there is no such way."""
        users = readers.get(tensor, [])
        if tensor in outputs and not users:
            return [tensor]
        if not users or not all(user.op_type in DATA_MOVEMENT_OPS for user in users):
            return [tensor] if tensor in outputs else None
        ways = [way_out(out) for user in users for out in user.output]
        return None if any(way is None for way in ways) else [tensor, *(t for way in ways for t in way)]

    scores: set[str] = set()
    for node in model.graph.node:
        way = way_out(node.output[0]) if node.op_type in ("Sigmoid", "Softmax") else None
        if way is not None:
            scores |= {node.input[0], *way}
    return scores


class RangeSearch:
    """Chooses each scale group's range once (per group and consumer set) and remembers it, so a
    quantizer that rebuilds for other exclusions only measures the groups that changed."""

    def __init__(self, model: onnx.ModelProto, held_out: Dataset, scheme: QuantScheme, options: RangeSearchOptions = RangeSearchOptions()) -> None:
        self.model = model
        self.held_out = held_out
        self.scheme = scheme
        self.options = options
        self._choices: dict[tuple[frozenset[str], frozenset[str]], _Choice] = {}
        self._types: dict[str, int] | None = None
        self._seconds = 0.0  # spent choosing, over every call
        self._plans: dict[frozenset, tuple[str, dict[str, float]]] = {}
        self._reference: list[dict[str, np.ndarray]] | None = None
        self._kept = "per_tensor"  # the plan the last `choose` kept: `refit` follows it

    def choose(self, plan: QuantPlan, observers: Mapping[str, Observer], adjust: Adjust | None = None, range_samples: int = 0) -> tuple[dict[str, tuple[float, float]], RangeSearchReport]:
        start = time.perf_counter()
        adjust = adjust or (lambda _name, r: r)
        keyed = self._keyed(plan)
        pending = {key: members for key, members in keyed.items() if key not in self._choices}
        if pending:
            self._measure(plan, pending, observers, adjust)
        fixed = self._fixed(plan, observers, adjust)
        per_tensor = {key: self._choices[key].method for key in keyed}
        plans = {"per_tensor": per_tensor, **{name: {key: name for key in keyed} for name in UNIFORM_PLANS}}
        plan_key = frozenset(keyed)
        if plan_key not in self._plans:
            self._plans[plan_key] = self._judge(plan, {name: self._ranges(keyed, methods, fixed) for name, methods in plans.items()})
        kept, output_error = self._plans[plan_key]
        self._kept = kept
        self._seconds += time.perf_counter() - start
        report = self._report(keyed, plans[kept], range_samples, self._seconds)
        report["plan"], report["output_error"] = kept, output_error
        return self._ranges(keyed, plans[kept], fixed), report

    def refit(self, plan: QuantPlan, observers: Mapping[str, Observer], adjust: Adjust | None = None) -> dict[str, tuple[float, float]]:
        """The ranges of `plan` by the methods already chosen, computed from `observers` that saw more
        samples than the choice did: the choice of method is the search's, the range is all the data's.
        A group never chosen (another exclusion split it) gets the kept plan's method, or FALLBACK."""
        adjust = adjust or (lambda _name, r: r)
        ranges = self._fixed(plan, observers, adjust)
        for key, members in self._keyed(plan).items():
            chosen = self._choices[key].method if key in self._choices else FALLBACK
            method = chosen if self._kept == "per_tensor" else self._kept
            _, symmetric = group_format(plan, members, self.scheme)
            spans = [adjust(m, _candidate_range(observers[m], method, symmetric)) for m in members]
            ranges.update(dict.fromkeys(members, (min(s[0] for s in spans), max(s[1] for s in spans))))
        return ranges

    def _keyed(self, plan: QuantPlan) -> dict[tuple[frozenset[str], frozenset[str]], list[str]]:
        """The groups whose range is chosen, keyed by (members, readers): a group read by other nodes
        (after another exclusion) is chosen again."""
        consumers_of = self._consumers_of()
        outputs = {o.name for o in self.model.graph.output}
        keyed = {}
        scores = _score_tensors(self.model)
        for members in plan.groups().values():
            if any(plan.sites[m].fixed is not None or plan.sites[m].axis is not None for m in members):
                continue  # a fixed scale (e.g. TFLite's softmax output) or per-channel min-max: nothing to choose
            if scores.intersection(members):
                continue  # an output score or its logits keep their calibrated range (see _score_tensors)
            readers: set[str] = set()
            for member in members:
                site = plan.sites[member]
                readers |= set(consumers_of.get(member, ())) if site.consumers is None else set(site.consumers)
                if member in outputs:
                    readers.add(f"output:{member}")
            keyed[(frozenset(members), frozenset(readers))] = members
        return keyed

    def _fixed(self, plan: QuantPlan, observers: Mapping[str, Observer], adjust: Adjust) -> dict[str, tuple[float, float]]:
        """Every site's calibrated range: what fixed groups (their scale is set by the rule), per-channel
        sites and output scores keep; chosen groups overwrite theirs."""
        return {m: adjust(m, observers[m].range(self.scheme.activation_symmetric)) for members in plan.groups().values() for m in members}

    def _ranges(self, keyed: Mapping[tuple, list[str]], methods: Mapping[tuple, str], fixed: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        ranges = dict(fixed)
        for key, members in keyed.items():
            ranges.update({m: self._choices[key].ranges[methods[key]] for m in members})
        return ranges

    def _judge(self, plan: QuantPlan, candidates: Mapping[str, dict[str, tuple[float, float]]]) -> tuple[str, dict[str, float]]:
        """(kept plan, model-output error of each plan judged): a consumer's error cannot see what a
        rare large value means ten layers later (measured: the stem of ppocr_cls), so the per-tensor
        plan is kept only if the whole QDQ model agrees on the held-out samples.

        The plans run in rounds of `JUDGE_ROUND` samples; after each round a plan whose error is over
        `JUDGE_MARGIN` times the best's stops running (its error is extrapolated from the samples it
        ran on): a full QDQ model run per plan and sample was half of the search's time."""
        if self._reference is None:
            self._reference = list(run_model(self.model, self.held_out, threads=self.options.threads))
        total = len(self._reference)
        energy = {name: sum(_energy(r[name]) for r in self._reference) for name in self._reference[0]}
        distinct: dict[tuple, list[str]] = {}
        for name, ranges in candidates.items():
            distinct.setdefault(_ranges_key(ranges), []).append(name)
        runners = {}
        for key, names in distinct.items():
            qdq = insert_qdq(self.model, plan, group_params(plan, candidates[names[0]], self.scheme), self.scheme)
            runners[key] = ort_session(qdq, threads=self.options.threads)
        feed_names = [i.name for i in next(iter(runners.values())).get_inputs()]
        error = dict.fromkeys(runners, 0.0)
        ran = dict.fromkeys(runners, 0)
        alive = list(runners)
        for start in range(0, total, JUDGE_ROUND):
            samples = self.held_out.skip(start).take(JUDGE_ROUND)
            for key in alive:
                runner = runners[key]
                names = [o.name for o in runner.get_outputs()]
                for sample, want in zip(samples, self._reference[start:]):
                    got = dict(zip(names, runner.run(names, {n: sample[n] for n in feed_names})))
                    error[key] += sum(_energy(got[o] - want[o]) / max(energy[o], 1e-30) for o in want if want[o].dtype.kind == "f")
                    ran[key] += 1
            best = min(error[key] / ran[key] for key in alive)
            alive = [key for key in alive if error[key] / ran[key] <= JUDGE_MARGIN * best]
            if len(alive) == 1:
                break
        errors = {name: error[key] * total / ran[key] for key, names in distinct.items() for name in names}
        kept = min(errors, key=lambda name: (errors[name], list(candidates).index(name)))
        return kept, errors

    # -- measurement ------------------------------------------------------------------------------------------

    def _consumers_of(self) -> dict[str, list[str]]:
        readers: dict[str, list[str]] = {}
        for node in self.model.graph.node:
            for name in dict.fromkeys(node.input):
                readers.setdefault(name, []).append(node.name)
        return readers

    def _candidates(self, plan: QuantPlan, members: list[str], observers: Mapping[str, Observer], adjust: Adjust) -> dict[str, tuple[QParams, tuple[float, float]]]:
        """Each candidate's group range (union of the members', clipped as group_params clips) and
        its QParams."""
        dtype, symmetric = group_format(plan, members, self.scheme)
        clips = [plan.sites[m].clip for m in members if plan.sites[m].clip is not None]
        found: dict[str, tuple[QParams, tuple[float, float]]] = {}
        for name in candidate_names(self.options):
            spans = [adjust(m, _candidate_range(observers[m], name, symmetric)) for m in members]
            low, high = min(s[0] for s in spans), max(s[1] for s in spans)
            q_low, q_high = (0.0, min(high, min(c[1] for c in clips))) if clips else (low, high)
            found[name] = (activation_params(q_low, q_high, dtype, symmetric), (low, high))
        return found

    def _measure(self, plan: QuantPlan, pending: Mapping[tuple[frozenset[str], frozenset[str]], list[str]], observers: Mapping[str, Observer], adjust: Adjust) -> None:
        nodes = {n.name: n for n in self.model.graph.node}
        initializers = {i.name: i for i in self.model.graph.initializer}
        if self._types is None:
            self._types = tensor_types(self.model)
        candidates = {key: self._candidates(plan, members, observers, adjust) for key, members in pending.items()}
        consumers: dict[tuple[str, frozenset[str]], _Consumer | None] = {}
        measured: dict[tuple, list[str | _Consumer]] = {}  # group -> graph outputs among its members, consumers
        for key, found in candidates.items():
            if len({(params.scale, params.zero_point) for params, _ in found.values()}) == 1:
                continue
            members = set(pending[key])
            readers: list[str | _Consumer] = []
            for reader in sorted(key[1]):
                if reader.startswith("output:"):
                    readers.append(reader.split(":", 1)[1])
                    continue
                node = nodes.get(reader)
                if node is None or node.op_type in VALUE_INDEPENDENT_OPS:
                    continue
                reading = (reader, frozenset(members & set(node.input)))
                if reading not in consumers:
                    consumers[reading] = self._consumer(f"c{len(consumers)}/", node, reading[1], initializers, plan)
                if consumers[reading] is not None:
                    readers.append(consumers[reading])
            if readers:
                measured[key] = readers
        graph = self._consumers_graph([c for c in consumers.values() if c is not None])
        runnable = set(map(id, graph.consumers)) if graph is not None else set()
        measured = {key: kept for key, readers in measured.items() if (kept := [r for r in readers if isinstance(r, str) or id(r) in runnable])}
        errors = self._errors(pending, candidates, measured, graph)
        for key, members in pending.items():
            found = candidates[key]
            ranges = {name: span for name, (_, span) in found.items()}
            if key in errors:
                error = errors[key]
                method = min(found, key=lambda name: (error[name], list(found).index(name)))
                self._choices[key] = _Choice(method, ranges, error)
            else:  # every candidate quantizes alike, or no reader could be measured
                distinct = len({(params.scale, params.zero_point) for params, _ in found.values()}) > 1
                self._choices[key] = _Choice(FALLBACK, ranges, None, fallback=distinct)

    def _consumer(self, prefix: str, node: onnx.NodeProto, quantized: frozenset[str], initializers: Mapping[str, onnx.TensorProto], plan: QuantPlan) -> _Consumer | None:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        try:
            return _Consumer(prefix, node, quantized, initializers, plan, self.scheme, self._types or {})
        except Exception as error:  # noqa: BLE001 - a consumer that cannot be cut out is not measured; its group falls back
            log.debug("range search: %s (%s) is not measured: %s", node.name, node.op_type, error)
            return None

    def _consumers_graph(self, consumers: list[_Consumer]) -> _ConsumersGraph | None:
        """One session for all consumers; when ONNX Runtime refuses it, each consumer is tried alone
        and those it cannot run alone are left out (their groups fall back)."""
        if not consumers:
            return None
        try:
            return _ConsumersGraph(consumers, self.model, self.options.threads)
        except Exception:  # noqa: BLE001 - an op ONNX Runtime cannot run alone: find which
            runnable = []
            for consumer in consumers:
                try:
                    _ConsumersGraph([consumer], self.model, self.options.threads)
                except Exception as error:  # noqa: BLE001
                    log.debug("range search: %s cannot run alone: %s", consumer.node, error)
                    continue
                runnable.append(consumer)
            try:
                return _ConsumersGraph(runnable, self.model, self.options.threads) if runnable else None
            except Exception as error:  # noqa: BLE001 - pieces that run alone clash together: every group falls back
                log.debug("range search: the consumers cannot run in one session: %s", error)
                return None

    def _errors(
        self,
        pending: Mapping[tuple, list[str]],
        candidates: Mapping[tuple, Mapping[str, tuple[QParams, tuple[float, float]]]],
        measured: Mapping[tuple, list[str | _Consumer]],
        graph: _ConsumersGraph | None,
    ) -> dict[tuple, dict[str, float]]:
        """Per measured group, per candidate: the sum over its readers of output SSE / output energy."""
        if not measured:
            return {}
        needed: set[str] = set()
        for key, readers in measured.items():
            needed |= set(pending[key])
            for reader in readers:
                if isinstance(reader, _Consumer):
                    needed |= set(reader.inputs) | set(reader.outputs)
        feeds = {i.name for i in self.model.graph.input} | {i.name for i in self.model.graph.initializer}
        wanted = sorted(needed - feeds)
        runner = ort_session(with_outputs(self.model, wanted, self._types), threads=self.options.threads)
        feed_names = [i.name for i in runner.get_inputs()]
        group_of = {id(r): key for key, readers in measured.items() for r in readers if isinstance(r, _Consumer)}
        consumers = graph.consumers if graph is not None else []
        names = candidate_names(self.options)  # every group's candidates, in this order
        sse = {key: {name: [0.0] * len(readers) for name in candidates[key]} for key, readers in measured.items()}
        energy = {key: [0.0] * len(readers) for key, readers in measured.items()}
        for sample in self.held_out.take(self.options.consumer_samples):
            values = dict(zip(wanted, runner.run(wanted, {n: sample[n] for n in feed_names})))
            values.update({n: sample[n] for n in feed_names})
            consumer_sse = {}  # candidate -> id(consumer) -> SSE: every group's candidate in one run
            if graph is not None:
                for name in names:
                    errors = graph.squared_errors(values, [candidates[group_of[id(c)]][name][0] for c in consumers])
                    consumer_sse[name] = {id(c): e for c, e in zip(consumers, errors)}
            for key, readers in measured.items():
                for index, reader in enumerate(readers):
                    outputs = reader.outputs if isinstance(reader, _Consumer) else [reader]
                    energy[key][index] += sum(_energy(values[o]) for o in outputs)
                own: dict[tuple[float, int], dict[str, float]] = {}  # a graph output's own error, once per QParams
                for name, (params, _) in candidates[key].items():
                    for index, reader in enumerate(readers):
                        if isinstance(reader, _Consumer):
                            sse[key][name][index] += consumer_sse[name][id(reader)]
                            continue
                        cached = own.setdefault((params.scale, params.zero_point), {})
                        if reader not in cached:
                            cached[reader] = _energy(_fake_quantize(values[reader], params) - values[reader])
                        sse[key][name][index] += cached[reader]
        return {
            key: {name: sum(e / max(energy[key][i], 1e-30) for i, e in enumerate(per)) for name, per in by_name.items()}
            for key, by_name in sse.items()
        }

    # -- report ---------------------------------------------------------------------------------------------

    def _report(self, keyed: Mapping[tuple, list[str]], methods: Mapping[tuple, str], range_samples: int, seconds: float) -> RangeSearchReport:
        counts: dict[str, int] = {}
        fallback: list[str] = []
        total_minmax = total_chosen = 0.0
        rows: list[WorstGroup] = []
        for key, members in keyed.items():
            choice, method = self._choices[key], methods[key]
            counts[method] = counts.get(method, 0) + len(members)
            if choice.fallback:
                fallback.extend(members)
            if choice.errors is None:
                continue
            total_minmax += choice.errors["minmax"]
            total_chosen += choice.errors[method]
            rows.append({"tensors": sorted(members), "method": method, "error_minmax": choice.errors["minmax"], "error_chosen": choice.errors[method]})
        rows.sort(key=lambda row: -row["error_minmax"])
        return {
            "candidates": candidate_names(self.options),
            "plan": "per_tensor",
            "output_error": {},
            "fallback": FALLBACK,
            "chosen": dict(sorted(counts.items())),
            "fallback_tensors": sorted(fallback),
            "groups": len(keyed),
            "samples": len(self.held_out),
            "consumer_samples": min(self.options.consumer_samples, len(self.held_out)),
            "range_samples": range_samples,
            "error_minmax": total_minmax,
            "error_chosen": total_chosen,
            "error_reduction": 1.0 - total_chosen / total_minmax if total_minmax > 0 else 0.0,
            "worst": rows[:REPORTED_WORST],
            "seconds": round(seconds, 3),
        }


def choose_ranges(
    model: onnx.ModelProto,
    held_out: Dataset,
    plan: QuantPlan,
    scheme: QuantScheme,
    observers: Mapping[str, Observer],
    options: RangeSearchOptions = RangeSearchOptions(),
    adjust: Adjust | None = None,
    range_samples: int = 0,
) -> tuple[dict[str, tuple[float, float]], RangeSearchReport]:
    """(range per activation site, report): each scale group's candidate with the lowest consumer-
    output error on `held_out`. `observers` are histograms of the sites (calibrate(method="auto"));
    `adjust(tensor, range)` limits a member's candidate range before the group's union (e.g. a
    Softmax input's span); `range_samples`: how many samples the observers saw, for the report."""
    return RangeSearch(model, held_out, scheme, options).choose(plan, observers, adjust, range_samples)
