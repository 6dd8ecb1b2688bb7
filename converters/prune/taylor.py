"""First-order Taylor importance on calibration data, without labels (the `train` extra: needs torch).

Removing output channel c of a layer sets its activation a_c to zero; to first order the model's
outputs move by Δy ≈ −∂y/∂a_c · a_c, and the change in a loss ℓ is a_c · ∂ℓ/∂a_c summed over the
channel's positions (Molchanov et al., CVPR 2019, the gate after each layer; Torch-Pruning's
TaylorImportance takes the same product on the weights, w · ∂ℓ/∂w, with the user's task loss).

Which loss, with no labels: the loss recovery minimises — distillation to the unpruned model — is
zero with a zero gradient at the unpruned model, so its first-order term says nothing. Its growth
when a channel goes is second order in the output change, and that is what a channel scores:

- a classifier output (logits or probabilities, as `finetune.losses.output_kinds` tells them):
  distillation's T²·KL at T = 2 (`FinetuneOptions.temperature`) grows by ½·Var_p(Δz) per row, the
  variance of the logit change under the tempered prediction p (the Fisher information's quadratic
  form). With d_k = Σ a_c · ∂z_k/∂a_c, one backward pass per logit, it is exact to first order in
  the channel; rows × classes above `EXACT_LOGITS` (a recogniser's per-position alphabet) use
  one label drawn from p instead: the cross-entropy's gradient has the same expectation square.
- any other output (maps, boxes, embeddings) gets v · y / ‖y‖ with v drawn from N(0, I):
  E[(v · Δy)²] = ‖Δy‖² / ‖y‖², the normalized MSE `finetune.losses` distils with.

Measured on the digits CNN against the true KL of removing each of its second conv's 32 channels
alone (150 unseen eval samples, 64 calibration samples; Spearman): the exact form 0.82 at T = 2
(0.46 at T = 1, where a confident classifier's Fisher lives on the few samples near a boundary;
0.72 at T = 4), one drawn label 0.14-0.55 at T = 2 over 5 seeds, the L2 filter norm 0.21,
Torch-Pruning's label-free `model(x).sum()` ("a dummy loss" in its tests and README_CN) 0.20.

A channel's score is the root mean square over the calibration samples: the size of the output
change its removal causes (Molchanov's squared product without the root; the root keeps scores in
the units of the change, so that a unit's score, the sum over the layers it ties, adds like the
filter norms do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from edgeopt.converters.finetune.interpreter import TrainableGraph  # BackendUnavailableError without torch
from edgeopt.converters.finetune.losses import OutputKind, output_kinds
from edgeopt.converters.finetune.train import FinetuneOptions
from edgeopt.runtime.errors import OptionError

import torch  # after finetune, whose import says how to install it

__all__ = ["SAMPLES", "taylor_scores"]

#: Calibration samples the build and `edgeopt prune` give the criterion.
SAMPLES = 64

#: Fewest samples: the score is a mean over them.
MIN_SAMPLES = 8

#: Up to this many logits per sample a classifier's term is exact (one backward pass each).
EXACT_LOGITS = 64


def taylor_scores(
    model: onnx.ModelProto,
    layers: Mapping[str, tuple[str, int]],
    samples: Sequence[Mapping[str, np.ndarray]],
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """RMS over the samples of the output change removing each channel causes, by layer name.

    layers: {layer node name: (its output's name, that output's channel axis)}; samples: calibration
    inputs as the model takes them (each with its batch axis). Runs the fp32 graph with
    converters/finetune's interpreter, one sample at a time (per-sample products, and a graph fixed
    to batch 1 runs as it is). `progress(done, total)` after each sample.

    One torch thread: a batch-1 sample's small kernels gain little from more, and on a shared 2-core
    machine (load 12) torch's two spinning intra-op threads took 75-110 s for 8 ppocr_cls samples
    against 3.6-3.9 s with one.
    """
    if len(samples) < MIN_SAMPLES:
        raise OptionError(
            f"the taylor criterion needs at least {MIN_SAMPLES} calibration samples, got {len(samples)}",
            hint="pass more representative inputs with --calibration, or use --prune-criterion l2",
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _taylor_scores(TrainableGraph(model).eval(), layers, samples, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _taylor_scores(
    graph: TrainableGraph, layers: Mapping[str, tuple[str, int]], samples: Sequence[Mapping[str, np.ndarray]], seed: int, progress: Callable[[int, int], None] | None
) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    temperature = FinetuneOptions().temperature
    names = list(layers)
    captured = [layers[name][0] for name in names]
    axes = [layers[name][1] for name in names]
    totals: list[torch.Tensor] | None = None
    kinds: dict[str, OutputKind] | None = None
    for done, sample in enumerate(samples, 1):
        feeds = {name: torch.from_numpy(np.array(sample[name])) for name in graph.input_names}
        values = graph(feeds, capture=captured)
        outputs = {name: values[name] for name in graph.output_names if values[name].is_floating_point()}
        if not outputs:
            raise OptionError("the taylor criterion needs a float output to measure channels against; this model has none", hint="use --prune-criterion l2")
        if kinds is None:
            kinds = output_kinds({name: value.detach() for name, value in outputs.items()})
        activations = [values[name] for name in captured]

        def products(scalar: torch.Tensor) -> list[torch.Tensor]:
            """Σ a_c · ∂scalar/∂a_c per channel of every layer."""
            gradients = torch.autograd.grad(scalar, activations, retain_graph=True, allow_unused=True)
            return [
                torch.zeros(a.shape[axis % a.dim()], dtype=torch.float64) if g is None else _per_channel(a.detach() * g, axis % a.dim())
                for a, g, axis in zip(activations, gradients, axes)
            ]

        squares = [_squared_change(value, kinds[name], products, generator, temperature) for name, value in outputs.items()]
        summed = [sum(per_output[i] for per_output in squares) for i in range(len(names))]
        totals = summed if totals is None else [t + s for t, s in zip(totals, summed)]
        if progress is not None:
            progress(done, len(samples))
    assert totals is not None
    return {name: np.sqrt(total.numpy() / len(samples)) for name, total in zip(names, totals)}


def _squared_change(
    value: torch.Tensor, kind: OutputKind, products: Callable[[torch.Tensor], list[torch.Tensor]], generator: torch.Generator, temperature: float
) -> list[torch.Tensor]:
    """Per layer, per channel: the growth of this output's distillation loss when the channel goes (module docstring)."""
    if kind is OutputKind.REGRESSION:
        direction = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return [p.square() for p in products((direction * value).sum() / value.detach().square().sum().sqrt().clamp_min(1e-12))]
    rows = value.reshape(-1, value.shape[-1])
    logits = rows if kind is OutputKind.LOGITS else rows.clamp_min(1e-8).log()
    tempered = torch.softmax(logits.detach().double() / temperature, dim=-1)
    if rows.numel() > EXACT_LOGITS:
        drawn = torch.multinomial(tempered.float(), 1, generator=generator)
        cross_entropy = -torch.log_softmax(logits / temperature, dim=-1).gather(1, drawn).sum()
        return [p.square() * temperature**2 / 2 for p in products(cross_entropy)]
    per_logit = [products(logits[r, k]) for r in range(rows.shape[0]) for k in range(rows.shape[1])]
    result = []
    for layer in range(len(per_logit[0])):
        d = torch.stack([changes[layer] for changes in per_logit]).reshape(*rows.shape, -1)  # (rows, classes, channels)
        p = tempered[:, :, None]
        mean = (p * d).sum(dim=1, keepdim=True)
        result.append(0.5 * (p * (d - mean).square()).sum(dim=(0, 1)))
    return result


def _per_channel(product: torch.Tensor, axis: int) -> torch.Tensor:
    """Σ over every position of the channel (batch and spatial axes)."""
    return product.double().movedim(axis, 0).reshape(product.shape[axis], -1).sum(dim=1)
