"""Make tests/data/digits_qat.onnx: a small CNN trained with PyTorch quantization-aware training
(torch.ao.quantization eager mode, x86 QAT qconfig) on scikit-learn's digits, exported with its
fake-quant nodes as ONNX QuantizeLinear/DequantizeLinear.

The qconfig (PyTorch's x86 QAT defaults, with the plain FakeQuantize module that the ONNX exporter
understands instead of the fused one) gives asymmetric uint8 activations and symmetric int8
per-channel weights, so importing it for TensorRT needs adaptations while TFLite/ORT keep most scales.

Inputs are digits.images / 16 normalized to [-1, 1], shape [1, 1, 8, 8]. Run:
    python tests/data/make_qat_model.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.ao import quantization as tq

OUTPUT = Path(__file__).with_name("digits_qat.onnx")
SEED = 0

QAT_QCONFIG = tq.QConfig(
    activation=tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine
    ),
    weight=tq.FakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
    ),
)


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64), the model's input convention."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return images[:, None], digits.target.astype(np.int64)


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def train() -> nn.Module:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    images, labels = digits_data()
    order = np.random.default_rng(SEED).permutation(len(images))
    train_idx = order[: int(0.8 * len(order))]
    x, y = torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])
    model = DigitsNet()
    model.eval()
    tq.fuse_modules(model, [["conv1", "relu1"], ["conv2", "relu2"]], inplace=True)
    model.train()
    model.qconfig = QAT_QCONFIG
    tq.prepare_qat(model, inplace=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(15):
        permutation = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = permutation[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        if epoch == 11:
            model.apply(tq.disable_observer)  # freeze the learned ranges for the last epochs
    model.eval()
    return model


def main() -> None:
    model = train()
    images, labels = digits_data()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.from_numpy(images[:1]),), str(OUTPUT), dynamo=False, opset_version=13,
            input_names=["image"], output_names=["logits"],
        )
    exported = onnx.load(str(OUTPUT))
    onnx.checker.check_model(exported)
    ops = sorted({n.op_type for n in exported.graph.node})
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes), QAT accuracy on all digits {accuracy:.4f}, ops {ops}")


if __name__ == "__main__":
    main()
