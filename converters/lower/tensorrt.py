"""jetson-orin: TensorRT-ready ONNX plus the recipe that builds the engine on the device.

An engine is specific to the GPU, TensorRT version and JetPack it was built with, so the bundle
carries the ONNX and a `build_engine.sh` derived from the profile and the model, plus a Triton
model repository where the engine lands.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

import onnx

from edgeopt.converters.errors import LoweringError
from edgeopt.converters.lint import lint_qdq
from edgeopt.converters.lower.base import LoweredArtifact, LoweringOptions, LoweringResult
from edgeopt.converters.lower.onnx_io import graph_io_specs, save_onnx
from edgeopt.runtime.kinds import ArtifactFormat, BackendName, Precision, unreachable
from edgeopt.runtime.spec import TensorSpec
from edgeopt.targets import OptionValue, Target

__all__ = ["lower", "profile_command", "trtexec_command", "triton_config"]

_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}


def _shape_flag(specs: list[TensorSpec]) -> str:
    return ",".join(f"{s.name}:{'x'.join(str(d) for d in s.shape)}" for s in specs)


def _precision_flags(precision: Precision) -> list[str]:
    match precision:
        case Precision.FP32:
            return []
        case Precision.FP16:
            return ["--fp16"]
        case Precision.INT8:
            # Explicit quantization: the Q/DQ scales in the ONNX are used as they are; --fp16 lets
            # the layers left in float run in half precision instead of fp32.
            return ["--int8", "--fp16"]
        case Precision.INT8_WEIGHTS | Precision.PALETTIZED_8 | Precision.PALETTIZED_6 | Precision.PALETTIZED_4:
            raise LoweringError(f"TensorRT has no {precision} engine build", hint="use fp32, fp16 or int8")
        case _:
            unreachable(precision)


def trtexec_command(
    inputs: list[TensorSpec], precision: Precision, options: Mapping[str, OptionValue], dla_core: int | None, max_batch: int
) -> list[str]:
    """The trtexec argv that builds `model.plan` from `model.onnx` (TensorRT 10 flag names).

    Detailed profiling verbosity keeps each layer's ONNX node names in the engine, and
    --exportLayerInfo writes them with the layer's tensor formats, so that layer times from
    `build_engine.sh --profile` map back to ONNX nodes (edgeopt.runtime.layer_timings).
    """
    argv = [
        "trtexec", "--onnx=model.onnx", "--saveEngine=model.plan", "--skipInference", *_precision_flags(precision),
        "--profilingVerbosity=detailed", "--exportLayerInfo=layers.json",
    ]
    if dla_core is not None:
        argv += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    argv.append(f"--memPoolSize=workspace:{int(options.get('mem_pool_workspace_mib', 4096))}M")
    argv.append(f"--timingCacheFile={options.get('timing_cache', 'timing.cache')}")
    dynamic = [s for s in inputs if any(not isinstance(d, int) or d <= 0 for d in s.shape)]
    if dynamic:
        def concrete(spec: TensorSpec, batch: int) -> TensorSpec:
            dims = tuple(d if isinstance(d, int) and d > 0 else batch for d in spec.shape)
            return TensorSpec(spec.name, dims, spec.dtype)

        argv += [
            f"--minShapes={_shape_flag([concrete(s, 1) for s in dynamic])}",
            f"--optShapes={_shape_flag([concrete(s, 1) for s in dynamic])}",
            f"--maxShapes={_shape_flag([concrete(s, max(max_batch, 1)) for s in dynamic])}",
        ]
    return argv


def profile_command(build_argv: list[str]) -> list[str]:
    """The trtexec argv that times every layer of the built engine (what `build_engine.sh --profile` runs):
    per-layer profile, layer info and per-iteration latencies as JSON next to model.plan."""
    carried = [a for a in build_argv if a.startswith(("--useDLACore=", "--allowGPUFallback", "--optShapes="))]
    return [
        "trtexec", "--loadEngine=model.plan", "--profilingVerbosity=detailed", "--dumpProfile", "--warmUp=500", "--iterations=50",
        "--exportProfile=profile.json", "--exportLayerInfo=layers.json", "--exportTimes=times.json",
        *(a.replace("--optShapes=", "--shapes=") for a in carried),
    ]


def _build_script(argv: list[str], model_name: str) -> str:
    flags = " \\\n  ".join(shlex.quote(a) for a in argv[1:])
    profile_flags = " \\\n    ".join(shlex.quote(a) for a in profile_command(argv)[1:])
    return f"""#!/usr/bin/env bash
# Builds the TensorRT engine for this bundle on the Jetson itself (engines are specific to the
# GPU, TensorRT and JetPack versions they are built with). Written by edgeopt.
# --profile: then time each layer (profile.json, layers.json, times.json; read by
# `python -m edgeopt.runtime bench . --layers` and `edgeopt profile --layers`).
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "error: trtexec not found; install TensorRT with JetPack (sudo apt install nvidia-jetpack) or set TRTEXEC" >&2
  exit 2
fi
"$TRTEXEC" \\
  {flags}
mkdir -p triton/{shlex.quote(model_name)}/1
cp model.plan triton/{shlex.quote(model_name)}/1/model.plan
echo "engine: $(pwd)/model.plan (also in triton/{model_name}/1/)"
if [ "${{1:-}}" = "--profile" ]; then
  "$TRTEXEC" \\
    {profile_flags}
  echo "layer profile: $(pwd)/profile.json, layers.json, times.json"
fi
"""


def triton_config(model_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int) -> str:
    """A Triton `config.pbtxt` for the engine (platform tensorrt_plan)."""

    def block(kind: str, specs: list[TensorSpec]) -> str:
        entries = []
        for spec in specs:
            if spec.dtype not in _TRITON_TYPES:
                raise LoweringError(f"{kind} '{spec.name}' has dtype {spec.dtype}, which Triton's TensorRT backend cannot serve")
            dims = list(spec.shape[1:] if max_batch > 0 else spec.shape)
            dims_text = ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims)
            entries.append(
                f'  {{\n    name: "{spec.name}"\n    data_type: {_TRITON_TYPES[spec.dtype]}\n    dims: [ {dims_text} ]\n  }}'
            )
        return f"{kind} [\n" + ",\n".join(entries) + "\n]"

    return "\n".join(
        [
            f'name: "{model_name}"',
            'platform: "tensorrt_plan"',
            f"max_batch_size: {max_batch}",
            'default_model_filename: "model.plan"',
            block("input", inputs),
            block("output", outputs),
            "instance_group [ { count: 1, kind: KIND_GPU } ]",
            "",
        ]
    )


def _triton_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cleaned or "model"


def lower(
    model: onnx.ModelProto, target: Target, precision: Precision, out_dir: Path, options: LoweringOptions
) -> LoweringResult:
    findings = lint_qdq(model, target) if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else []
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        lines = "\n".join(f"  - {f.node}: {f.message}" for f in errors)
        raise LoweringError(
            f"the QDQ graph breaks {len(errors)} TensorRT rule(s):\n{lines}",
            hint="re-quantize with edgeopt (it adapts imported scales to TensorRT) or fix the export",
        )
    save_onnx(model, out_dir / "model.onnx")
    inputs, outputs = graph_io_specs(model, target.layout)
    profile = dict(target.options)
    dla_core = None if options.extra.get("dla_core") is None else int(options.extra["dla_core"])
    max_batch = int(profile.get("triton_max_batch_size", 0))
    argv = trtexec_command(inputs, precision, profile, dla_core, max_batch)
    name = _triton_name(options.model_name)

    script = out_dir / "build_engine.sh"
    script.write_text(_build_script(argv, name), encoding="utf-8")
    script.chmod(0o755)
    triton_dir = out_dir / "triton" / name
    (triton_dir / "1").mkdir(parents=True)
    (triton_dir / "config.pbtxt").write_text(triton_config(name, inputs, outputs, max_batch), encoding="utf-8")

    return LoweringResult(
        artifacts=[
            LoweredArtifact("model.onnx", ArtifactFormat.ONNX),
            LoweredArtifact("build_engine.sh", "shell", role="recipe"),
            LoweredArtifact(f"triton/{name}/config.pbtxt", "triton-config", role="config"),
        ],
        model_file="model.onnx",
        runtime_backend=BackendName.TENSORRT,
        verify_backend=BackendName.ONNXRUNTIME,
        inputs=inputs,
        outputs=outputs,
        summary={
            "trtexec": " ".join(shlex.quote(a) for a in argv),
            "engine_recipe": {
                "precision": str(precision),
                "dla_core": dla_core,
                "mem_pool_workspace_mib": int(profile.get("mem_pool_workspace_mib", 4096)),
                "fp16": "--fp16" in argv,
                "int8": "--int8" in argv,
            },
            "triton_model": f"triton/{name}",
            "qdq_lint": [f.to_dict() for f in findings],
            "note": "numerics checked with ONNX Runtime on the same ONNX; the engine itself is built and run on the Jetson",
        },
        verified_with="onnxruntime (CPUExecutionProvider) on the TensorRT-ready ONNX",
    )
