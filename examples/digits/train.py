"""Train the small digits CNN and export it with its calibration and evaluation data.

    python examples/digits/train.py [--out examples/digits]

Writes ``model.onnx`` (input ``image`` [1, 1, 8, 8] float32 = pixels / 16, output ``logits`` [1, 10]),
``calib.npz`` (``image``: 128 training samples) and ``eval.npz`` (``image`` and ``labels``: the
held-out split). Needs torch and scikit-learn (``pip install edgeopt[train] scikit-learn``); the data
is scikit-learn's bundled digits set, so nothing is downloaded. Seeds are fixed, so a rerun on the
same torch version reproduces the files.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
CALIBRATION_SAMPLES = 128
EPOCHS = 40
DROPOUT = 0.25


class DigitsCNN(nn.Module):
    """Two Conv+BatchNorm+ReLU stages, a max pool, dropout and a linear (Gemm) classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.dropout = nn.Dropout(DROPOUT)
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.dropout(self.features(image)), 1))


def load_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images as (N, 1, 8, 8) float32 in [0, 1] and int64 labels, split 75/25 stratified."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.25, random_state=SEED, stratify=labels)


def train(images: np.ndarray, labels: np.ndarray) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def export(model: DigitsCNN) -> onnx.ModelProto:
    """Export at opset 17, keeping BatchNorm and Dropout as nodes.

    The TorchScript exporter drops Dropout in eval mode; exporters such as tf2onnx keep it as an
    inference-mode Dropout. It is put back here so the example exercises edgeopt's simplify stage
    (BatchNorm folding, identity removal) the way real-world exports do.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            do_constant_folding=False,
        )
    ir_model = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
    graph = ir_model.graph
    flatten = next(node for node in graph if node.op_type == "Flatten")
    ratio = ir.Value(name="dropout_ratio", const_value=ir.tensor(np.array(DROPOUT, np.float32), name="dropout_ratio"))
    graph.register_initializer(ratio)
    dropout = ir.node("Dropout", [flatten.inputs[0], ratio], name="/dropout/Dropout")
    dropout.outputs[0].name = "/dropout/Dropout_output_0"
    graph.insert_before(flatten, dropout)
    flatten.replace_input_with(0, dropout.outputs[0])
    proto = ir.to_proto(ir_model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    predictions = [int(np.argmax(session.run(None, {"image": image[None]})[0])) for image in images]
    return float(np.mean(np.asarray(predictions) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    torch.set_num_threads(1)

    train_images, eval_images, train_labels, eval_labels = load_splits()
    model = export(train(train_images, train_labels))

    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, args.out / "model.onnx")
    calibration = train_images[np.random.default_rng(SEED).permutation(len(train_images))[:CALIBRATION_SAMPLES]]
    np.savez(args.out / "calib.npz", image=calibration)
    np.savez(args.out / "eval.npz", image=eval_images, labels=eval_labels)
    print(f"held-out accuracy (ONNX Runtime, {len(eval_labels)} images): {accuracy(model, eval_images, eval_labels):.4f}")


if __name__ == "__main__":
    main()
