"""What `build` may replace, and that a failed write leaves the previous bundle and archive as they were.

A full disk is simulated for real with RLIMIT_FSIZE in a child process (SIGXFSZ ignored, so a write
past the limit fails with EFBIG as it would with ENOSPC): no tmpfs needs mounting, no root needed.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgeopt
from edgeopt.errors import OutputError

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
MODEL = DIGITS / "model.onnx"


def _build(output: Path | str, **options: object) -> edgeopt.BuildResult:
    return edgeopt.build(MODEL, "ort", output=output, force=True, **options)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


def test_force_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "train.py").write_text("keep me")
    with pytest.raises(OutputError, match="not an edgeopt bundle") as caught:
        _build(project)
    assert str(project) in str(caught.value) and caught.value.exit_code == 2
    assert (project / "train.py").read_text() == "keep me" and (project / ".git").is_dir()


def test_force_refuses_a_folder_whose_manifest_edgeopt_did_not_write(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "a web app manifest"}')
    with pytest.raises(OutputError, match="not an edgeopt bundle"):
        _build(other)
    assert (other / "manifest.json").is_file()


@pytest.mark.parametrize("output", [".", "..", "~"])
def test_force_refuses_the_current_folder_its_parents_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    (tmp_path / "home" / "elsewhere").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "elsewhere"))
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="current folder, one of its parents or home"):
        _build(Path(output).expanduser())
    assert (work / "notes.txt").read_text() == "keep me"


def test_force_refuses_a_plain_file(tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.write_text("a file")
    with pytest.raises(OutputError, match="not a folder"):
        _build(target)
    assert target.read_text() == "a file"


def test_force_replaces_a_bundle_and_an_empty_folder(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    first = _build(bundle).manifest["created_at"]
    assert (bundle / "manifest.json").is_file() and first
    _build(bundle)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_build(empty).bundle / "manifest.json").is_file()
    assert _leftovers(tmp_path) == []


def test_archive_force_replaces_only_a_tar_gz(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    not_an_archive = tmp_path / "b.tar.gz"
    not_an_archive.write_text("my notes")
    with pytest.raises(OutputError, match="not a .tar.gz archive"):
        _build(bundle, archive=True)
    assert not_an_archive.read_text() == "my notes" and not bundle.exists()
    not_an_archive.unlink()
    _build(bundle, archive=True)
    result = _build(bundle, archive=True)
    assert result.archive == not_an_archive and result.archive.stat().st_size > 0
    assert _leftovers(tmp_path) == []


def _build_with_file_size_limit(tmp_path: Path, output: Path, limit: int) -> subprocess.CompletedProcess[str]:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "edgeopt.cli", "build", str(MODEL), "-t", "ort", "-o", str(output), "--force", "--archive", "-q"]
    return subprocess.run(command, cwd=tmp_path, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["archive", "bundle"])
def test_a_full_disk_leaves_the_previous_bundle_and_archive(tmp_path: Path, where: str) -> None:
    """Limit between the largest bundle file and the archive: packing fails; below the model: the bundle's write fails."""
    bundle = tmp_path / "b"
    previous = _build(bundle, archive=True)
    manifest_sha, archive_sha = _sha(bundle / "manifest.json"), _sha(previous.archive)
    model_bytes = (bundle / "model.onnx").stat().st_size
    largest_file = max(f.stat().st_size for f in bundle.rglob("*") if f.is_file())  # the report can outgrow the model
    archive_bytes = previous.archive.stat().st_size
    assert archive_bytes > largest_file, "no file-size limit separates the bundle's files from the archive"
    limit = (largest_file + archive_bytes) // 2 if where == "archive" else model_bytes // 2
    proc = _build_with_file_size_limit(tmp_path, bundle, limit)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: cannot write" in proc.stderr and os.strerror(27) in proc.stderr  # EFBIG: File too large
    assert (where == "archive") == ("b.tar.gz" in proc.stderr)
    assert _sha(bundle / "manifest.json") == manifest_sha and _sha(previous.archive) == archive_sha
    assert _leftovers(tmp_path) == []


def test_a_signal_during_the_swap_into_place_is_delivered_after_it() -> None:
    """Between moving the previous bundle aside and renaming the new one in, an interrupt would leave
    neither at the output path: the swap defers SIGINT/SIGTERM and re-raises it once done."""
    from edgeopt.bundle import _signals_deferred

    steps = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever an earlier test left
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                signal.raise_signal(signal.SIGINT)  # to this thread: os.kill may reach another one, later
                time.sleep(0.05)
                steps.append("swapped")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == ["swapped"]
