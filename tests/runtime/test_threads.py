"""predict from several threads on one loaded model: every result equals the single-threaded one.

Device apps call predict from worker threads. ONNX Runtime's session.run is thread-safe; the
OpenVINO backend gives each thread its own infer request; LiteRT's interpreter (and Core ML,
TensorRT) runs one call at a time behind a lock. Real threads, real libraries, the digits model.
"""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeopt.runtime import load

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
THREADS = 4
CALLS = 100  # per thread, each on its own input (eval.npz holds 450)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits model as ONNX, OpenVINO IR and .tflite (fp32), as `edgeopt build` lowers them."""
    import openvino

    from edgeopt.converters.lower import LoweringOptions
    from edgeopt.converters.lower.tflite import lower_to_bytes

    folder = tmp_path_factory.mktemp("digits")
    onnx_file = folder / "model.onnx"
    shutil.copyfile(DIGITS / "model.onnx", onnx_file)
    xml = folder / "model.xml"
    openvino.save_model(openvino.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    tflite = folder / "model.tflite"
    tflite.write_bytes(lower_to_bytes(onnx.load(onnx_file), "fp32", LoweringOptions())[0])
    return {"onnxruntime": onnx_file, "openvino": xml, "tflite": tflite}


@pytest.fixture
def busy_switching():
    """Switch threads as often as the interpreter allows, so interleavings are many."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tflite"])
def test_predict_from_four_threads_matches_single_threaded(artifacts: dict[str, Path], backend: str, busy_switching) -> None:
    images = np.load(DIGITS / "eval.npz")["image"][: THREADS * CALLS].astype(np.float32)
    with load(artifacts[backend], threads=1) as model:
        assert model.backend == backend
        expected = [model(image[None]).copy() for image in images]
        results: list[np.ndarray | None] = [None] * len(images)
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def work(first: int) -> None:
            start.wait()
            for index in range(first, len(images), THREADS):
                try:
                    results[index] = model(images[index][None])
                except Exception as error:  # noqa: BLE001 - every failure is counted, none is lost
                    errors.append(error)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    wrong = [i for i, (got, want) in enumerate(zip(results, expected)) if got is None or not np.array_equal(got, want)]
    print(f"{backend}: {THREADS} threads x {CALLS} predicts: {len(wrong)} wrong of {len(images)}, {len(errors)} exceptions")
    assert errors == []
    assert wrong == []
