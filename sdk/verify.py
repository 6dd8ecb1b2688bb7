"""`edgeopt verify`: schema, checksums and the reference parity check of a bundle, on this host."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from edgeopt.errors import BundleError

__all__ = ["validate_manifest", "verify_bundle"]


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

    A bundle whose device backend cannot run here (TensorRT, Core ML off macOS) is checked on its
    stand-in (runtime.backends.STAND_INS), and the result says so.
    """
    from edgeopt.runtime.bundle import open_bundle
    from edgeopt.runtime.verify import verify

    path = Path(bundle)
    manifest = open_bundle(path).manifest
    validate_manifest(manifest)
    return verify(path, backend=backend)
