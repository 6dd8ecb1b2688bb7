"""`edgeopt build … -p int8 --finetune {qat,qad} --train-data …`: the trained graph is the graph that ships.

The bundles are checked against a fine-tuning run done here step by step with the same inputs (the
run is deterministic: one torch thread, a seeded order): the TFLite flatbuffer and the ONNX Runtime
model carry the trained integer weights, scales and zero points bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import numpy_helper

pytest.importorskip("torch")

import edgeopt  # noqa: E402
from edgeopt.cli import cli  # noqa: E402
from edgeopt.converters.data import model_input_specs, open_dataset  # noqa: E402
from edgeopt.converters.finetune.data import load_training_data  # noqa: E402
from edgeopt.converters.finetune.train import FinetuneOptions, finetune  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeopt.runtime.kinds import Effort, FinetuneMode  # noqa: E402
from edgeopt.targets import get_target  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
SCHEMA = json.loads((Path(edgeopt.__file__).parent / "schemas" / "manifest.schema.json").read_text())
OPTIONS = FinetuneOptions(mode=FinetuneMode.QAD, epochs=1, threads=1)


def _edgeopt(*args: str) -> Result:
    """The real CLI, run in this process (torch is already imported here)."""
    return CliRunner().invoke(cli, list(args))


def _trained_here(target: str) -> onnx.ModelProto:
    """What the build's quantize and finetune stages compute, step by step."""
    fp32, _ = simplify(onnx.load(DIGITS / "model.onnx"))
    specs, scheme = model_input_specs(fp32), get_target(target).scheme_for(None)
    qdq = quantize(fp32, scheme, open_dataset(DIGITS / "calib.npz", specs), QuantizeOptions(effort=Effort.FAST)).model
    return finetune(qdq, fp32, load_training_data(DIGITS / "eval.npz", specs), OPTIONS, scheme=scheme).model


def _build(target: str, output: Path) -> edgeopt.BuildResult:
    return edgeopt.build(
        DIGITS / "model.onnx", target, output=output, precision="int8", calibration=DIGITS / "calib.npz",
        evaluation=DIGITS / "eval.npz", effort="fast", finetune=OPTIONS, train_data=DIGITS / "eval.npz",
    )


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _weight_dequantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv/Gemm node name -> the DequantizeLinear of its stored weight."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.name: producers[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def test_the_tflite_bundle_carries_the_trained_integers_scales_and_zero_points_bit_for_bit(tmp_path: Path) -> None:
    from ai_edge_litert import schema_py_generated as schema

    result = _build("raspberry-pi", tmp_path / "b")
    trained = _trained_here("raspberry-pi")
    report = result.manifest["finetune"]
    # training changed the graph: its activation scales (int8 latents move ~1% of their grid step a step, so
    # no weight code changes in this epoch of 23 steps; the codes are still compared with the run here)
    assert report["best_epoch"] > 0 and report["writeback"]["activation_scales_changed"] > 0, report
    flatbuffer = schema.ModelT.InitFromPackedBuf((tmp_path / "b" / "model.tflite").read_bytes(), 0)
    tensors = {t.name.decode(): t for t in flatbuffer.subgraphs[0].tensors}
    stored = _initializers(trained)
    checked = 0
    for node, dq in _weight_dequantizers(trained).items():
        codes, scale, zero_point = (stored[name] for name in dq.input)
        tensor = tensors[f"{node}_filter" if codes.ndim == 4 else f"{node}_weights"]
        shipped = np.frombuffer(bytes(flatbuffer.buffers[tensor.buffer].data), np.int8).reshape(tensor.shape)
        # TFLite filters are OHWI; the classifier reads the NHWC flatten of the (32, 4, 4) features: its columns go HWC
        laid_out = codes.transpose(0, 2, 3, 1) if codes.ndim == 4 else codes.reshape(10, 32, 4, 4).transpose(0, 2, 3, 1).reshape(10, -1)
        assert np.array_equal(shipped, laid_out), node
        assert np.asarray(tensor.quantization.scale, np.float32).tobytes() == scale.astype(np.float32).reshape(-1).tobytes(), node
        assert np.array_equal(np.asarray(tensor.quantization.zeroPoint), zero_point.reshape(-1)), node
        checked += 1
    for q in (n for n in trained.graph.node if n.op_type == "QuantizeLinear"):
        tensor = tensors[q.input[0]]
        if tensor.quantization is None:  # a float graph input: the lowering quantizes it into "<name>_q"
            tensor = tensors[f"{q.input[0]}_q"]
        quantization = tensor.quantization
        assert np.float32(quantization.scale[0]).tobytes() == stored[q.input[1]].astype(np.float32).tobytes(), q.name
        assert int(quantization.zeroPoint[0]) == int(stored[q.input[2]]), q.name
        checked += 1
    assert checked >= 6


def test_the_onnxruntime_bundle_carries_the_trained_graph_and_the_manifest_records_the_run(tmp_path: Path) -> None:
    result = _build("onnxruntime-cpu", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    stages = [s["name"] for s in manifest["stages"]]
    assert stages.index("quantize") + 1 == stages.index("finetune") < stages.index("lower")
    report = manifest["finetune"]
    assert report["mode"] == "qad" and report["epochs"] == 1 and report["samples"] == {"train": 360, "held_out": 90}
    assert set(report["held_out_before"]) >= {"top1_agreement", "accuracy", "min_sqnr_db"} and report["peak_rss_mb"] > 0
    assert result.contents.finetune == report
    shipped = _initializers(onnx.load(tmp_path / "b" / "model.onnx"))
    trained = _initializers(_trained_here("onnxruntime-cpu"))
    integers = [name for name, value in trained.items() if value.dtype in (np.int8, np.uint8, np.int32)]
    assert integers and all(shipped[name].tobytes() == trained[name].tobytes() for name in integers)
    assert all(shipped[name].tobytes() == trained[name].tobytes() for name in trained if name.endswith("_scale") and name in shipped)


def test_cli_qat_trains_on_the_labels_and_shows_each_epoch(tmp_path: Path) -> None:
    result = _edgeopt(
        "build", str(DIGITS / "model.onnx"), "-t", "ort", "-p", "int8", "--calibration", str(DIGITS / "calib.npz"), "--effort", "fast",
        "--finetune", "qat", "--train-data", str(DIGITS / "eval.npz"), "--epochs", "1", "--lr", "1e-4", "-o", str(tmp_path / "b"),
    )
    assert result.exit_code == 0, result.stderr
    assert "finetune epoch 0/1: before training, held-out accuracy" in result.stderr
    assert "finetune epoch 1/1: loss" in result.stderr
    report = json.loads((tmp_path / "b" / "manifest.json").read_text())["finetune"]
    assert report["mode"] == "qat" and report["losses"] == {"logits": "task"} and report["labels"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-p", "int8", "--finetune", "qat", "--train-data", str(DIGITS / "calib.npz")], "needs labels"),
        (["-p", "int8", "--finetune", "qad"], "--finetune qad needs training data"),
        (["-p", "int8", "--train-data", str(DIGITS / "eval.npz")], "--train-data is read only by --finetune"),
        (["-p", "fp16", "--finetune", "qad", "--train-data", str(DIGITS / "eval.npz")], "trains the int8 QDQ graph"),
        (["-p", "int8", "--epochs", "3"], "epochs apply only to fine-tuning"),
    ],
)
def test_cli_refuses_what_finetuning_cannot_do_before_any_work(tmp_path: Path, args: list[str], needle: str) -> None:
    result = _edgeopt("build", str(DIGITS / "model.onnx"), "-t", "ort", "--calibration", str(DIGITS / "calib.npz"), *args, "-o", str(tmp_path / "b"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "b").exists()


def test_the_openvino_ir_holds_the_trained_activation_ranges_within_one_ulp(tmp_path: Path) -> None:
    """OpenVINO turns each activation Q/DQ pair into a FakeQuantize over [(qmin − z)·s, (qmax − z)·s]."""
    import openvino as ov

    from edgeopt.converters.lower import LoweringOptions, lower
    from edgeopt.runtime.kinds import Precision

    trained = _trained_here("intel-openvino")
    lower(trained, get_target("intel-openvino"), Precision.INT8, tmp_path, LoweringOptions(model_name="digits"))
    fake_quantizes = {op.get_friendly_name(): op for op in ov.Core().read_model(tmp_path / "model.xml").get_ordered_ops() if op.get_type_name() == "FakeQuantize"}
    stored = _initializers(trained)
    checked = 0
    for q in (n for n in trained.graph.node if n.op_type == "QuantizeLinear"):
        scale, zero_point = stored[q.input[1]].astype(np.float32), int(stored[q.input[2]])
        qmin, qmax = (0, 255) if stored[q.input[2]].dtype == np.uint8 else (-128, 127)
        dequantize = next(n.name for n in trained.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        op = fake_quantizes[dequantize]
        low, high = (float(op.input_value(i).get_node().get_data().reshape(-1)[0]) for i in (1, 2))
        for shipped, expected in ((low, np.float32(qmin - zero_point) * scale), (high, np.float32(qmax - zero_point) * scale)):
            assert abs(np.float32(shipped) - expected) <= np.spacing(np.float32(expected)), (dequantize, shipped, expected)
        checked += 1
    assert checked == 4
