"""`edgeopt verify`: schema, checksums and the reference parity check of a bundle, on this host."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from edgeopt.errors import BackendUnavailableError, BundleError

__all__ = ["validate_manifest", "verify_bundle"]

# Backends a build host may lack, and the stand-in that runs the same artifact here.
_HOST_STAND_INS = {"tensorrt": "onnxruntime"}


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Check a manifest against the bundle JSON Schema; BundleError names the first violation."""
    import jsonschema

    schema = json.loads(resources.files("edgeopt").joinpath("schemas/manifest.schema.json").read_text(encoding="utf-8"))
    try:
        jsonschema.validate(manifest, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise BundleError(f"manifest.json does not match schema {schema['$id']}: at {where}: {exc.message}") from None


def verify_bundle(bundle: str | Path, backend: str | None = None) -> Any:
    """Validate the manifest, then let the runtime check checksums and run the reference inputs.

    A bundle whose device backend is absent here (TensorRT) is checked on its stand-in.
    """
    from edgeopt.runtime.bundle import open_bundle
    from edgeopt.runtime.verify import verify

    path = Path(bundle)
    manifest = open_bundle(path).manifest
    validate_manifest(manifest)
    try:
        return verify(path, backend=backend)
    except BackendUnavailableError:
        stand_in = _HOST_STAND_INS.get(manifest["runtime"]["backend"])
        if backend is not None or stand_in is None:
            raise
        return verify(path, backend=stand_in)
