"""Build `edgeopt-runtime.pyz`: the runtime as one file a device runs with nothing installed.

The archive holds a minimal `edgeopt/__init__.py` (the version only; the SDK's lazy API would
pull in modules the device lacks) and `edgeopt/runtime/**`. Entries are written in sorted order
with a fixed timestamp and mode, so the same sources always give the same bytes and sha256 —
remote profiling uses that checksum to skip pushing a runtime the device already has.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipapp
import zipfile
from pathlib import Path

import edgeopt
import edgeopt.runtime

__all__ = ["ZIPAPP_NAME", "build_runtime_zipapp", "runtime_zipapp_bytes"]

ZIPAPP_NAME = "edgeopt-runtime.pyz"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_INTERPRETER = "/usr/bin/env python3"
_PACKAGE_INIT = '''"""edgeopt runtime, packed as a zipapp: only edgeopt.runtime is inside."""

__version__ = {version!r}
'''
_MAIN = '''import json
import sys

try:
    import numpy  # noqa: F401  (the one dependency the runtime has besides the backend)
except ImportError:
    MESSAGE = f"the edgeopt runtime needs numpy, which {sys.executable} cannot import"
    HINT = f"{sys.executable} -m pip install numpy"
    print(f"error: {MESSAGE} (hint: {HINT})", file=sys.stderr)
    if "--json" in sys.argv:
        error = {"type": "BackendUnavailableError", "message": MESSAGE, "hint": HINT, "exit_code": 2}
        print(json.dumps({"error": error}))
    sys.exit(2)

from edgeopt.runtime.__main__ import main

sys.exit(main())
'''


def _runtime_files() -> list[tuple[str, Path]]:
    """(archive name, source file) for every .py and .json file of edgeopt.runtime."""
    root = Path(edgeopt.runtime.__file__).parent
    files = []
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
            files.append((f"edgeopt/runtime/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def runtime_zipapp_bytes() -> bytes:
    """The zip part of the archive (no shebang), deterministic for the same sources."""
    entries: list[tuple[str, bytes]] = [
        ("__main__.py", _MAIN.encode()),
        ("edgeopt/__init__.py", _PACKAGE_INIT.format(version=edgeopt.__version__).encode()),
    ]
    entries += [(name, path.read_bytes()) for name, path in _runtime_files()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            archive.writestr(info, data)
    return buffer.getvalue()


def build_runtime_zipapp(dest: Path) -> Path:
    """Write edgeopt-runtime.pyz into the folder `dest` (or to `dest` itself when it ends in .pyz).

    Run on the device as `python3 edgeopt-runtime.pyz {info,bench,verify,predict} ... --json`.
    """
    dest = Path(dest)
    target = dest if dest.suffix == ".pyz" else dest / ZIPAPP_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    try:
        zipapp.create_archive(io.BytesIO(runtime_zipapp_bytes()), temporary, interpreter=_INTERPRETER)
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target
