"""What libraries write straight to the process's stderr, sent to a logger instead.

LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ when the first
interpreter allocates; coremltools prints import-time warnings and tqdm bars for its MIL pass
pipelines. None of it is for an edgeopt user, it breaks `--quiet`, and it interleaves with
edgeopt's own progress. `library_output_to_log` redirects file descriptor 2 around such a call
(the C++ side writes there directly, so replacing `sys.stderr` would not do) and logs what was
written: at DEBUG when the call succeeds, at WARNING when it raises, so a library's explanation
of a failure is still seen.

fd 2 belongs to the whole process: one redirection at a time (a lock), only around loads and
conversions (never around predict), and whatever another thread writes to stderr meanwhile is
logged with it. `sys.stderr` itself is left alone: a logging handler created inside the window
(a library's import) would otherwise keep a stream that is closed after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["library_output_to_log"]

_FD_LOCK = threading.RLock()


@contextlib.contextmanager
def library_output_to_log(logger: logging.Logger, library: str) -> Iterator[None]:
    """Run the body with fd 2 going to a temporary file; log what `library` wrote there."""
    with _FD_LOCK, tempfile.TemporaryFile() as captured:
        _flush_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all (a service started without stderr): nothing to redirect
            yield
            return
        os.dup2(captured.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace").replace("\r", "\n").strip()
            if text:
                level = logging.WARNING if failed else logging.DEBUG
                logger.log(level, "%s wrote to stderr:\n%s", library, "\n".join(line for line in text.splitlines() if line.strip()))


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()
