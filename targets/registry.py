"""Typed, frozen device profiles loaded from the TOML files beside this module.

Nothing reads a profile from a global: callers get a `Target` from `get_target` and pass it down.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from edgeopt.runtime.errors import EdgeoptError
from edgeopt.runtime.isa import IsaClass
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision

__all__ = [
    "ArtifactFormat",
    "Fact",
    "IsaClass",
    "OpRule",
    "OptionValue",
    "ProfileError",
    "QuantScheme",
    "Target",
    "UnknownTargetError",
    "UnsupportedIsaError",
    "all_targets",
    "get_target",
]

_PROFILE_DIR = Path(__file__).parent


#: A value of a profile's [options] table: the backend's own settings (TensorRT's workspace, OpenVINO's device).
OptionValue = Union[str, int, float, bool]


class ProfileError(EdgeoptError):
    """A profile file that does not describe a target (a broken edgeopt install or a hand-edited profile)."""


class UnknownTargetError(EdgeoptError):
    """No profile has this name or alias."""


class UnsupportedIsaError(EdgeoptError):
    """A CPU class the target does not distinguish (or a target whose int8 does not depend on the CPU)."""


@dataclass(frozen=True)
class Fact:
    """A hardware figure with where it comes from."""

    name: str
    value: float | int | str
    unit: str
    source: str


@dataclass(frozen=True)
class OpRule:
    """A fixed quantization rule a target imposes on an op's output (e.g. TFLite softmax 1/256, -128)."""

    op: str
    output_scale: float | None = None
    output_zero_point: int | None = None
    same_scale_as_input: bool = False


@dataclass(frozen=True)
class QuantScheme:
    """How a target runs int8; the quantizer emits QDQ that follows it exactly."""

    weight_dtype: str = "int8"
    weight_symmetric: bool = True
    weight_per_channel: bool = True
    activation_dtype: str = "int8"
    activation_symmetric: bool = False
    quantized_ops: tuple[str, ...] = ()
    op_rules: tuple[OpRule, ...] = ()
    bias_int32: bool = True
    notes: str = ""
    # "inputs": Q/DQ on the activation inputs of quantized ops (TensorRT, OpenVINO fuse them);
    # "inputs_and_outputs": on every tensor between quantized ops (TFLite full-integer, ONNX Runtime QDQ).
    activation_placement: str = "inputs"
    # Activations after a quantized op that its output quantization replaces (exact with zero point at the bottom).
    fused_activations: tuple[str, ...] = ("Relu", "Clip")
    # Quantized ops whose output stays float under "inputs_and_outputs" (e.g. ONNX Runtime's MatMulIntegerToFloat).
    float_output_ops: tuple[str, ...] = ()
    # Under "inputs_and_outputs": quantize float initializer operands of Add/Sub/Mul per tensor (TFLite int8 constants).
    constant_operands: bool = False
    # Bits of the weights of ops whose int8 kernels sum products pairwise (non-depthwise Conv, Gemm,
    # MatMul). 7 keeps them within [-64, 64] so AVX2's saturating int16 pair sums stay exact.
    pairwise_weight_bits: int = 8
    # A Conv whose only consumer is an activation the backend runs in float (HardSwish on ONNX Runtime
    # and LiteRT) pays a dequantize/quantize island for its int8; when the conv is depthwise or its
    # output has at least this many elements per channel, the island costs more than int8 saves and
    # the conv stays float (0: never). Measured in docs/design.md ("int8 never slower than fp32").
    float_island_min_spatial: int = 0
    # Every depthwise Conv stays float: the backend's int8 depthwise kernel is slower than its float
    # one (ONNX Runtime on x86: QLinearConv's NHWC indirection-buffer kernel against MLAS's NCHWc
    # float kernel, 2.4-4x slower per conv here; bench/results/int8_latency.md).
    float_depthwise: bool = False
    # The Sigmoid and Mul of each SiLU (x * Sigmoid(x)) are quantized even where the scheme leaves
    # Sigmoid/Mul float: ONNX Runtime fuses them into QLinearSigmoid/QLinearMul, so the conv-SiLU-conv
    # chain stays int8 instead of paying a dequantize/quantize island per SiLU (yolov8n 0.53x -> 0.48x
    # fp32 here; a classifier's or detector's final Sigmoid, not a gate, stays float).
    int8_silu: bool = False
    # Under "inputs_and_outputs", in a model with attention: what a full-integer backend runs int8 beyond
    # the op list (placement's `int8_transformer_units`): a MatMul's bias Add quantized at its output
    # only (the lowering folds the bias into FULLY_CONNECTED as int32), the erf GELU at its input and
    # output only (one int8 GELU), a decomposed LayerNorm's variance + eps and x^-0.5 (RSQRT).
    int8_transformer: bool = False
    # Under "inputs": a tensor read only by depthwise convs gets one scale and zero point per channel
    # (QuantizeLinear axis=1). A depthwise conv keeps channels apart, so the backend folds the input
    # scales into its per-channel requantization and the kernel stays int8 (OpenVINO's CPU plugin: u8
    # Convolution); channels of a MobileNetV3 HardSwish output differ in range by 10x and more.
    depthwise_input_per_channel: bool = False
    # In a model with attention (a Softmax read by a MatMul), Add/Sub/Mul stay float: the residual
    # stream and LayerNorm's affine carry outlier channels one int8 grid cannot hold, and the backend
    # runs elementwise ops in float anyway (NNCF's model_type=transformer leaves them so).
    transformer_elementwise_float: bool = False
    # Under "inputs": a Mul that completes an activation of its other operand (SiLU x * Sigmoid(x),
    # HardSwish x * HardSigmoid(x) or x * Clip(x + 3, 0, 6) / 6) gets no Q/DQ on its inputs: the backend
    # fuses conv + activation only without a FakeQuantize inside (OpenVINO's CPU plugin; NNCF quantizes
    # the activation's output only).
    activation_muls_float: bool = False
    # Under "inputs": a Split whose outputs only quantized ops read is quantized once, at its input,
    # instead of at each output: OpenVINO's CPU plugin ran each output's FakeQuantize as a float
    # subgraph (yolov8n's C2f blocks: 16 of its 21), NNCF quantizes the Split's input.
    split_input_quantized: bool = False
    # Both activation inputs of a MatMul that multiplies two activations (attention's Q.K^T) get int8
    # symmetric Q/DQ whatever `activation_dtype` says, and the MatMul of the Softmax output by V stays
    # float: OpenVINO's CPU plugin runs the attention block in i8 so (with uint8 asymmetric Q.K^T
    # inputs: an f32 subgraph), as NNCF quantizes its ScaledDotProductAttention (Q and K only).
    attention_matmul_symmetric: bool = False

    def rule_for(self, op_type: str) -> OpRule | None:
        return next((r for r in self.op_rules if r.op == op_type), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight_dtype": self.weight_dtype,
            "weight_symmetric": self.weight_symmetric,
            "weight_per_channel": self.weight_per_channel,
            "activation_dtype": self.activation_dtype,
            "activation_symmetric": self.activation_symmetric,
            "quantized_ops": list(self.quantized_ops),
            "op_rules": [vars(r) for r in self.op_rules],
            "bias_int32": self.bias_int32,
            "notes": self.notes,
            "activation_placement": self.activation_placement,
            "fused_activations": list(self.fused_activations),
            "float_output_ops": list(self.float_output_ops),
            "constant_operands": self.constant_operands,
            "pairwise_weight_bits": self.pairwise_weight_bits,
            "float_island_min_spatial": self.float_island_min_spatial,
            "float_depthwise": self.float_depthwise,
            "int8_silu": self.int8_silu,
            "int8_transformer": self.int8_transformer,
            "depthwise_input_per_channel": self.depthwise_input_per_channel,
            "transformer_elementwise_float": self.transformer_elementwise_float,
            "activation_muls_float": self.activation_muls_float,
            "split_input_quantized": self.split_input_quantized,
            "attention_matmul_symmetric": self.attention_matmul_symmetric,
        }


@dataclass(frozen=True)
class Target:
    """One device family: what it runs, in which format, and how to quantize for it."""

    name: str
    aliases: tuple[str, ...]
    description: str
    backend: BackendName
    artifact_format: ArtifactFormat
    layout: str
    precisions: tuple[Precision, ...]
    default_precision: Precision
    channel_multiple: int
    default_threads: int
    # The ONNX ops the target runs, where the profile has to say it (TensorRT's ONNX parser).
    # None: no hand-kept list. The TFLite and Core ML lowerings' op registries say what they write;
    # ONNX Runtime and OpenVINO read ONNX themselves, so every standard op is theirs.
    supported_ops: frozenset[str] | None
    quant_scheme: QuantScheme
    facts: tuple[Fact, ...]
    runtime_install: str
    options: Mapping[str, OptionValue] = field(default_factory=dict, hash=False, compare=False)
    # CPU classes whose int8 arithmetic changes the scheme; `quant_scheme` is the default class's.
    default_isa: IsaClass | None = None
    isa_schemes: tuple[tuple[IsaClass, QuantScheme], ...] = ()

    @property
    def isa_classes(self) -> tuple[IsaClass, ...]:
        return tuple(isa for isa, _ in self.isa_schemes)

    def resolve_isa(self, isa: IsaClass | str | None) -> IsaClass | None:
        """The class a build is for: the one asked for, else the profile's default (None: not ISA-dependent)."""
        if isa is None:
            return self.default_isa
        wanted = IsaClass(isa) if isinstance(isa, str) and isa in {c.value for c in IsaClass} else isa
        if wanted not in self.isa_classes:
            choices = ", ".join(c.value for c in self.isa_classes) or "none: its int8 does not depend on the CPU"
            raise UnsupportedIsaError(
                f"target '{self.name}' has no CPU class '{isa}' (choices: {choices})",
                hint="omit --isa for the profile's default, or pick one of the listed classes",
            )
        return wanted

    def scheme_for(self, isa: IsaClass | str | None = None) -> QuantScheme:
        """The quantization scheme for a CPU class (the default class's when None)."""
        resolved = self.resolve_isa(isa)
        return dict(self.isa_schemes).get(resolved, self.quant_scheme) if resolved is not None else self.quant_scheme

    def supports(self, op_type: str) -> bool:
        """Whether the profile's own list admits this ONNX op (no list: the profile does not restrict it)."""
        return self.supported_ops is None or op_type in self.supported_ops

    def fact(self, name: str) -> Fact | None:
        return next((f for f in self.facts if f.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "description": self.description,
            "backend": self.backend.value,
            "artifact_format": self.artifact_format.value,
            "layout": self.layout,
            "precisions": [p.value for p in self.precisions],
            "default_precision": self.default_precision.value,
            "channel_multiple": self.channel_multiple,
            "default_threads": self.default_threads,
            "supported_ops": sorted(self.supported_ops) if self.supported_ops is not None else None,
            "quant_scheme": self.quant_scheme.to_dict(),
            "facts": [vars(f) for f in self.facts],
            "runtime_install": self.runtime_install,
            "options": dict(self.options),
            "default_isa": self.default_isa.value if self.default_isa else None,
            "isa_schemes": {isa.value: scheme.to_dict() for isa, scheme in self.isa_schemes},
        }


def _scheme(raw: dict[str, Any]) -> QuantScheme:
    scheme = dict(raw)
    scheme["quantized_ops"] = tuple(scheme.get("quantized_ops", ()))
    for key in ("fused_activations", "float_output_ops"):
        if key in scheme:
            scheme[key] = tuple(scheme[key])
    scheme["op_rules"] = tuple(OpRule(**r) for r in scheme.get("op_rules", ()))
    return QuantScheme(**scheme)


def _parse(path: Path) -> Target:
    try:
        return _target(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:  # a missing key, an unknown precision or backend
        raise ProfileError(
            f"targets/{path.name} is not a valid profile: {type(exc).__name__}: {exc}",
            hint="restore the file from the edgeopt release (or fix the edit: see the other profiles beside it)",
        ) from exc


def _target(raw: dict[str, Any]) -> Target:
    """A profile's TOML table, typed: strings become Precision/BackendName/ArtifactFormat/IsaClass here."""
    base = dict(raw.get("quant_scheme", {}))
    isa_table = dict(raw.get("isa", {}))
    default_isa = IsaClass(isa_table.pop("default")) if "default" in isa_table else None
    isa_schemes = tuple(
        (IsaClass(name), _scheme({**base, **{k: v for k, v in overrides.items() if k != "why"}}))
        for name, overrides in isa_table.items()
    )
    precisions = tuple(Precision(p) for p in raw["precisions"])
    if Precision(raw["default_precision"]) not in precisions:
        raise ValueError(f"default_precision '{raw['default_precision']}' is not one of its precisions")
    if default_isa is not None and default_isa not in dict(isa_schemes):
        raise ValueError(f"default ISA class '{default_isa.value}' has no [isa.{default_isa.value}] table")
    return Target(
        name=raw["name"],
        aliases=tuple(raw.get("aliases", ())),
        description=raw["description"],
        backend=BackendName(raw["backend"]),
        artifact_format=ArtifactFormat(raw["artifact_format"]),
        layout=raw["layout"],
        precisions=precisions,
        default_precision=Precision(raw["default_precision"]),
        channel_multiple=int(raw["channel_multiple"]),
        default_threads=int(raw["default_threads"]),
        supported_ops=frozenset(raw["supported_ops"]) if "supported_ops" in raw else None,
        quant_scheme=dict(isa_schemes)[default_isa] if default_isa is not None else _scheme(base),
        facts=tuple(Fact(**f) for f in raw.get("facts", ())),
        runtime_install=raw["runtime_install"],
        options=_options(raw.get("options", {})),
        default_isa=default_isa,
        isa_schemes=isa_schemes,
    )


def _options(table: Mapping[str, object]) -> dict[str, OptionValue]:
    options = {key: value for key, value in table.items() if isinstance(value, (str, int, float, bool))}
    if len(options) < len(table):
        nested = ", ".join(sorted(set(table) - set(options)))
        raise TypeError(f"[options] holds only strings, numbers and booleans, not {nested}")
    return options


@cache
def all_targets() -> tuple[Target, ...]:
    """Every profile shipped with edgeopt, sorted by name."""
    return tuple(sorted((_parse(p) for p in _PROFILE_DIR.glob("*.toml")), key=lambda t: t.name))


def get_target(name: str) -> Target:
    """The profile called `name` or having it as an alias (case-insensitive)."""
    key = name.strip().lower()
    names: dict[str, Target] = {}
    for target in all_targets():
        for alias in (target.name, *target.aliases):
            names[alias.lower()] = target
    if key in names:
        return names[key]
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    hint = f"did you mean '{names[close[0]].name}'?" if close else None
    known = ", ".join(t.name for t in all_targets())
    raise UnknownTargetError(f"unknown target '{name}' (known: {known})", hint=hint or "run `edgeopt targets` to list them")
