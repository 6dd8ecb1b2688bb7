"""Target profiles: every required device is there, typed, sourced, and reachable by alias."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgeopt.runtime.kinds import BackendName, Precision
from edgeopt.targets import (
    ArtifactFormat, IsaClass, ProfileError, Target, UnknownTargetError, UnsupportedIsaError, all_targets, get_target, registry,
)

REQUIRED = {
    "jetson-orin": ArtifactFormat.TENSORRT_ONNX,
    "apple-ane": ArtifactFormat.MLPACKAGE,
    "intel-openvino": ArtifactFormat.OPENVINO_IR,
    "raspberry-pi": ArtifactFormat.TFLITE,
    "onnxruntime-cpu": ArtifactFormat.ONNX,
}


def test_every_required_target_has_its_format() -> None:
    assert {t.name: t.artifact_format for t in all_targets()} == REQUIRED


@pytest.mark.parametrize("alias,name", [("orin", "jetson-orin"), ("RPI", "raspberry-pi"), ("pi5", "raspberry-pi"),
                                        ("coreml", "apple-ane"), ("openvino", "intel-openvino"), ("ort", "onnxruntime-cpu")])
def test_aliases_resolve(alias: str, name: str) -> None:
    assert get_target(alias).name == name


def test_aliases_are_unique_across_targets() -> None:
    names = [a.lower() for t in all_targets() for a in (t.name, *t.aliases)]
    assert len(names) == len(set(names))


def test_unknown_target_suggests_the_nearest_name() -> None:
    with pytest.raises(UnknownTargetError) as info:
        get_target("jetson-orn")
    assert info.value.exit_code == 2
    assert "did you mean 'jetson-orin'" in str(info.value)


@pytest.mark.parametrize("target", all_targets(), ids=lambda t: t.name)
def test_profiles_are_frozen_consistent_and_sourced(target: Target) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.name = "x"  # type: ignore[misc]
    assert target.default_precision in target.precisions
    assert target.channel_multiple >= 1
    assert target.runtime_install
    assert target.facts, "hardware facts are required"
    assert all(f.source for f in target.facts), "every fact says where it comes from"
    assert isinstance(target.backend, BackendName) and all(isinstance(p, Precision) for p in target.precisions)
    # ONNX Runtime and OpenVINO read ONNX themselves: no hand-kept op list; TensorRT's parser has one
    if target.artifact_format in (ArtifactFormat.ONNX, ArtifactFormat.OPENVINO_IR):
        assert target.supported_ops is None
    if target.artifact_format is ArtifactFormat.TENSORRT_ONNX:
        assert target.supported_ops and "Conv" in target.supported_ops


@pytest.mark.parametrize("change,needle", [
    (('default_precision = "fp16"', 'default_precision = "int4"'), "'int4' is not a valid Precision"),
    (('backend = "tensorrt"', 'backend = "tvm"'), "'tvm' is not a valid BackendName"),
    (("dla_cores = 2", "dla_cores = [2]"), "not dla_cores"),
    (('default_precision = "fp16"', 'default_precision = "int8-weights"'), "'int8-weights' is not one of its precisions"),
    (('name = "jetson-orin"', ""), "KeyError: 'name'"),
])
def test_a_broken_profile_is_a_profile_error_naming_its_file(tmp_path: Path, change: tuple[str, str], needle: str) -> None:
    text = (Path(registry.__file__).parent / "jetson-orin.toml").read_text(encoding="utf-8")
    assert change[0] in text
    broken = tmp_path / "jetson-orin.toml"
    broken.write_text(text.replace(change[0], change[1], 1), encoding="utf-8")
    with pytest.raises(ProfileError, match="targets/jetson-orin.toml is not a valid profile") as info:
        registry._parse(broken)
    assert needle in str(info.value) and info.value.exit_code == 2


def test_tensorrt_scheme_is_symmetric_int8() -> None:
    scheme = get_target("jetson-orin").quant_scheme
    assert scheme.activation_symmetric and scheme.weight_symmetric and scheme.weight_per_channel
    assert scheme.activation_dtype == "int8"


def test_tflite_fixed_output_rules() -> None:
    scheme = get_target("raspberry-pi").quant_scheme
    softmax = scheme.rule_for("Softmax")
    assert softmax is not None and softmax.output_scale == 1 / 256 and softmax.output_zero_point == -128
    tanh = scheme.rule_for("Tanh")
    assert tanh is not None and tanh.output_scale == 1 / 128 and tanh.output_zero_point == 0
    assert scheme.rule_for("MaxPool").same_scale_as_input  # type: ignore[union-attr]


def test_to_dict_round_trips_through_json() -> None:
    import json

    data = json.loads(json.dumps([t.to_dict() for t in all_targets()]))
    assert {d["name"] for d in data} == set(REQUIRED)
    orin = next(d for d in data if d["name"] == "jetson-orin")
    assert (orin["backend"], orin["precisions"], orin["default_precision"]) == ("tensorrt", ["fp32", "fp16", "int8"], "fp16")
    assert type(orin["backend"]) is str and type(orin["default_precision"]) is str, "plain strings at the JSON edge"
    assert "Conv" in orin["supported_ops"] and next(d for d in data if d["name"] == "onnxruntime-cpu")["supported_ops"] is None


@pytest.mark.parametrize("name", ["onnxruntime-cpu", "intel-openvino"])
def test_x86_cpu_targets_default_to_7_bit_pairwise_weights_that_no_cpu_saturates(name: str) -> None:
    target = get_target(name)
    assert target.default_isa is IsaClass.AVX2 and target.quant_scheme == target.scheme_for("avx2")
    assert target.quant_scheme.pairwise_weight_bits == 7
    for isa in ("vnni", "amx"):
        scheme = target.scheme_for(isa)
        assert scheme.pairwise_weight_bits == 8
        assert dataclasses.replace(scheme, pairwise_weight_bits=7) == target.quant_scheme, "only the weight range differs"


@pytest.mark.parametrize("name", ["jetson-orin", "raspberry-pi", "apple-ane"])
def test_targets_whose_int8_does_not_depend_on_the_cpu_class_refuse_one(name: str) -> None:
    target = get_target(name)
    assert target.default_isa is None and target.isa_classes == ()
    assert target.scheme_for(None) == target.quant_scheme and target.quant_scheme.pairwise_weight_bits == 8
    with pytest.raises(UnsupportedIsaError) as info:
        target.scheme_for("vnni")
    assert info.value.exit_code == 2 and "its int8 does not depend on the CPU" in str(info.value)


def test_an_unknown_class_lists_the_choices() -> None:
    with pytest.raises(UnsupportedIsaError, match=r"\(choices: avx2, vnni, amx\)"):
        get_target("intel-openvino").resolve_isa("arm64")
    with pytest.raises(UnsupportedIsaError, match="no CPU class 'sse2'"):
        get_target("onnxruntime-cpu").resolve_isa("sse2")


def test_isa_schemes_are_in_the_json_view() -> None:
    data = get_target("onnxruntime-cpu").to_dict()
    assert data["default_isa"] == "avx2"
    assert {isa: s["pairwise_weight_bits"] for isa, s in data["isa_schemes"].items()} == {"avx2": 7, "vnni": 8, "amx": 8, "arm64": 8}
