"""library_output_to_log: what a library writes to fd 2 goes to the log, and fd 2 comes back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from edgeopt.runtime.library_output import library_output_to_log

log = logging.getLogger("tests.library_output")


def test_native_output_is_logged_at_debug_when_the_call_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=log.name), library_output_to_log(log, "somelib"):
        os.write(2, b"INFO: Created a delegate\n")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.DEBUG, "somelib wrote to stderr:\nINFO: Created a delegate")]


def test_native_output_is_a_warning_when_the_call_fails(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=log.name), pytest.raises(RuntimeError), library_output_to_log(log, "somelib"):
        os.write(2, b"kernel X: bad tensor\n")
        raise RuntimeError("failed")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "somelib wrote to stderr:\nkernel X: bad tensor")]


def test_stderr_is_the_terminal_again_afterwards() -> None:
    code = (
        "import logging, os, sys\n"
        "from edgeopt.runtime.library_output import library_output_to_log\n"
        "with library_output_to_log(logging.getLogger('x'), 'lib'):\n"
        "    os.write(2, b'hidden\\n'); print('hidden too', file=sys.stderr)\n"
        "os.write(2, b'after\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "after\n")
