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

import numpy as np

from edgeopt.runtime.archive import safe_extract
from edgeopt.runtime.errors import BundleError
from edgeopt.runtime.isa import IsaClass
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
    """An opened, checked bundle: its folder and manifest, with the fields the runtime reads."""

    root: Path
    manifest: dict[str, Any]
    source: Path

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.root.name)

    @property
    def runtime(self) -> dict[str, Any]:
        return self.manifest["runtime"]

    @property
    def backend(self) -> str:
        return str(self.runtime["backend"])

    @property
    def model_path(self) -> Path:
        return self.path(self.runtime["model"], "runtime.model")

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
        return self.runtime.get("install")

    @property
    def threads(self) -> int | None:
        return self.runtime.get("threads") or None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.runtime.get("options") or {})

    @property
    def precision(self) -> str | None:
        return self.manifest.get("precision")

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(raw) for raw in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(raw) for raw in self.manifest["outputs"]]

    @property
    def reference(self) -> dict[str, Any] | None:
        return self.manifest.get("reference") or None

    @property
    def model_sha256(self) -> str | None:
        for artifact in self.manifest["artifacts"]:
            if artifact["path"] == self.runtime["model"]:
                return str(artifact["sha256"])
        return None

    def summary(self) -> dict[str, Any]:
        """The manifest's identity in a few keys (for `info` and benchmark results)."""
        target = self.manifest.get("target") or {}
        return {
            "path": str(self.source),
            "name": self.name,
            "schema_version": self.manifest.get("schema_version"),
            "edgeopt_version": self.manifest.get("edgeopt_version"),
            "created_at": self.manifest.get("created_at"),
            "target": target.get("name"),
            "precision": self.precision,
            "backend": self.backend,
            "model": self.runtime["model"],
            "model_sha256": self.model_sha256,
            "install": self.install_hint,
            "inputs": self.manifest["inputs"],
            "outputs": self.manifest["outputs"],
            "artifacts": [
                {"path": a["path"], "bytes": a.get("bytes"), "sha256": a.get("sha256")}
                for a in self.manifest["artifacts"]
            ],
        }


def open_bundle(path: str | os.PathLike[str], *, check_artifacts: bool = True) -> Bundle:
    """Open a bundle folder or archive, check the schema major and every artifact's size and sha256."""
    source = Path(path)
    if not source.exists():
        raise BundleError(f"{source}: no such bundle", hint="pass the folder (or .tar.gz) `edgeopt build` wrote")
    root = extract_bundle(source) if source.is_file() else source
    bundle = Bundle(root=root, manifest=read_manifest(root), source=source)
    if check_artifacts:
        try:
            check_artifact_files(bundle)
        except BundleError:
            if not source.is_file():
                raise
            # the cached copy of an archive was changed after extraction: unpack it afresh, check again
            shutil.rmtree(extract_folder(source))
            root = extract_bundle(source)
            bundle = Bundle(root=root, manifest=read_manifest(root), source=source)
            check_artifact_files(bundle)
    if not bundle.model_path.exists():
        raise BundleError(
            f"{root}: runtime.model '{bundle.runtime['model']}' is not in the bundle",
            hint="rebuild the bundle with `edgeopt build`",
        )
    return bundle


def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json, parsed, with a supported schema major and the keys the runtime needs."""
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
    _check_types(manifest, path)
    return manifest


# -- the manifest's types --------------------------------------------------------------------
# What the runtime reads, checked before it reads it (the runtime cannot use jsonschema): a wrong
# type is a BundleError naming the key path, never a TypeError from deep inside a backend.


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
    return _number(value) or (isinstance(value, list) and bool(value) and all(_number(v) for v in value))


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _of(kind: type) -> Any:
    return lambda value: isinstance(value, kind)


def _dtype(value: Any) -> bool:
    try:
        return _text(value) and np.dtype(value) is not None
    except TypeError:
        return False


def _dimension(value: Any) -> bool:
    return value is None or isinstance(value, str) or (_integer(value) and value >= -1)


_TOP = {
    "name": ("a string", _optional(_of(str))),
    "precision": ("a string", _optional(_of(str))),
    "target": ("an object", _optional(_of(dict))),
    "toolchain": ("an object", _optional(_of(dict))),
    "lowering": ("an object", _optional(_of(dict))),
    "reference": ("an object", _optional(_of(dict))),
    "runtime": ("an object", _of(dict)),
    "artifacts": ("a list", _of(list)),
    "inputs": ("a list", _of(list)),
    "outputs": ("a list", _of(list)),
}
_TARGET = {"name": ("a string", _optional(_of(str))), "isa": (f"one of {', '.join(c.value for c in IsaClass)}", _optional(lambda v: v in {c.value for c in IsaClass}))}
_LOWERING = {"engine_recipe": ("an object", _optional(_of(dict)))}
_RUNTIME = {
    "backend": ("a non-empty string", _text),
    "model": ("a non-empty string (a path inside the bundle)", _text),
    "install": ("a string", _optional(_of(str))),
    "threads": ("a whole number >= 0", _optional(lambda v: _integer(v) and v >= 0)),
    "options": ("an object", _optional(_of(dict))),
}
_ARTIFACT = {
    "path": ("a non-empty string (a path inside the bundle)", _text),
    "bytes": ("a whole number >= 0", _optional(lambda v: _integer(v) and v >= 0)),
    "sha256": ("a string", _optional(_of(str))),
}
_TENSOR = {
    "name": ("a non-empty string", _text),
    "shape": ("a list of whole numbers, strings or nulls", lambda v: isinstance(v, list) and all(_dimension(d) for d in v)),
    "dtype": ("a numpy dtype name (float32, int8, ...)", _dtype),
    "layout": ("a string", _optional(_of(str))),
    "quantization": ("an object", _optional(_of(dict))),
}
_QUANTIZATION = {
    "scale": ("a number or a list of numbers", _numbers),
    "zero_point": ("a number or a list of numbers", _optional(_numbers)),
    "axis": ("a whole number", _optional(_integer)),
}
_REFERENCE = {
    "inputs": ("a non-empty string (a path inside the bundle)", _optional(_text)),
    "outputs": ("a non-empty string (a path inside the bundle)", _optional(_text)),
    "tolerance": ("an object", _optional(_of(dict))),
}
_TOLERANCE = {"atol": ("a number", _optional(_number)), "rtol": ("a number", _optional(_number)), "outputs": ("an object", _optional(_of(dict)))}


def _check_types(manifest: dict[str, Any], path: Path) -> None:
    def check(raw: Any, fields: dict[str, tuple[str, Any]], where: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            fail(where.rstrip("."), "an object", raw)
        for key, (wanted, valid) in fields.items():
            if not valid(raw.get(key)):
                fail(where + key, wanted, raw.get(key))
        return raw

    def fail(where: str, wanted: str, value: Any) -> None:
        shown = "missing" if value is None else f"{json.dumps(value)[:60]} ({type(value).__name__})"
        raise BundleError(f"{path}: {where} must be {wanted}, found {shown}", hint="the bundle is damaged or was not written by `edgeopt build`; rebuild it")

    check(manifest, _TOP, "")
    check(manifest.get("target") or {}, _TARGET, "target.")
    check(manifest.get("lowering") or {}, _LOWERING, "lowering.")
    check(manifest["runtime"], _RUNTIME, "runtime.")
    for index, artifact in enumerate(manifest["artifacts"]):
        check(artifact, _ARTIFACT, f"artifacts[{index}].")
    for kind in ("inputs", "outputs"):
        for index, raw in enumerate(manifest[kind]):
            tensor = check(raw, _TENSOR, f"{kind}[{index}].")
            if tensor.get("quantization") is not None:
                check(tensor["quantization"], _QUANTIZATION, f"{kind}[{index}].quantization.")
    reference = check(manifest.get("reference") or {}, _REFERENCE, "reference.")
    tolerance = check(reference.get("tolerance") or {}, _TOLERANCE, "reference.tolerance.")
    for name, own in (tolerance.get("outputs") or {}).items():
        check(own, {"atol": _TOLERANCE["atol"], "rtol": _TOLERANCE["rtol"]}, f"reference.tolerance.outputs.{name}.")


def check_artifact_files(bundle: Bundle) -> None:
    """Every listed artifact exists with the recorded byte count and sha256."""
    hint = "the bundle was changed or damaged in transfer; copy it again or rebuild it with `edgeopt build`"
    for artifact in bundle.manifest["artifacts"]:
        path = bundle.path(artifact["path"], "artifact")
        if not path.exists():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing", hint=hint)
        if path.is_dir():
            for entry in path.rglob("*"):
                bundle.path(entry.relative_to(bundle.root).as_posix(), "artifact")
        expected_bytes = artifact.get("bytes")
        if expected_bytes is not None and _size(path) != expected_bytes:
            raise BundleError(f"{path}: {_size(path)} bytes, {MANIFEST} says {expected_bytes}", hint=hint)
        expected_sha = artifact.get("sha256")
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
