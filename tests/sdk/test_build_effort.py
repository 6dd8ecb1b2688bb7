"""`--effort` and `--technique`: which PTQ techniques an int8 build tries, what it keeps, and what the
manifest and the summary say about it. The digits example is the model (128 calibration samples:
96 estimate ranges, 32 measure quality; of the 96, 24 judge each technique)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeopt
from edgeopt.converters.errors import CalibrationDataError
from edgeopt.runtime.errors import OptionError
from tests.sdk.test_cli import edgeopt as run_cli

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
CALIBRATION = DIGITS / "calib.npz"


def _techniques(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["quantization"]["techniques"]


def test_the_default_effort_searches_on_held_out_samples_and_records_every_trial(tmp_path: Path) -> None:
    result = edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", precision="int8", calibration=CALIBRATION, output=tmp_path / "b")
    techniques = _techniques(result.bundle)
    search = techniques["search"]
    assert techniques["effort"] == "default" and search["held_out_samples"] == 24
    tried = {t["technique"] for t in search["trials"]} | {t["technique"] for t in search["not_tried"]}
    assert tried == {"equalization", "bias_absorption", "smoothquant", "range_search", "bias_correction"}
    assert all(t["sqnr_db_after"] is not None and t["seconds"] >= 0 for t in search["trials"])
    kept = [t["technique"] for t in search["trials"] if t["kept"]]
    assert set(kept) <= set(techniques["chosen"])
    assert set(techniques["reports"]) == set(techniques["chosen"]) - {"bias_correction"}
    quantization = json.loads((result.bundle / "manifest.json").read_text())["quantization"]
    assert techniques["refit_samples"] == quantization["samples"] == 96  # the chosen recipe's ranges: every range-estimation sample
    assert f"effort default: {', '.join(techniques['chosen'])}" in result.summary_text()


def test_fast_builds_the_baseline_without_a_search(tmp_path: Path) -> None:
    result = edgeopt.build(
        DIGITS / "model.onnx", "onnxruntime-cpu", precision="int8", calibration=CALIBRATION, output=tmp_path / "b", effort="fast"
    )
    assert _techniques(result.bundle) == {"effort": "fast", "chosen": [], "search": None, "refit_samples": None, "reports": {}}



def test_a_technique_whose_own_check_kept_the_graph_is_not_listed_as_chosen(tmp_path: Path) -> None:
    """Bias correction (forced on) corrects Conv/Gemm biases; on a MatMul model it has nothing to correct,
    and the manifest and summary must not claim it shaped the bundle (its report says why)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, 16)).astype(np.float32))
    result = edgeopt.build(
        tmp_path / "m.onnx", "onnxruntime-cpu", precision="int8", calibration=tmp_path / "calib.npz", output=tmp_path / "b", effort="fast",
        techniques={"bias_correction": True},
    )
    quantization = json.loads((result.bundle / "manifest.json").read_text())["quantization"]
    assert quantization["bias_correction"] == {"applied": False, "layers": 0, "reason": "no layer or sample to correct"}
    assert quantization["techniques"]["chosen"] == []
    assert "effort fast: min-max ranges only" in result.summary_text()

def test_a_forced_technique_is_applied_unmeasured_and_an_explicit_method_rules_out_the_range_search(tmp_path: Path) -> None:
    result = edgeopt.build(
        DIGITS / "model.onnx", "raspberry-pi", precision="int8", calibration=CALIBRATION, output=tmp_path / "b",
        calibration_method="percentile", techniques={"bias_correction": False, "equalization": True},
    )
    techniques = _techniques(result.bundle)
    assert techniques["chosen"][0] == "equalization" and "bias_correction" not in techniques["chosen"]
    assert techniques["search"]["forced"] == {"bias_correction": False, "equalization": True}
    assert {"technique": "range_search", "why": "--calibration-method percentile was given"} in techniques["search"]["not_tried"]
    assert json.loads((result.bundle / "manifest.json").read_text())["quantization"]["method"] == "percentile"


def test_unknown_effort_or_technique_names_are_option_errors(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="unknown effort 'maximal'"):
        edgeopt.build(DIGITS / "model.onnx", "ort", precision="int8", calibration=CALIBRATION, output=tmp_path / "a", effort="maximal")
    with pytest.raises(OptionError, match="unknown technique 'gptq'"):
        edgeopt.build(DIGITS / "model.onnx", "ort", precision="int8", calibration=CALIBRATION, output=tmp_path / "b", techniques={"gptq": True})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_cli_takes_effort_and_technique_switches_and_refuses_malformed_ones(tmp_path: Path) -> None:
    model, data = str(DIGITS / "model.onnx"), str(CALIBRATION)
    done = run_cli("build", model, "-t", "ort", "-p", "int8", "--calibration", data, "--effort", "fast", "--technique", "bias_correction=off", "-o", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert _techniques(tmp_path / "b")["chosen"] == []
    assert "int8     effort fast: min-max ranges only" in done.stdout
    for option, value, needle in [("--effort", "huge", "'huge' is not one of 'fast', 'default', 'max'"), ("--technique", "adaround", "NAME=on|off"), ("--technique", "gptq=on", "'gptq=on'")]:
        refused = run_cli("build", model, "-t", "ort", "-p", "int8", "--calibration", data, option, value, "-o", str(tmp_path / "c"))
        assert refused.returncode == 2 and "Traceback" not in refused.stderr and needle in refused.stderr, refused.stderr
        assert not (tmp_path / "c").exists()


def test_max_also_tries_learned_rounding_and_keeps_sensitive_layers_float_by_a_goal(tmp_path: Path) -> None:
    result = edgeopt.build(
        DIGITS / "model.onnx", "onnxruntime-cpu", precision="int8", calibration=CALIBRATION, output=tmp_path / "b", effort="max"
    )
    techniques = _techniques(result.bundle)
    search = techniques["search"]
    assert "adaround" in {t["technique"] for t in search["trials"]}
    mixed = techniques["reports"]["mixed_precision"]
    assert mixed["goal_drop"] == 1.0 and mixed["samples"] == 96 and mixed["metric"].startswith("top-1")
    assert ("mixed_precision" in techniques["chosen"]) == bool(mixed["layers"])
    assert result.manifest["quantization"]["float_fallback"] == mixed["layers"]
    assert "mixed precision:" in result.summary_text()


def test_mixed_precision_forced_on_needs_samples_to_judge_it(tmp_path: Path) -> None:
    with np.load(CALIBRATION) as archive:
        few = [{"image": archive["image"][i : i + 1]} for i in range(20)]
    with pytest.raises(CalibrationDataError, match="needs at least 48 calibration samples"):
        edgeopt.build(
            DIGITS / "model.onnx", "onnxruntime-cpu", precision="int8", calibration=few, output=tmp_path / "b",
            effort="fast", techniques={"mixed_precision": True},
        )
    assert not (tmp_path / "b").exists()
