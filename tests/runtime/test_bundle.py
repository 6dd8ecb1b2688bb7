"""Reading a bundle: schema major, checksums of files and folders, and safe .tar.gz extraction."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeopt.runtime import BundleError, load, open_bundle, sha256_path
from edgeopt.runtime.bundle import SCHEMA_VERSION, extract_bundle
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
