"""What `edgeopt profile` sends to a device: the bundle's device copy, and the small Python
programs that run there to check the cache, receive uploads, run the runtime and clean up.

The device copy of a bundle leaves out what only the host needs (the HTML report and the profile
and benchmark history), so its checksum stays the same from one profile run to the next and the
device cache keyed by that checksum keeps hitting. It is packed as a reproducible .tar.gz (sorted
entries, zero timestamps and owners), so the same bundle always gives the same checksum.

The remote programs run as `python -c SCRIPT ARGS...`: every path is an argument, never part of
the program text, and they use the standard library only. PROBE_SCRIPT, the first to run, keeps
to syntax that any Python accepts, so an old interpreter is reported by version, not by a
SyntaxError.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeopt.errors import BundleError
from edgeopt.runtime import archive
from edgeopt.runtime.archive import safe_extract
from edgeopt.runtime.manifest import HISTORY_KEYS, JsonObject

__all__ = [
    "CLEANUP_SCRIPT",
    "PROBE_SCRIPT",
    "RECEIVE_SCRIPT",
    "RUN_SCRIPT",
    "Payload",
    "device_copy",
    "sha256_file",
    "unpack_local_archive",
]

_REPORT_ROLE = "report"


@dataclass(frozen=True)
class Payload:
    """A local file to place on the device at `<cache>/<sha256>/<name>`."""

    path: Path
    name: str
    sha256: str
    extract: bool

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def device_copy(bundle_dir: Path, work_dir: Path) -> Payload:
    """Pack the files a device needs from `bundle_dir` into a reproducible tar.gz in `work_dir`."""
    manifest: JsonObject = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    host_only = {a["path"] for a in manifest.get("artifacts", []) if a.get("role") == _REPORT_ROLE}
    device_manifest = {key: value for key, value in manifest.items() if key not in HISTORY_KEYS}
    device_manifest["artifacts"] = [a for a in manifest.get("artifacts", []) if a["path"] not in host_only]
    manifest_bytes = (json.dumps(device_manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")

    archive = work_dir / f"{bundle_dir.name}.tar.gz"
    with archive.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_dir_info(bundle_dir.name))
            tar.addfile(_file_info(f"{bundle_dir.name}/manifest.json", len(manifest_bytes)), io.BytesIO(manifest_bytes))
            for relative in _bundle_files(bundle_dir, host_only):
                arcname = f"{bundle_dir.name}/{relative.as_posix()}"
                path = bundle_dir / relative
                if path.is_dir():
                    tar.addfile(_dir_info(arcname))
                else:
                    with path.open("rb") as stream:
                        tar.addfile(_file_info(arcname, path.stat().st_size), stream)
    return Payload(path=archive, name=archive.name, sha256=sha256_file(archive), extract=True)


def _bundle_files(bundle_dir: Path, host_only: set[str]) -> Iterator[Path]:
    """Every entry below the bundle except manifest.json, hidden files and host-only artifacts."""
    for root, dirs, files in os.walk(bundle_dir):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs + sorted(f for f in files if not f.startswith(".")):
            relative = (root_path / name).relative_to(bundle_dir)
            if relative.as_posix() == "manifest.json" or _is_within(relative, host_only):
                continue
            yield relative


def _is_within(relative: Path, prefixes: set[str]) -> bool:
    text = relative.as_posix()
    return any(text == prefix or text.startswith(prefix.rstrip("/") + "/") for prefix in prefixes)


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


def unpack_local_archive(archive: Path, work_dir: Path) -> Path:
    """Extract a `.tar.gz` bundle (one top-level folder) into `work_dir` with the runtime's
    safe_extract; returns that folder."""
    work_dir.mkdir(parents=True, exist_ok=True)
    safe_extract(archive, work_dir)
    tops = list(work_dir.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise BundleError(
            f"bundle archive {archive} holds {len(tops)} top-level entries",
            hint="a bundle archive holds exactly one folder; repack it or pass the bundle folder",
        )
    return tops[0]


def _archive_source() -> str:
    """edgeopt.runtime.archive's source, standing alone: the device has no edgeopt installed, so
    its one import (BundleError) becomes a local class with the same message."""
    source = inspect.getsource(archive)
    if _ARCHIVE_IMPORT not in source:
        raise RuntimeError(f"edgeopt.runtime.archive no longer has the line {_ARCHIVE_IMPORT!r} the receive script replaces")
    return source.replace(_ARCHIVE_IMPORT, _DEVICE_BUNDLE_ERROR)


_ARCHIVE_IMPORT = "from edgeopt.runtime.errors import BundleError\n"
_DEVICE_BUNDLE_ERROR = """
class BundleError(Exception):
    def __init__(self, message, *, hint=None):
        super().__init__(message if hint is None else message + "\\n  hint: " + hint)
"""


# Runs on the device: `python -c PROBE_SCRIPT CACHE [SHA256 NAME]...`.
# Prints {"python": [major, minor, micro], "version": str, "cache": absolute cache folder,
# "cached": {sha256: true when <cache>/<sha256>/<name> exists with that checksum}}.
PROBE_SCRIPT = r"""
import hashlib, json, os, platform, sys
cache = os.path.abspath(os.path.expanduser(sys.argv[1]))
cached = {}
for key, name in zip(sys.argv[2::2], sys.argv[3::2]):
    path = os.path.join(cache, key, name)
    digest = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    cached[key] = os.path.isfile(path) and digest.hexdigest() == key
print(json.dumps({"python": list(sys.version_info[:3]), "version": platform.python_version(),
                  "cache": cache, "cached": cached}))
"""

# Runs on the device: `python -c RECEIVE_SCRIPT FOLDER SHA256 NAME EXTRACT` with the file on stdin.
# Writes into a staging folder inside FOLDER, checks the checksum, extracts a tar.gz with the
# runtime's safe_extract (its source is the script's first part), then renames the staging folder to
# FOLDER/SHA256, so an entry is either complete or absent. An entry that another run completed
# meanwhile is kept (same checksum, same bytes); one whose file no longer matches is replaced.
RECEIVE_SCRIPT = _archive_source() + r"""
import hashlib, os, shutil, sys, tempfile
folder, key, name, extract = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
if not os.path.isdir(folder):
    os.makedirs(folder)
final = os.path.join(folder, key)
staging = tempfile.mkdtemp(prefix=".partial-", dir=folder)
try:
    digest = hashlib.sha256()
    with open(os.path.join(staging, name), "wb") as out:
        for chunk in iter(lambda: sys.stdin.buffer.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != key:
        sys.exit("error: %s arrived with sha256 %s, expected %s" % (name, digest.hexdigest(), key))
    if extract:
        try:
            safe_extract(os.path.join(staging, name), staging)
        except BundleError as exc:
            sys.exit("error: %s" % exc)
    existing = os.path.join(final, name)
    if os.path.isdir(final) and not (os.path.isfile(existing) and sha256(existing) == key):
        stale = tempfile.mkdtemp(prefix=".stale-", dir=folder)
        os.rename(final, os.path.join(stale, key))
        shutil.rmtree(stale)
    try:
        os.rename(staging, final)
    except OSError:
        if not os.path.isdir(final):  # another run completed the same entry first: keep that one
            raise
finally:
    if os.path.isdir(staging):
        shutil.rmtree(staging)
"""

# Runs on the device: `python -c CLEANUP_SCRIPT FOLDER...` removes the folder a run pushed into.
CLEANUP_SCRIPT = r"""
import shutil, sys
for path in sys.argv[1:]:
    shutil.rmtree(path, ignore_errors=True)
"""

# Runs on the device: `python -c RUN_SCRIPT SPEC` with SPEC a JSON object
# {"zipapp": path, "steps": [{"name", "args", "ok": [exit codes]}], "remove": [folders]}.
# Runs `python zipapp ARGS...` for each step in order, stopping at the first exit code not in
# "ok", then removes the "remove" folders, and prints {"steps": {name: {code, stdout, stderr}}}.
# The host keeps the ssh connection's stdin open while it waits: at end of file (the host gave up
# or was interrupted) the running step is killed, so a benchmark never runs on unattended.
RUN_SCRIPT = r"""
import json, os, shutil, subprocess, sys, threading
spec = json.loads(sys.argv[1])
current = []
def stop_when_host_leaves():
    while os.read(0, 65536):
        pass
    for child in current:
        if child.poll() is None:
            child.kill()
threading.Thread(target=stop_when_host_leaves, daemon=True).start()
steps = {}
for step in spec["steps"]:
    child = subprocess.Popen([sys.executable, spec["zipapp"]] + step["args"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    current[:] = [child]
    out, err = child.communicate()
    steps[step["name"]] = {"code": child.returncode, "stdout": out.decode("utf-8", "replace"),
                           "stderr": err.decode("utf-8", "replace")}
    if child.returncode not in step["ok"]:
        break
for path in spec["remove"]:
    shutil.rmtree(path, ignore_errors=True)
sys.stdout.write(json.dumps({"steps": steps}))
sys.stdout.flush()
os._exit(0)
"""
