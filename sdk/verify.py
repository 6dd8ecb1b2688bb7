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


def verify_bundle(bundle: str | Path, backend: str | None = None) -> dict[str, Any]:
    """Validate, check checksums (done by the runtime on load) and run the reference inputs."""
    from edgeopt.runtime import load
    from edgeopt.runtime.bundle import read_manifest

    path = Path(bundle)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        validate_manifest(manifest)
    chosen = backend
    try:
        model = load(path, backend=chosen)
    except BackendUnavailableError:
        stand_in = _HOST_STAND_INS.get((manifest or {}).get("runtime", {}).get("backend", ""))
        if backend is not None or stand_in is None:
            raise
        chosen = stand_in
        model = load(path, backend=chosen)
    with model:
        result = model.verify().to_dict()
    result["backend"] = chosen or model.backend_name
    lines = [f"{'PASSED' if result['passed'] else 'FAILED'}: {path} on {result['backend']}"]
    for name, figures in result.get("outputs", {}).items():
        lines.append(f"  {name}: max |Δ| {figures.get('max_abs', float('nan')):.3g} (allowed atol {figures.get('atol', float('nan')):.3g})")
    result["text"] = "\n".join(lines)
    return result
