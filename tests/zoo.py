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
