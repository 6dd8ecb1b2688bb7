"""First-order Taylor importance (`--prune-criterion taylor`) on the digits CNN, with no labels.

What a channel's score must say is how much the model's outputs move when that channel goes. The
truth is measured here directly: for each of the 32 channels of the digits CNN's second conv, the
original model with that channel's consumer slice zeroed (the zero-equivalence oracle's model, one
channel at a time) is run by ONNX Runtime on 150 eval samples the scores never saw, and its mean KL
from the unpruned model's predictions is that channel's damage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")

from edgeopt.converters.graph.session import run_model  # noqa: E402
from edgeopt.converters.passes import simplify  # noqa: E402
from edgeopt.converters.prune import PruneOptions, prune  # noqa: E402
from edgeopt.converters.prune.groups import analyze  # noqa: E402
from edgeopt.converters.prune.importance import layer_taylor_scores  # noqa: E402
from edgeopt.runtime.errors import OptionError  # noqa: E402
from edgeopt.runtime.kinds import PruneCriterion  # noqa: E402
from tests.converters.test_prune_graphs import assert_zero_equivalent  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
CONV = "/features/features.3/Conv"  # 32 channels, read by the classifier Gemm through Flatten
GEMM = "/classifier/Gemm"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> onnx.ModelProto:
    return simplify(onnx.load(DIGITS / "model.onnx"))[0]


@pytest.fixture(scope="module")
def calibration() -> tuple[dict[str, np.ndarray], ...]:
    images = np.load(DIGITS / "calib.npz")["image"]
    return tuple({"image": images[i : i + 1]} for i in range(64))


def _scores(model: onnx.ModelProto, samples: tuple[dict[str, np.ndarray], ...]) -> np.ndarray:
    ir_model = ir.from_proto(model)
    return layer_taylor_scores(ir_model, analyze(ir_model, ()), samples)[CONV]


def _with_consumer_slice_zeroed(model: onnx.ModelProto, channel: int) -> onnx.ModelProto:
    """The classifier reads channel c as a block of H·W Flatten features: zero that block of its weight."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    gemm = next(node for node in copy.graph.node if node.name == GEMM)
    weight = next(init for init in copy.graph.initializer if init.name == gemm.input[1])
    array = numpy_helper.to_array(weight).copy()
    block = array.shape[1] // 32
    array[:, channel * block : (channel + 1) * block] = 0
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    return copy


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_taylor_ranks_channels_by_the_damage_their_removal_does_better_than_filter_norms(
    digits: onnx.ModelProto, calibration: tuple[dict[str, np.ndarray], ...]
) -> None:
    images = np.load(DIGITS / "eval.npz")["image"][:150]
    unseen = [{"image": images[i : i + 1]} for i in range(len(images))]
    output = digits.graph.output[0].name

    def logits(model: onnx.ModelProto) -> np.ndarray:
        return np.concatenate([result[output] for result in run_model(model, unseen)])

    reference = _log_softmax(logits(digits))
    damage = np.array(
        [float((np.exp(reference) * (reference - _log_softmax(logits(_with_consumer_slice_zeroed(digits, c))))).sum(-1).mean()) for c in range(32)]
    )
    taylor = _scores(digits, calibration)
    conv = next(node for node in ir.from_proto(digits).graph if node.name == CONV)
    weight = conv.inputs[1].const_value.numpy()
    l2 = np.linalg.norm(weight.reshape(32, -1), axis=1)
    assert taylor.shape == (32,) and (taylor >= 0).all()
    # measured 0.82 (L2 0.21): the criterion blind to the data stays far below
    assert _spearman(taylor, damage) >= 0.7 > _spearman(l2, damage) + 0.3
    # the 12 channels each criterion would drop first: Taylor's do less harm
    assert damage[np.argsort(taylor)[:12]].sum() < damage[np.argsort(l2)[:12]].sum()


def test_a_channel_nothing_reads_scores_zero_and_goes_first_though_its_filter_is_large(
    digits: onnx.ModelProto, calibration: tuple[dict[str, np.ndarray], ...]
) -> None:
    conv = next(node for node in ir.from_proto(digits).graph if node.name == CONV)
    largest = int(np.argmax(np.linalg.norm(conv.inputs[1].const_value.numpy().reshape(32, -1), axis=1)))
    unread = _with_consumer_slice_zeroed(digits, largest)
    scores = _scores(unread, calibration)
    assert scores[largest] == 0.0 and (np.delete(scores, largest) > 0).all()
    options = PruneOptions(ratio=0.4, criterion=PruneCriterion.TAYLOR, samples=calibration)
    feeds = list(calibration[:4])
    _, report = assert_zero_equivalent(unread, options, feeds)  # pruned == original with the removed channels zeroed
    assert report["criterion"] == "taylor" and report["samples"] == 64 and report["bn_fallback_layers"] == 0
    step_keep = _kept_channels(unread, options)
    assert largest not in step_keep and len(step_keep) == 20
    assert largest in _kept_channels(unread, PruneOptions(ratio=0.4, criterion=PruneCriterion.L2))


def _kept_channels(model: onnx.ModelProto, options: PruneOptions) -> list[int]:
    from edgeopt.converters.prune import PruneChannelsPass

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    step = PruneChannelsPass(options)
    ir_model = ir.from_proto(copy)
    source = next(s for s in analyze(ir.from_proto(model), ()).sources if s.node.name == CONV)
    step(ir_model)
    assert step.kept_atoms is not None
    return np.flatnonzero(step.kept_atoms[source.atoms]).tolist()


def test_taylor_without_calibration_data_or_with_too_little_is_an_option_error(digits: onnx.ModelProto) -> None:
    with pytest.raises(OptionError, match="taylor criterion ranks channels on calibration data"):
        prune(digits, PruneOptions(ratio=0.4, criterion=PruneCriterion.TAYLOR))
    few = tuple({"image": np.zeros((1, 1, 8, 8), np.float32)} for _ in range(3))
    with pytest.raises(OptionError, match="at least 8 calibration samples"):
        prune(digits, PruneOptions(ratio=0.4, criterion=PruneCriterion.TAYLOR, samples=few))


def test_without_torch_taylor_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from edgeopt.runtime.errors import BackendUnavailableError\n"
        "import edgeopt.converters.prune\n"  # the other criteria need no torch
        "try:\n    import edgeopt.converters.prune.taylor\nexcept BackendUnavailableError as e:\n    print('HINT', e.hint)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HINT pip install 'edgeopt[train]'" in result.stdout, result.stderr
