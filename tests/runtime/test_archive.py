"""safe_extract against hostile archives, on both paths: with `tarfile.data_filter` as an extra
check, and without it (Python 3.11.2 on Debian 12 / Raspberry Pi OS has none), where the
helper's own checks are all there is. Each refusal is a BundleError and nothing lands outside
the destination."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from edgeopt.runtime.archive import MAX_BYTES, MAX_MEMBERS, safe_extract
from edgeopt.runtime.errors import BundleError


@pytest.fixture(params=["fallback", "data_filter"])
def use_data_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both extraction paths; the fallback one runs as on a Python without tarfile.data_filter."""
    if request.param == "fallback":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
        return False
    if not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile.data_filter")
    return True


def _file(name: str, data: bytes = b"pwned\n") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


HOSTILE = {
    "symlink chain a -> ., a/b -> .., file through a/b": (
        [_link("a", "."), _link("a/b", ".."), _file("a/b/escaped.txt")],
        "goes through the link 'a'",
    ),
    "symlink chain via a link target (c -> a/..)": (
        [_link("a", "."), _link("c", "a/.."), _file("c/escaped.txt")],
        "goes through the link",
    ),
    "absolute path": ([_file("/tmp/edgeopt-absolute-escape.txt")], "absolute path"),
    "dotdot": ([_file("bundle/../../escaped.txt")], r"points outside the bundle \('\.\.'\)"),
    "drive letter": ([_file("C:/escaped.txt")], "drive letter"),
    "symlink to /etc": ([_link("bundle/model.onnx", "/etc/passwd")], "points outside the bundle"),
    "symlink up and out": ([_link("bundle/model.onnx", "../../etc/passwd")], "points outside the bundle"),
    "hard link outside": ([_link("bundle/model.onnx", "/etc/passwd", tarfile.LNKTYPE)], "absolute path"),
    "hard link up and out": ([_link("bundle/model.onnx", "../escaped.txt", tarfile.LNKTYPE)], "outside the bundle"),
    "hard link to no earlier file": ([_link("bundle/model.onnx", "bundle/later", tarfile.LNKTYPE), _file("bundle/later")], "earlier file"),
    "fifo": ([_special("bundle/pipe", tarfile.FIFOTYPE)], "device or fifo"),
    "character device": ([_special("bundle/null", tarfile.CHRTYPE)], "device or fifo"),
    "block device": ([_special("bundle/disk", tarfile.BLKTYPE)], "device or fifo"),
    "file through a symlinked folder": (
        [_link("bundle/out", "../.."), _file("bundle/out/escaped.txt")],
        "points outside the bundle",
    ),
    "file through an inside symlinked folder": (
        [_file("bundle/real/keep.txt"), _link("bundle/alias", "real"), _file("bundle/alias/escaped.txt")],
        "goes through the link 'bundle/alias'",
    ),
    "member twice (file, then symlink over it)": (
        [_file("bundle/model.onnx"), _link("bundle/model.onnx", "/etc/passwd")],
        "appears twice|points outside",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_archive_is_refused_and_writes_nothing_outside(case: str, use_data_filter: bool, tmp_path: Path) -> None:
    members, message = HOSTILE[case]
    archive = _archive(tmp_path / "evil.tar.gz", members)
    destination = tmp_path / "deep" / "down" / "destination"
    destination.mkdir(parents=True)
    before = _tree(tmp_path, destination)

    with pytest.raises(BundleError, match=message) as raised:
        safe_extract(archive, destination, use_data_filter=use_data_filter)

    assert str(archive) in str(raised.value)
    assert _tree(tmp_path, destination) == before
    assert not Path("/tmp/edgeopt-absolute-escape.txt").exists()


def test_a_member_larger_than_the_cap_is_refused_before_anything_is_written(use_data_filter: bool, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "bomb.tar.gz", [_file("bundle/small", b"x" * 10), _file("bundle/big", b"\0" * 5000)])
    destination = tmp_path / "destination"
    destination.mkdir()

    with pytest.raises(BundleError, match=r"unpacks to more than 4,096 bytes \(the cap on unpacked bytes; member 'bundle/big' declares 5,000 bytes\)"):
        safe_extract(archive, destination, max_bytes=4096, use_data_filter=use_data_filter)

    assert list(destination.iterdir()) == []


def test_hard_links_count_towards_the_size_cap(use_data_filter: bool, tmp_path: Path) -> None:
    members = [_file("bundle/data", b"x" * 1000)] + [_link(f"bundle/copy{i}", "bundle/data", tarfile.LNKTYPE) for i in range(5)]
    destination = tmp_path / "destination"
    destination.mkdir()

    with pytest.raises(BundleError, match="the cap on unpacked bytes"):
        safe_extract(_archive(tmp_path / "links.tar.gz", members), destination, max_bytes=4000, use_data_filter=use_data_filter)


def test_too_many_members_are_refused(use_data_filter: bool, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "many.tar.gz", [_file(f"bundle/f{i}", b"") for i in range(50)])
    destination = tmp_path / "destination"
    destination.mkdir()

    with pytest.raises(BundleError, match=r"more than 20 members \(the cap on archive entries\)"):
        safe_extract(archive, destination, max_members=20, use_data_filter=use_data_filter)

    assert list(destination.iterdir()) == []


def test_the_default_caps_are_generous_for_real_bundles() -> None:
    assert MAX_BYTES == 4 << 30
    assert MAX_MEMBERS == 10_000


def test_a_damaged_archive_is_a_bundle_error(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "good.tar.gz", [_file("bundle/model.onnx", os.urandom(100_000))])
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    destination = tmp_path / "destination"
    destination.mkdir()

    with pytest.raises(BundleError, match="cannot unpack"):
        safe_extract(archive, destination)


def test_a_good_archive_extracts_byte_identically_with_links_inside(use_data_filter: bool, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    info, _ = _file("bundle/model.bin", payload)
    info.mode = 0o644
    script, _ = _file("bundle/run.sh", b"#!/bin/sh\n")
    script.mode = 0o755
    folder = tarfile.TarInfo("bundle/reference")
    folder.type = tarfile.DIRTYPE
    members = [
        (folder, None),
        (info, payload),
        (script, b"#!/bin/sh\n"),
        _file("bundle/reference/inputs.npz", b"npz bytes"),
        _link("bundle/reference/model.bin", "../model.bin"),
        _link("bundle/weights.bin", "bundle/model.bin", tarfile.LNKTYPE),
    ]
    destination = tmp_path / "destination"
    destination.mkdir()

    safe_extract(_archive(tmp_path / "good.tar.gz", members), destination, use_data_filter=use_data_filter)

    bundle = destination / "bundle"
    assert (bundle / "model.bin").read_bytes() == payload
    assert (bundle / "weights.bin").read_bytes() == payload
    assert (bundle / "reference" / "model.bin").read_bytes() == payload
    assert os.readlink(bundle / "reference" / "model.bin") == "../model.bin"
    assert (bundle / "reference" / "inputs.npz").read_bytes() == b"npz bytes"
    assert os.access(bundle / "run.sh", os.X_OK) and not os.access(bundle / "model.bin", os.X_OK)


def _tree(root: Path, destination: Path) -> list[str]:
    """Every path under root except the destination's own contents."""
    return sorted(str(p) for p in root.rglob("*") if not p.is_relative_to(destination) or p == destination)
