"""Reading a bundle: schema major, checksums of files and folders, and safe .tar.gz extraction."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeopt.runtime import BundleError, load, open_bundle, sha256_path
from edgeopt.runtime.bundle import SCHEMA_VERSION, extract_bundle
from edgeopt.runtime.kinds import BackendName, Precision
from tests.runtime.factory import float_bundle, tiny_float_reference


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path / "cache"))


def test_schema_version_is_1_0() -> None:
    assert SCHEMA_VERSION == "1.0"


def test_sha256_of_a_file_is_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"edgeopt" * 1000)
    assert sha256_path(path) == hashlib.sha256(b"edgeopt" * 1000).hexdigest()


def test_sha256_of_a_folder_hashes_sorted_relative_paths_and_file_hashes(tmp_path: Path) -> None:
    folder = tmp_path / "model.mlpackage"
    (folder / "Data" / "weights").mkdir(parents=True)
    (folder / "Manifest.json").write_bytes(b"{}")
    (folder / "Data" / "weights" / "weight.bin").write_bytes(b"\x00\x01")
    lines = "".join(
        f"{rel}\0{hashlib.sha256(data).hexdigest()}\n"
        for rel, data in sorted([("Manifest.json", b"{}"), ("Data/weights/weight.bin", b"\x00\x01")])
    )
    assert sha256_path(folder) == hashlib.sha256(lines.encode()).hexdigest()


def test_a_bundle_folder_loads_and_runs(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "tiny-onnxruntime-cpu")
    x = np.ones((1, 4), np.float32)
    with load(bundle) as model:
        assert model.backend == "onnxruntime"
        assert model.bundle is not None and model.bundle.name == "tiny"
        np.testing.assert_allclose(model.predict({"x": x})["y"], tiny_float_reference(x), rtol=1e-6, atol=1e-6)


def test_a_changed_artifact_is_a_bundle_error_naming_the_file(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* does not match manifest\.json") as caught:
        load(bundle)
    assert "copy it again or rebuild" in caught.value.hint


def test_a_truncated_artifact_is_reported_by_size(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    (bundle / "reference" / "outputs.npz").write_bytes(b"short")
    with pytest.raises(BundleError, match=r"outputs\.npz: 5 bytes, manifest\.json says \d+"):
        load(bundle)


def test_a_missing_artifact_is_reported(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    (bundle / "reference" / "inputs.npz").unlink()
    with pytest.raises(BundleError, match=r"inputs\.npz: listed in manifest\.json but missing"):
        load(bundle)


def _edit_manifest(bundle: Path, **changes: object) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_another_schema_major_is_refused(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    _edit_manifest(bundle, schema_version="2.0")
    with pytest.raises(BundleError, match=r"bundle schema 2\.0, this runtime reads schema 1\.x"):
        load(bundle)


def test_a_newer_minor_version_is_accepted(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    _edit_manifest(bundle, schema_version="1.7", some_future_key={"ignored": True})
    with load(bundle) as model:
        assert model.inputs[0].name == "x"


def test_an_artifact_path_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = "../model.onnx"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"artifact path '\.\./model\.onnx' leaves the bundle"):
        load(bundle)


def test_a_manifest_that_is_not_json_is_a_bundle_error(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    (bundle / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load(bundle)


def _pack(bundle: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name)
    return archive


def test_a_tar_gz_bundle_is_extracted_once_into_the_cache_and_loads(tmp_path: Path) -> None:
    archive = _pack(float_bundle(tmp_path / "tiny-onnxruntime-cpu"), tmp_path / "tiny-onnxruntime-cpu.tar.gz")
    first = open_bundle(archive)
    second = open_bundle(archive)
    assert first.root == second.root
    assert first.root.is_relative_to(tmp_path / "cache")
    with load(archive) as model:
        assert model.predict(np.zeros((1, 4), np.float32))["y"].shape == (1, 3)


def _archive_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return archive


def test_a_tar_member_with_dotdot_is_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    archive = _archive_with(tmp_path, tarfile.TarInfo("bundle/../../escaped.txt"))
    with pytest.raises(BundleError, match=r"points outside the bundle \('\.\.'\)"):
        extract_bundle(archive, cache=tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()
    assert not any((tmp_path / "cache").iterdir())


def test_a_tar_member_with_an_absolute_path_is_rejected(tmp_path: Path) -> None:
    archive = _archive_with(tmp_path, tarfile.TarInfo("/tmp/edgeopt-absolute.txt"))
    with pytest.raises(BundleError, match="absolute path"):
        extract_bundle(archive, cache=tmp_path / "cache")


def test_a_symlink_pointing_outside_is_rejected(tmp_path: Path) -> None:
    link = tarfile.TarInfo("bundle/model.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    with pytest.raises(BundleError, match="points outside the bundle"):
        extract_bundle(_archive_with(tmp_path, link), cache=tmp_path / "cache")


def test_a_device_node_is_rejected(tmp_path: Path) -> None:
    device = tarfile.TarInfo("bundle/null")
    device.type = tarfile.CHRTYPE
    with pytest.raises(BundleError, match="device or fifo"):
        extract_bundle(_archive_with(tmp_path, device), cache=tmp_path / "cache")


def test_a_changed_cached_extraction_is_unpacked_afresh(tmp_path: Path) -> None:
    archive = _pack(float_bundle(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    extracted = open_bundle(archive).root
    (extracted / "model.onnx").write_bytes(b"changed on the device")
    with load(archive) as model:
        assert model.predict(np.zeros((1, 4), np.float32))["y"].shape == (1, 3)
    assert (extracted / "model.onnx").read_bytes() != b"changed on the device"


# -- paths stay inside the bundle -------------------------------------------------------------


def _rewrite_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _set_model(path: str):
    def edit(manifest: dict) -> None:
        manifest["runtime"]["model"] = path
    return edit


def _list_artifact(bundle: Path, relative: str):
    def edit(manifest: dict) -> None:
        manifest["artifacts"].append({"path": relative, "format": "onnx", "sha256": sha256_path(bundle / relative), "role": "model"})
    return edit


@pytest.mark.parametrize(
    "case, prepare, message",
    [
        ("runtime.model absolute", lambda b: _rewrite_manifest(b, _set_model("/etc/passwd")), r"runtime\.model path '/etc/passwd' leaves the bundle"),
        ("runtime.model up and out", lambda b: _rewrite_manifest(b, _set_model("../../etc/passwd")), r"runtime\.model path '\.\./\.\./etc/passwd' leaves the bundle"),
        (
            "runtime.model a link to /etc/passwd, not listed",
            lambda b: ((b / "evil.onnx").symlink_to("/etc/passwd"), _rewrite_manifest(b, _set_model("evil.onnx"))),
            r"runtime\.model path 'evil\.onnx' leaves the bundle \(it resolves to /etc/passwd\)",
        ),
        (
            "artifact a link to /etc/passwd, listed with its sha256",
            lambda b: ((b / "evil.onnx").symlink_to("/etc/passwd"), _rewrite_manifest(b, _list_artifact(b, "evil.onnx"))),
            r"artifact path 'evil\.onnx' leaves the bundle \(it resolves to /etc/passwd\)",
        ),
        (
            "artifact folder holding a link to /etc",
            lambda b: ((b / "model.mlpackage").mkdir(), (b / "model.mlpackage" / "Data").symlink_to("/etc"),
                       _rewrite_manifest(b, _list_artifact(b, "model.mlpackage"))),
            r"artifact path 'model\.mlpackage/Data' leaves the bundle \(it resolves to /etc\)",
        ),
        (
            "bundle folder itself reached through a link",
            lambda b: ((b / "inner").symlink_to(".."), _rewrite_manifest(b, _set_model("inner/b/model.onnx"))),
            None,  # resolves back inside: allowed
        ),
    ],
)
def test_a_manifest_path_that_resolves_outside_the_bundle_is_refused(case: str, prepare, message: str | None, tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    prepare(bundle)
    if message is None:
        assert open_bundle(bundle).model_path.resolve() == (bundle / "model.onnx").resolve()
        return
    with pytest.raises(BundleError, match=message) as caught:
        load(bundle)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("key", ["inputs", "outputs"])
def test_reference_files_outside_the_bundle_are_refused(key: str, tmp_path: Path) -> None:
    from edgeopt.runtime import verify

    bundle = float_bundle(tmp_path / "b")
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.zeros((3, 1, 4), np.float32), y=np.zeros((3, 1, 3), np.float32))
    (bundle / "reference" / "elsewhere.npz").symlink_to(outside)
    _rewrite_manifest(bundle, lambda m: m["reference"].__setitem__(key, "reference/elsewhere.npz"))
    with pytest.raises(BundleError, match=rf"reference\.{key} path 'reference/elsewhere\.npz' leaves the bundle"):
        verify(bundle)

    _rewrite_manifest(bundle, lambda m: m["reference"].__setitem__(key, "../outside.npz"))
    with pytest.raises(BundleError, match=rf"reference\.{key} path '\.\./outside\.npz' leaves the bundle"):
        verify(bundle)


# -- manifests with wrong types -----------------------------------------------------------------


def _setter(*keys_and_value):
    *keys, value = keys_and_value

    def edit(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


MALFORMED = {
    "inputs holds a number": (_setter("inputs", [1]), r"inputs\[0\] must be an object, found 1 \(int\)"),
    "inputs is an object": (_setter("inputs", {"x": 1}), r"inputs must be a list"),
    "artifact path a number": (_setter("artifacts", [{"path": 5, "sha256": "0"}]), r"artifacts\[0\]\.path must be a non-empty string"),
    "runtime.model a number": (_setter("runtime", "model", 7), r"runtime\.model must be a non-empty string"),
    "runtime missing": (lambda m: m.pop("runtime"), r"runtime must be an object, found missing"),
    "runtime.backend a list": (_setter("runtime", "backend", ["onnxruntime"]), r"runtime\.backend must be a non-empty string"),
    "runtime.threads a string": (_setter("runtime", "threads", "4"), r"runtime\.threads must be a whole number"),
    "runtime.options a list": (_setter("runtime", "options", [1]), r"runtime\.options must be an object"),
    "artifact bytes a string": (lambda m: m["artifacts"][0].__setitem__("bytes", "12"), r"artifacts\[0\]\.bytes must be a whole number"),
    "input shape a string": (lambda m: m["inputs"][0].__setitem__("shape", "1x4"), r"inputs\[0\]\.shape must be a list"),
    "input shape holds a float": (lambda m: m["inputs"][0].__setitem__("shape", [1, 4.5]), r"inputs\[0\]\.shape must be a list"),
    "input name a number": (lambda m: m["inputs"][0].__setitem__("name", 3), r"inputs\[0\]\.name must be a non-empty string"),
    "output dtype unknown": (lambda m: m["outputs"][0].__setitem__("dtype", "float99"), r"outputs\[0\]\.dtype must be a numpy dtype name"),
    "quantization scale a string": (
        lambda m: m["inputs"][0].__setitem__("quantization", {"scale": "0.1", "zero_point": 0}),
        r"inputs\[0\]\.quantization\.scale must be a number or a list of numbers",
    ),
    "reference a list": (_setter("reference", [1]), r"reference must be an object"),
    "reference inputs a number": (_setter("reference", "inputs", 1), r"reference\.inputs must be a non-empty string"),
    "tolerance atol a string": (_setter("reference", "tolerance", "atol", "1e-5"), r"reference\.tolerance\.atol must be a number"),
    "target.isa unknown": (_setter("target", {"isa": "z80"}), r"target\.isa must be one of"),
    "lowering a string": (_setter("lowering", "tensorrt"), r"lowering must be an object"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_manifest_with_a_wrong_type_is_exit_2_naming_the_key(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from click.testing import CliRunner

    from edgeopt.cli import cli
    from edgeopt.runtime.__main__ import main as runtime_main

    edit, message = MALFORMED[case]
    bundle = float_bundle(tmp_path / "b")
    _rewrite_manifest(bundle, edit)

    assert runtime_main(["info", str(bundle)]) == 2
    runtime_stderr = capsys.readouterr().err
    assert re.search(message, runtime_stderr), runtime_stderr
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output) and "Traceback" not in result.output, result.output


def test_an_unknown_precision_or_backend_is_named_with_the_known_ones(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    _rewrite_manifest(bundle, _setter("precision", "fp64"))
    with pytest.raises(BundleError, match=r"precision must be one of fp32, fp16, int8"):
        open_bundle(bundle)
    _rewrite_manifest(bundle, lambda m: (m.__setitem__("precision", "fp32"), m["runtime"].__setitem__("backend", "tvm")))
    with pytest.raises(BundleError, match=r"runtime\.backend must be one of onnxruntime, openvino"):
        open_bundle(bundle)


def test_the_typed_manifest_reads_and_writes_the_same_document(tmp_path: Path) -> None:
    """What a bundle's manifest.json says comes back from `Manifest.to_json` (keys of a newer minor kept)."""
    from edgeopt.runtime.manifest import Manifest

    bundle = float_bundle(tmp_path / "b")
    _edit_manifest(
        bundle,
        some_future_key={"kept": True},
        profiles=[{"host": "pi@pi", "time": "2026-01-01T00:00:00+00:00", "bench": {"latency_ms": {"p50": 1.0}}}],
        benchmarks=[{"time": "2026-01-02T00:00:00+00:00", "runs": 3}],
    )
    raw = json.loads((bundle / "manifest.json").read_text())
    manifest = open_bundle(bundle).contents
    assert manifest.precision is Precision.FP32 and manifest.runtime.backend is BackendName.ONNXRUNTIME
    assert manifest.reference is not None and manifest.reference.tolerance is not None and manifest.reference.tolerance.atol == 1e-5
    assert manifest.profiles[0].host == "pi@pi" and manifest.benchmarks[0].results == {"runs": 3}
    raw["target"]["isa"] = None  # written explicitly: no CPU class
    assert manifest.to_json() == raw
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_a_malformed_manifest_through_the_runtime_cli_process_exits_2_without_traceback(tmp_path: Path) -> None:
    bundle = float_bundle(tmp_path / "b")
    _rewrite_manifest(bundle, _setter("inputs", [1]))
    done = subprocess.run([sys.executable, "-m", "edgeopt.runtime", "info", str(bundle)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "inputs[0] must be an object" in done.stderr and "Traceback" not in done.stderr
