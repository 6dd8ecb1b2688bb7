"""Writing bundles: atomic folders with a manifest, checksummed artifacts and reference data.

Reading and checking bundles is the runtime's job (`edgeopt.runtime.bundle`), so a device and
this host verify the same way; this module only writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from edgeopt.errors import OutputError
from edgeopt.runtime.bundle import SCHEMA_VERSION, sha256_path
from edgeopt.runtime.bundle import read_manifest as runtime_read_manifest
from edgeopt.runtime.manifest import Artifact, Manifest

__all__ = [
    "SCHEMA_VERSION",
    "append_history",
    "artifact_entry",
    "atomic_output",
    "finite_or_null",
    "measured_artifact",
    "pack",
    "read_manifest",
    "toolchain_fingerprint",
    "write_manifest",
]

T = TypeVar("T")

_TOOLCHAIN_PACKAGES = {
    "numpy": "numpy",
    "onnx": "onnx",
    "onnx_ir": "onnx-ir",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "coremltools": "coremltools",
    "ai_edge_litert": "ai-edge-litert",
    "tensorrt": "tensorrt",
    "torch": "torch",
}


def toolchain_fingerprint(used: set[str]) -> dict[str, str]:
    """Versions of Python and of each library in `used` that is installed."""
    versions = {"python": platform.python_version()}
    for key in sorted(used):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[key] = importlib.metadata.version(_TOOLCHAIN_PACKAGES.get(key, key))
    return versions


def measured_artifact(bundle_dir: Path, relpath: str, fmt: str, role: str) -> Artifact:
    """The manifest entry of a file or folder in the bundle: its byte count and sha256 as it is now."""
    path = bundle_dir / relpath
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return Artifact(path=relpath, format=fmt, bytes=size, sha256=sha256_path(path), role=role)


def artifact_entry(bundle_dir: Path, relpath: str, fmt: str, role: str) -> dict[str, Any]:
    """`measured_artifact` as JSON, for scripts that edit a manifest document (`read_manifest`)."""
    return dict(measured_artifact(bundle_dir, relpath, fmt, role).to_json())


def _check_writable(output: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists (without --force), is not ours to replace, or cannot be written."""
    if output.exists() or output.is_symlink():
        if not force:
            raise OutputError(f"output '{output}' already exists", hint="pass --force to replace it, or choose another -o")
        _check_replaceable(output)
    parent = output.parent if output.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder '{parent}': {exc.strerror}", hint="choose a writable -o") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder '{parent}' is not writable", hint="choose a writable -o")


def _check_replaceable(output: Path) -> None:
    """--force replaces an edgeopt bundle or an empty folder, nothing else: never `.`, a parent of
    the current folder, home, a link, a plain file, or a folder of someone's work."""
    resolved = output.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise OutputError(
            f"refusing to replace '{output}' ({resolved}): it is the current folder, one of its parents or home",
            hint="choose a new folder for -o, e.g. -o dist/model",
        )
    if output.is_symlink() or not output.is_dir():
        raise OutputError(
            f"refusing to replace '{output}': it is not a folder (--force replaces only an edgeopt bundle)",
            hint="remove it yourself if it should go, or choose another -o",
        )
    if not any(output.iterdir()):
        return
    from edgeopt.runtime.errors import BundleError

    try:
        read_manifest(output)
    except BundleError as exc:
        raise OutputError(
            f"refusing to replace '{output}': it is not an edgeopt bundle ({exc.message})",
            hint="--force replaces only a folder edgeopt built; remove it yourself if it should go, or choose another -o",
        ) from None


def _check_archive_replaceable(archive: Path, force: bool) -> None:
    """The `<bundle>.tar.gz` that --archive writes: replace only a gzip-compressed tar (with --force)."""
    if not (archive.exists() or archive.is_symlink()):
        return
    if not force:
        raise OutputError(f"archive '{archive}' already exists", hint="pass --force to replace it, or choose another -o")
    if archive.is_symlink() or not archive.is_file() or not _is_tar_gz(archive):
        raise OutputError(
            f"refusing to replace '{archive}': it is not a .tar.gz archive (--force replaces only a bundle archive)",
            hint="remove it yourself if it should go, or choose another -o",
        )


def _is_tar_gz(path: Path) -> bool:
    try:
        with path.open("rb") as raw:
            if raw.read(2) != b"\x1f\x8b":
                return False
        with tarfile.open(path, "r:gz") as tar:
            tar.next()
        return True
    except (OSError, tarfile.TarError, EOFError):
        return False


@contextlib.contextmanager
def atomic_output(output: Path, force: bool, archive: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `output` (and, with `archive`, its
    packed `<output>.tar.gz` replaces the previous one), on failure or interrupt both vanish and the
    previous bundle and archive stay as they were. Write errors become OutputError."""
    _check_writable(output, force)
    archive_path = output.with_name(output.name + ".tar.gz")
    if archive:
        _check_archive_replaceable(archive_path, force)
    staging: Path | None = None
    staged_archive: Path | None = None
    try:
        with _signals_deferred():  # a signal right after mkdtemp would otherwise lose the folder's name
            staging = _output_step(output.parent, lambda: Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)))
        try:
            yield staging
        except OSError as exc:
            if exc.errno in _WRITE_ERRORS:
                raise _output_error(exc, output) from exc
            raise
        if archive:
            with _signals_deferred():
                staged_archive = _output_step(archive_path, lambda: _staged_sibling(archive_path))
            _output_step(archive_path, lambda: _pack_into(staging, output.name, staged_archive))
        with _signals_deferred():
            _output_step(output, lambda: _swap_in(staging, output))
            if staged_archive is not None:
                _output_step(archive_path, lambda: os.replace(staged_archive, archive_path))
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if staged_archive is not None:
            staged_archive.unlink(missing_ok=True)
        raise


#: errno values of a failed write: a full disk or quota, a file over the size limit, no permission.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS})


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Swapping the staged output into place is not cut halfway (the previous bundle moved aside,
    the new one not yet in): SIGINT/SIGTERM arriving meanwhile is delivered right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if arrived:
            signal.raise_signal(arrived[0])


def _swap_in(staging: Path, output: Path) -> None:
    if output.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, output)


def _output_step(path: Path, step: Callable[[], T]) -> T:
    """`step()`, its OSError (any: this step only writes `path`) an OutputError naming the path."""
    try:
        return step()
    except OSError as exc:
        raise _output_error(exc, path) from exc


def _output_error(exc: OSError, path: Path) -> OutputError:
    where = exc.filename or path
    return OutputError(
        f"cannot write '{where}': {exc.strerror or exc}",
        hint="free some space or choose a writable -o; the previous output, if any, is unchanged",
    )


#: held by every read-modify-write of a bundle's manifest (bench, profile, ... appending results)
MANIFEST_LOCK = ".manifest.lock"


def write_manifest(bundle_dir: Path, manifest: Manifest | Mapping[str, Any]) -> None:
    """Write manifest.json atomically through `Manifest.to_json`, as strict JSON.

    A JSON document (a script's edit of `read_manifest`) is read through `Manifest.from_json` first,
    so a wrong type is refused (BundleError). NaN and Infinity are not JSON: one anywhere in the
    manifest is a bug upstream, refused here (ValueError) before anything is written.
    """
    typed = manifest if isinstance(manifest, Manifest) else Manifest.from_json(dict(manifest), "manifest")
    write_text_atomically(bundle_dir / "manifest.json", _manifest_json(typed.to_json()))


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: figures headed for the manifest,
    which is strict JSON (`write_manifest` refuses a non-finite number)."""
    import math

    import numpy as np

    if isinstance(value, Mapping):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _manifest_json(value: Any) -> str:
    return json.dumps(value, indent=2, allow_nan=False, default=_json_default) + "\n"


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into a unique temporary file beside `path`, flushed to disk, then renamed over `path`.

    A reader sees the old file or the new one, never half of one; two writers never share a
    temporary file. A short write: an interrupt waits for it, so no temporary file is left behind.
    """
    with _signals_deferred():
        fd, staged_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staged_name, path)
        except BaseException:
            Path(staged_name).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def manifest_lock(bundle_dir: Path) -> Iterator[None]:
    """Hold `<bundle>/.manifest.lock` exclusively, so read-modify-writes of the manifest take turns
    across processes: fcntl.flock on Linux and macOS, msvcrt.locking on Windows (both advisory:
    only writers that take the lock are kept in order). Released when the holder exits or dies."""
    with open(bundle_dir / MANIFEST_LOCK, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            while True:  # LK_LOCK gives up after 10 attempts a second apart: keep waiting
                try:
                    handle.seek(0)
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """The bundle's manifest as a JSON document, checked by the runtime's reader; `write_manifest` takes it back."""
    return runtime_read_manifest(bundle_dir).to_json()


def append_history(bundle_dir: Path, key: str, entry: Mapping[str, Any]) -> int:
    """Append a profile or benchmark result to the manifest and redraw the report; the count under `key`.

    The read, append, report and manifest rewrite happen under the bundle's manifest lock, so
    concurrent bench/profile runs on one bundle each add their entry. An entry that is not strict
    JSON is refused before the report or the manifest is touched.
    """
    from edgeopt.report import write_report

    _manifest_json(entry)
    with manifest_lock(bundle_dir):
        manifest = runtime_read_manifest(bundle_dir).with_history(key, entry)
        if (bundle_dir / "report.html").exists():
            write_report(bundle_dir, manifest)
            manifest = replace(
                manifest,
                artifacts=tuple(
                    measured_artifact(bundle_dir, a.path, a.format, a.role or "") if a.path == "report.html" else a for a in manifest.artifacts
                ),
            )
        write_manifest(bundle_dir, manifest)
    return len(getattr(manifest, key))


def pack(bundle_dir: Path) -> Path:
    """Pack a bundle folder as `<folder>.tar.gz` with one top-level folder, atomically."""
    target = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    staged: Path | None = None
    try:
        with _signals_deferred():
            staged = _output_step(target, lambda: _staged_sibling(target))
        _output_step(target, lambda: _pack_into(bundle_dir, bundle_dir.name, staged))
        _output_step(target, lambda: os.replace(staged, target))
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    return target


def _staged_sibling(target: Path) -> Path:
    """A new empty hidden file beside `target`, to be written and then moved onto it. Create it under
    `_signals_deferred` so an interrupt cannot arrive between its creation and the caller knowing it."""
    fd, staged_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    return Path(staged_name)


def _pack_into(folder: Path, name: str, staged: Path) -> None:
    """`folder` packed under the top-level name `name` into the file `staged`."""
    with staged.open("wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        tar.add(folder, arcname=name)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, dt.datetime)):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
