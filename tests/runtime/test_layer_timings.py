"""Layer timings: each backend's own profiler, every kernel mapped back to the ONNX nodes it computes.

Real libraries on the digits example built for int8 (ONNX Runtime, the same QDQ graph as an
OpenVINO IR, and a copy with the classifier left in float); TensorRT's trtexec files are written
here in the documented format (no GPU on this host); LiteRT must say that it has no profiler.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest

import edgeopt
from edgeopt.runtime import load
from edgeopt.runtime.__main__ import main as runtime_main
from edgeopt.runtime.benchmark import benchmark_schema
from edgeopt.runtime.errors import BundleError
from edgeopt.runtime.layer_timings import (
    LayerPrecision,
    LayerProfile,
    LayerTiming,
    OnnxNodeMapper,
    profile_layers,
    read_onnx_graph,
    trtexec_layer_profile,
    trtexec_layer_profile_in,
)

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
RUNS = 8


def _image() -> dict[str, np.ndarray]:
    return {"image": np.load(DIGITS / "eval.npz")["image"][:1].astype(np.float32)}


def _layer_schema() -> dict:
    schema = benchmark_schema()
    return {**schema["$defs"]["layer_profile"], "$defs": schema["$defs"]}


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("layers") / "digits-int8"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=folder, precision="int8", calibration=DIGITS / "calib.npz", effort="fast")
    return folder


def _compute_nodes(path: Path) -> list[str]:
    return [n.name for n in onnx.load(path).graph.node if n.op_type in {"Conv", "Gemm", "MatMul"}]


def test_onnxruntime_int8_kernels_name_their_onnx_nodes_and_run_in_int8(int8_bundle: Path) -> None:
    with load(int8_bundle) as model:
        profile = profile_layers(model, _image(), runs=RUNS, warmup=2)
    document = profile.to_dict()
    jsonschema.validate(document, _layer_schema())
    assert profile.available and profile.runs == RUNS and profile.layers
    assert sum(row.share for row in profile.layers) == pytest.approx(1.0, abs=1e-6)
    assert [row.time_ms for row in profile.layers] == sorted((row.time_ms for row in profile.layers), reverse=True)
    graph = onnx.load(int8_bundle / "model.onnx").graph
    for compute in _compute_nodes(int8_bundle / "model.onnx"):
        owners = [row for row in profile.layers if compute in row.nodes]
        assert len(owners) == 1, compute
        kernel = owners[0]
        assert kernel.nodes[0] == compute and kernel.op_type in {"QLinearConv", "QGemm", "QLinearMatMul"}
        assert kernel.precision is LayerPrecision.INT8 and kernel.implementation == "CPUExecutionProvider"
    weight_dq = [n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in graph.initializer}]
    mapped = {name for row in profile.layers for name in row.nodes}
    assert set(weight_dq) <= mapped  # Q/DQ fused into the QLinear kernels are named with them
    assert profile.by_precision()["int8"]["layers"] == len(_compute_nodes(int8_bundle / "model.onnx")) + 1  # + the int8 MaxPool
    assert 0.05 < profile.coverage < 1.5 and profile.overhead is not None and profile.overhead > 0
    assert "ran in int8" in profile.summary()


def test_a_layer_left_in_float_is_named_with_its_cost(int8_bundle: Path, tmp_path: Path) -> None:
    """The classifier's Q/DQ removed: ONNX Runtime runs that Gemm in float, and the summary says what it cost."""
    model = onnx.load(int8_bundle / "model.onnx")
    graph = model.graph
    by_output = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    dropped = []
    for position, tensor in enumerate(gemm.input):
        dq = by_output.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            source = dq.input[0]
            quantize = by_output.get(source)
            gemm.input[position] = quantize.input[0] if quantize is not None else f"{source}_float"
            if quantize is None:  # a weight stored int8: keep it as the float it stands for
                initial = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
                weights = initial[source].astype(np.float32)
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                along = [-1 if d == axis % weights.ndim else 1 for d in range(weights.ndim)]
                scale = initial[dq.input[1]].reshape(along if initial[dq.input[1]].size > 1 else [])
                zero_point = initial[dq.input[2]].astype(np.float32).reshape(scale.shape) if len(dq.input) > 2 else 0.0
                value = (weights - zero_point) * scale
                graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), f"{source}_float"))
            dropped.append(dq.name)
    float_file = tmp_path / "mixed.onnx"
    onnx.save(model, float_file)
    with load(float_file) as loaded:
        profile = profile_layers(loaded, _image(), runs=RUNS, warmup=2)
    classifier = next(row for row in profile.layers if gemm.name in row.nodes)
    assert classifier.precision is LayerPrecision.FLOAT and classifier.op_type in {"Gemm", "FusedGemm"}
    floats = profile.by_precision()["float"]
    assert floats["layers"] >= 1
    assert f"{floats['layers']} of {len(profile.layers)} layers ran in float and cost {floats['share']:.0%}" in profile.summary()


def test_onnxruntime_fp32_nchwc_kernels_carry_the_fused_activation() -> None:
    with load(DIGITS / "model.onnx") as model:
        profile = profile_layers(model, _image(), runs=RUNS, warmup=2)
    convs = [row for row in profile.layers if row.op_type == "Conv"]
    # the raw example model: Conv, BatchNormalization and Relu fused into one NCHWc kernel named after the Relu's output
    assert {row.nodes for row in convs} == {
        ("/features/features.2/Relu", "/features/features.0/Conv", "/features/features.1/BatchNormalization"),
        ("/features/features.5/Relu", "/features/features.3/Conv", "/features/features.4/BatchNormalization"),
    }
    assert all(row.precision is LayerPrecision.FLOAT for row in convs)
    assert "no int8 layers" in profile.summary()


def test_openvino_counters_give_int8_kernels_with_their_onnx_nodes(int8_bundle: Path, tmp_path: Path) -> None:
    import openvino

    xml = tmp_path / "model.xml"
    openvino.save_model(openvino.convert_model(str(int8_bundle / "model.onnx")), str(xml), compress_to_fp16=False)
    with load(xml) as model:
        profile = profile_layers(model, _image(), runs=RUNS, warmup=2)
    jsonschema.validate(profile.to_dict(), _layer_schema())
    convolutions = [row for row in profile.layers if row.op_type == "Convolution"]
    assert len(convolutions) == 2 and all(row.precision is LayerPrecision.INT8 for row in convolutions)
    assert all(row.implementation.upper().endswith(("_I8", "_U8")) for row in convolutions)
    assert {row.nodes[0] for row in convolutions} == {"/features/features.0/Conv", "/features/features.3/Conv"}
    assert all(row.time_ms > 0 for row in convolutions) and profile.coverage is not None and profile.unprofiled_run_ms > 0


def test_litert_says_it_has_no_profiler_and_what_would_measure_it(tmp_path: Path) -> None:
    from edgeopt.converters.lower import LoweringOptions
    from edgeopt.converters.lower.tflite import lower_to_bytes

    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(lower_to_bytes(onnx.load(DIGITS / "model.onnx"), "fp32", LoweringOptions())[0])
    with load(tflite) as model:
        profile = profile_layers(model, _image(), runs=2)
    assert not profile.available and profile.layers == [] and profile.coverage is None
    assert "benchmark_model" in profile.reason and "--enable_op_profiling" in profile.reason
    assert profile.summary().startswith("no layer timings on tflite")
    jsonschema.validate(profile.to_dict(), _layer_schema())


def _trtexec_files(folder: Path) -> None:
    """trtexec 10's --exportProfile / --exportLayerInfo (detailed) / --exportTimes, in their documented shapes."""
    sep = "\x1e"
    layers = {
        "Layers": [
            {
                "Name": "/features/features.0/Conv + /features/features.2/Relu",
                "LayerType": "CaskConvolution",
                "ParameterType": "Convolution",
                "Inputs": [{"Name": "image_q", "Location": "Device", "Dimensions": [1, 1, 8, 8], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
                "Outputs": [{"Name": "a", "Location": "Device", "Dimensions": [1, 16, 8, 8], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
                "Metadata": f"[ONNX Layer: /features/features.0/Conv]{sep}[ONNX Layer: /features/features.2/Relu]",
                "TacticName": "sm87_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32",
            },
            {
                "Name": "Reformatting CopyNode for Input Tensor 0 to /classifier/Gemm",
                "LayerType": "Reformat",
                "Inputs": [{"Name": "a", "Location": "Device", "Dimensions": [1, 512], "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
                "Outputs": [{"Name": "b", "Location": "Device", "Dimensions": [1, 512], "Format/Datatype": "Row major linear FP16 format"}],
                "Metadata": "",
            },
            {
                "Name": "/classifier/Gemm",
                "LayerType": "CaskGemmMatrixMultiply",
                "ParameterType": "MatrixMultiply",
                "Inputs": [{"Name": "b", "Location": "Device", "Dimensions": [1, 512], "Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Name": "logits", "Location": "Device", "Dimensions": [1, 10], "Format/Datatype": "Row major linear FP16 format"}],
                "Metadata": "[ONNX Layer: /classifier/Gemm]",
                "TacticName": "sm87_xmma_gemm_f16f16_f16f32",
            },
        ],
        "Bindings": ["image", "logits"],
    }
    profile = [
        {"count": 50},
        {"name": "/features/features.0/Conv + /features/features.2/Relu", "timeMs": 3.0, "averageMs": 0.06, "medianMs": 0.05, "percentage": 50.0},
        {"name": "Reformatting CopyNode for Input Tensor 0 to /classifier/Gemm", "timeMs": 0.5, "averageMs": 0.01, "medianMs": 0.01, "percentage": 8.3},
        {"name": "/classifier/Gemm", "timeMs": 2.5, "averageMs": 0.05, "medianMs": 0.04, "percentage": 41.7},
    ]
    times = [{"startEnqMs": i, "endEnqMs": i + 0.01, "startComputeMs": i, "endComputeMs": i + 0.1, "latencyMs": 0.12 + i * 1e-3} for i in range(5)]
    (folder / "layers.json").write_text(json.dumps(layers))
    (folder / "profile.json").write_text(json.dumps(profile))
    (folder / "times.json").write_text(json.dumps(times))


def test_trtexec_profile_maps_fused_layers_to_onnx_nodes_with_their_precision(tmp_path: Path) -> None:
    _trtexec_files(tmp_path)
    profile = trtexec_layer_profile_in(tmp_path)
    assert profile.runs == 50 and profile.profiler == "trtexec --exportProfile"
    conv, gemm, reformat = profile.layers
    assert conv.nodes == ("/features/features.0/Conv", "/features/features.2/Relu") and conv.precision is LayerPrecision.INT8
    assert conv.time_ms == 0.05 and conv.implementation.startswith("sm87_xmma_fprop")
    assert gemm.nodes == ("/classifier/Gemm",) and gemm.precision is LayerPrecision.FLOAT
    assert reformat.nodes == () and reformat.precision is LayerPrecision.OTHER
    assert profile.profiled_run_ms == pytest.approx(0.122) and profile.coverage == pytest.approx(0.1 / 0.122)
    assert profile.summary() == "1 of 3 layers ran in float and cost 40% of layer time; 1 int8 layers 50%"
    jsonschema.validate(profile.to_dict(), _layer_schema())


def test_trtexec_without_files_or_with_broken_ones_says_what_to_run(tmp_path: Path) -> None:
    missing = trtexec_layer_profile_in(tmp_path)
    assert not missing.available and "build_engine.sh --profile" in missing.reason
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read trtexec JSON"):
        trtexec_layer_profile(tmp_path / "profile.json")
    (tmp_path / "profile.json").write_text(json.dumps([{"count": 1}, {"name": "x", "timeMs": 1.0, "averageMs": 1.0, "percentage": 100.0}]))
    (tmp_path / "layers.json").write_text(json.dumps({"Layers": ["x"]}))  # built without detailed verbosity
    with pytest.raises(BundleError, match="profilingVerbosity=detailed"):
        trtexec_layer_profile(tmp_path / "profile.json", tmp_path / "layers.json")


def test_the_runtime_reads_onnx_nodes_exactly_as_onnx_does(int8_bundle: Path) -> None:
    path = int8_bundle / "model.onnx"
    nodes, outputs = read_onnx_graph(path)
    graph = onnx.load(path).graph
    assert [(n.name, n.op_type, n.inputs, n.outputs) for n in nodes] == [
        (n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node
    ]
    assert outputs == [o.name for o in graph.output]


def test_node_mapper_joins_requantization_to_the_producing_kernel() -> None:
    """Conv -> Q -> DQ -> Conv: the Q belongs to the first kernel, the DQ to the one that reads it."""
    from edgeopt.runtime.layer_timings import OnnxNode

    nodes = [
        OnnxNode("x_dq", "DequantizeLinear", ("xq", "s", "z"), ("x",)),
        OnnxNode("w1_dq", "DequantizeLinear", ("w1q", "s", "z"), ("w1",)),
        OnnxNode("conv1", "Conv", ("x", "w1"), ("c1",)),
        OnnxNode("c1_q", "QuantizeLinear", ("c1", "s", "z"), ("c1q",)),
        OnnxNode("c1_dq", "DequantizeLinear", ("c1q", "s", "z"), ("c1d",)),
        OnnxNode("conv2", "Conv", ("c1d", "w1"), ("y",)),
    ]
    nodes[0] = OnnxNode("", "DequantizeLinear", ("xq", "s", "z"), ("x",))  # exporters often leave Q/DQ unnamed
    claims = OnnxNodeMapper(nodes, ["y"]).claim_kernels(["conv1_token_3", "conv2", "Transpose_token_9"])
    assert claims["conv1_token_3"] == ("conv1", "DequantizeLinear(x)", "w1_dq", "c1_q")  # anchor first, then graph order
    assert claims["conv2"] == ("conv2", "w1_dq", "c1_dq")  # w1_dq feeds both kernels: listed with each
    assert "Transpose_token_9" not in claims  # a layout kernel ONNX Runtime inserted has no ONNX node
    # ONNX Runtime's own names: an unnamed node is `<OpType>_<graph index>`, a shared DQ's copies `<name>/duplicated`
    mapper = OnnxNodeMapper(nodes, ["y"])
    assert mapper.anchor("DequantizeLinear_0") is nodes[0] and mapper.anchor("Conv_0") is None
    assert mapper.anchor("w1_dq/duplicated") is nodes[1]


def test_bench_layers_json_is_one_valid_document(int8_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle, bundle)
    assert runtime_main(["bench", str(bundle), "--runs", "5", "--warmup", "1", "--layers", "--layer-runs", "3", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    jsonschema.validate(document, benchmark_schema())
    assert document["layers"]["runs"] == 3 and document["layers"]["backend"] == "onnxruntime"
    assert LayerProfile.from_dict(document["layers"]).to_dict() == document["layers"]
    assert runtime_main(["bench", str(bundle), "--runs", "5", "--warmup", "1"]) == 0
    assert "layers (" not in capsys.readouterr().out  # without --layers: no profiler run, no table


def test_a_profile_round_trips_and_prints_its_slowest_layers() -> None:
    rows = [LayerTiming(f"k{i}", "Conv", (f"n{i}",), LayerPrecision.INT8 if i % 2 else LayerPrecision.FLOAT, float(i)) for i in range(1, 13)]
    profile = LayerProfile.measured("openvino", "test", 3, rows, profiled_run_ms=100.0)
    profile.unprofiled_run_ms = 80.0
    assert profile.overhead == pytest.approx(1.25) and profile.coverage == pytest.approx(0.78)
    text = profile.format_text(top=5)
    assert "n12" in text and "n7" not in text and "7 more in the JSON" in text and "overhead x1.25" in text
    assert LayerProfile.from_dict(profile.to_dict()).to_dict() == profile.to_dict()


def test_an_ort_format_model_is_profiled_and_says_why_its_kernels_are_unmapped(tmp_path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "digits.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(DIGITS / "model.onnx"), options, providers=["CPUExecutionProvider"])
    with load(tmp_path / "digits.ort") as model:
        profile = profile_layers(model, _image(), runs=2, warmup=1)
    assert profile.available and profile.layers and profile.unmapped_kernels() == len(profile.layers)
    assert "not an ONNX protobuf" in profile.notes[-1]
