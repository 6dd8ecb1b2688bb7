"""Writing bundles: atomic folders with a manifest, checksummed artifacts and reference data.

Reading and checking bundles is the runtime's job (`edgeopt.runtime.bundle`), so a device and
this host verify the same way; this module only writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeopt.errors import OutputError
from edgeopt.runtime.bundle import SCHEMA_VERSION, sha256_path

__all__ = [
    "SCHEMA_VERSION",
    "append_history",
    "artifact_entry",
    "atomic_output",
    "pack",
    "read_manifest",
    "toolchain_fingerprint",
    "write_manifest",
]

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


def artifact_entry(bundle_dir: Path, relpath: str, fmt: str, role: str) -> dict[str, Any]:
    path = bundle_dir / relpath
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {"path": relpath, "format": fmt, "bytes": size, "sha256": sha256_path(path), "role": role}


def _check_writable(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise OutputError(f"output '{output}' already exists", hint="pass --force to replace it, or choose another -o")
    parent = output.parent if output.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder '{parent}': {exc.strerror}", hint="choose a writable -o") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder '{parent}' is not writable", hint="choose a writable -o")


@contextlib.contextmanager
def atomic_output(output: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `output`, on failure it vanishes."""
    _check_writable(output, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (temp file + rename), keys in a stable order."""
    tmp = bundle_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, bundle_dir / "manifest.json")


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    from edgeopt.runtime.bundle import read_manifest as runtime_read

    return runtime_read(bundle_dir)


def append_history(bundle_dir: Path, key: str, entry: dict[str, Any]) -> None:
    """Append a profile or benchmark result to the manifest and redraw the report."""
    from edgeopt.report import write_report

    manifest = read_manifest(bundle_dir)
    manifest.setdefault(key, []).append(entry)
    if (bundle_dir / "report.html").exists():
        write_report(bundle_dir, manifest)
        manifest["artifacts"] = [
            artifact_entry(bundle_dir, a["path"], a["format"], a["role"]) if a["path"] == "report.html" else a
            for a in manifest["artifacts"]
        ]
    write_manifest(bundle_dir, manifest)


def pack(bundle_dir: Path) -> Path:
    """Pack a bundle folder as `<folder>.tar.gz` with one top-level folder, atomically."""
    target = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = target.with_name(f".{target.name}.partial")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    os.replace(tmp, target)
    return target


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, dt.datetime)):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
