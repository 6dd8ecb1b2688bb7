"""Read a bundle (folder or .tar.gz) and check it before anything runs: schema, sizes, checksums.

The contract is docs/bundle.md. `sha256_path` is the one hashing rule for files and folders; the
SDK's bundle writer imports it so both sides agree byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgeopt.runtime.archive import safe_extract
from edgeopt.runtime.errors import BundleError
from edgeopt.runtime.kinds import BackendName, Precision
from edgeopt.runtime.manifest import Manifest
from edgeopt.runtime.spec import TensorSpec

__all__ = [
    "SCHEMA_VERSION",
    "Bundle",
    "cache_root",
    "extract_bundle",
    "is_bundle",
    "open_bundle",
    "sha256_path",
]

SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])
MANIFEST = "manifest.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
_BLOCK = 1 << 20


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes; for a folder, of the lines "<relpath>\\0<sha256>\\n" over its sorted files."""
    path = Path(path)
    if path.is_dir():
        lines = hashlib.sha256()
        files = sorted(
            (p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()
        )
        for relative, file in files:
            lines.update(f"{relative}\0{_sha256_file(file)}\n".encode())
        return lines.hexdigest()
    return _sha256_file(path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def cache_root() -> Path:
    """Where the runtime keeps extracted bundles and built engines: $EDGEOPT_CACHE, else the user cache."""
    explicit = os.environ.get("EDGEOPT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeopt"


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """A folder with a manifest.json, or a .tar.gz / .tgz file."""
    path = Path(path)
    if path.is_dir():
        return (path / MANIFEST).is_file()
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle: its folder and manifest (typed, and the JSON document as read)."""

    root: Path
    contents: Manifest
    source: Path

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as a JSON object, for readers of its open sections."""
        return self.contents.to_json()

    @property
    def name(self) -> str:
        return self.contents.name or self.root.name

    @property
    def backend(self) -> BackendName:
        return self.contents.runtime.backend

    @property
    def model_path(self) -> Path:
        return self.path(self.contents.runtime.model, "runtime.model")

    def path(self, relative: str, what: str) -> Path:
        """root/relative for a path the manifest names; BundleError when it resolves outside the bundle.

        Symbolic links are followed, so a link inside the bundle folder that points at /etc is
        refused like an absolute path or '..' would be.
        """
        pure = PurePosixPath(relative)
        hint = "the bundle is damaged or was not written by `edgeopt build`; rebuild it"
        if not relative or pure.is_absolute() or "\\" in relative:
            raise BundleError(f"{self.root / MANIFEST}: {what} path {relative!r} leaves the bundle", hint=hint)
        path = self.root / pure
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise BundleError(f"{self.root / MANIFEST}: {what} path {relative!r} leaves the bundle (it resolves to {resolved})", hint=hint)
        return path

    @property
    def install_hint(self) -> str | None:
        return self.contents.runtime.install

    @property
    def threads(self) -> int | None:
        return self.contents.runtime.threads or None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.contents.runtime.options)

    @property
    def precision(self) -> Precision | None:
        return self.contents.precision

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.contents.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.contents.outputs)

    @property
    def reference(self) -> dict[str, Any] | None:
        reference = self.contents.reference
        return None if reference is None else dict(reference.to_json())

    @property
    def model_sha256(self) -> str | None:
        artifact = self.contents.model_artifact
        return None if artifact is None else artifact.sha256

    def summary(self) -> dict[str, Any]:
        """The manifest's identity in a few keys (for `info` and benchmark results)."""
        manifest = self.contents
        return {
            "path": str(self.source),
            "name": self.name,
            "schema_version": manifest.schema_version,
            "edgeopt_version": manifest.edgeopt_version,
            "created_at": manifest.created_at,
            "target": None if manifest.target is None else manifest.target.name,
            "precision": None if manifest.precision is None else manifest.precision.value,
            "backend": self.backend.value,
            "model": manifest.runtime.model,
            "model_sha256": self.model_sha256,
            "install": self.install_hint,
            "inputs": [t.to_dict() for t in manifest.inputs],
            "outputs": [t.to_dict() for t in manifest.outputs],
            "artifacts": [{"path": a.path, "bytes": a.bytes, "sha256": a.sha256} for a in manifest.artifacts],
        }


def open_bundle(path: str | os.PathLike[str], *, check_artifacts: bool = True) -> Bundle:
    """Open a bundle folder or archive, check the schema major and every artifact's size and sha256."""
    source = Path(path)
    if not source.exists():
        raise BundleError(f"{source}: no such bundle", hint="pass the folder (or .tar.gz) `edgeopt build` wrote")
    root = extract_bundle(source) if source.is_file() else source
    bundle = Bundle(root=root, contents=read_manifest(root), source=source)
    if check_artifacts:
        try:
            check_artifact_files(bundle)
        except BundleError:
            if not source.is_file():
                raise
            # the cached copy of an archive was changed after extraction: unpack it afresh, check again
            shutil.rmtree(extract_folder(source))
            root = extract_bundle(source)
            bundle = Bundle(root=root, contents=read_manifest(root), source=source)
            check_artifact_files(bundle)
    if not bundle.model_path.exists():
        raise BundleError(
            f"{root}: runtime.model '{bundle.contents.runtime.model}' is not in the bundle",
            hint="rebuild the bundle with `edgeopt build`",
        )
    return bundle


def read_manifest(root: Path) -> Manifest:
    """manifest.json, typed (`Manifest.from_json` checks every type the runtime reads), of a supported schema major."""
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}; this is not an edgeopt bundle", hint="pass the folder `edgeopt build` wrote")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})", hint="the bundle is damaged; copy or rebuild it") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object", hint="the bundle is damaged; copy or rebuild it")
    version = str(manifest.get("schema_version", ""))
    major = version.split(".")[0]
    if not major.isdigit():
        raise BundleError(f"{path}: schema_version {version!r} is not 'major.minor'", hint="rebuild the bundle with `edgeopt build`")
    if int(major) != SCHEMA_MAJOR:
        raise BundleError(
            f"{path}: bundle schema {version}, this runtime reads schema {SCHEMA_MAJOR}.x",
            hint="use the edgeopt release that wrote the bundle (its runtime zipapp), or rebuild the bundle with this one",
        )
    return Manifest.from_json(manifest, str(path))


def check_artifact_files(bundle: Bundle) -> None:
    """Every listed artifact exists with the recorded byte count and sha256."""
    hint = "the bundle was changed or damaged in transfer; copy it again or rebuild it with `edgeopt build`"
    for artifact in bundle.contents.artifacts:
        path = bundle.path(artifact.path, "artifact")
        if not path.exists():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing", hint=hint)
        if path.is_dir():
            for entry in path.rglob("*"):
                bundle.path(entry.relative_to(bundle.root).as_posix(), "artifact")
        expected_bytes = artifact.bytes
        if expected_bytes is not None and _size(path) != expected_bytes:
            raise BundleError(f"{path}: {_size(path)} bytes, {MANIFEST} says {expected_bytes}", hint=hint)
        expected_sha = artifact.sha256
        if not expected_sha:
            raise BundleError(f"{path}: {MANIFEST} records no sha256 for it", hint="rebuild the bundle with `edgeopt build`")
        actual_sha = sha256_path(path)
        if actual_sha != expected_sha:
            raise BundleError(
                f"{path}: sha256 {actual_sha[:16]}… does not match {MANIFEST} ({str(expected_sha)[:16]}…)", hint=hint
            )


# -- archives --------------------------------------------------------------------------------


def extract_folder(archive: Path, cache: Path | None = None) -> Path:
    """Where an archive is unpacked: one folder per archive checksum under the cache."""
    return (cache or cache_root() / "bundles") / _sha256_file(archive)[:20]


def extract_bundle(archive: Path, cache: Path | None = None) -> Path:
    """Unpack a .tar.gz bundle into the cache (once per archive checksum) and return its folder.

    Extraction is `edgeopt.runtime.archive.safe_extract` (no member leaves the folder, no
    devices, capped size and member count) into a temporary folder renamed into place, so a
    half-extracted or refused bundle is never reused.
    """
    if not archive.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise BundleError(f"{archive}: not a bundle folder or .tar.gz", hint="pass the folder or .tar.gz `edgeopt build` wrote")
    folder = extract_folder(archive, cache)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder.parent))
        try:
            safe_extract(archive, staging)
            try:
                os.replace(staging, folder)
            except OSError:
                if not folder.is_dir():  # another process won the race only if the folder now exists
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return _bundle_root(folder, archive)


def _bundle_root(folder: Path, archive: Path) -> Path:
    """The folder holding manifest.json: the archive's root or its single top-level folder."""
    if (folder / MANIFEST).is_file():
        return folder
    children = [c for c in folder.iterdir() if c.is_dir()]
    if len(children) == 1 and (children[0] / MANIFEST).is_file():
        return children[0]
    raise BundleError(f"{archive}: no {MANIFEST} at its root or in one top-level folder", hint="pack the bundle folder itself: tar czf NAME.tar.gz NAME/")
