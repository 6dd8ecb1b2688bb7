"""The README's examples run as written: its Python blocks and the quickstart's build line.

They run in a temporary folder where `examples` points at the repository's, so the README's
relative paths resolve and what it writes (`dist/...`) stays out of the repository.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return tmp_path


def test_the_python_snippets_run_as_written(work: Path) -> None:
    blocks = fenced_blocks("python")
    assert blocks, "README.md has no ```python block"
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=work, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr}"


def test_the_quickstart_build_runs_and_runs_again(work: Path) -> None:
    """Step 2 of the quickstart; the second run replaces the bundle the first wrote (--force)."""
    quickstart = fenced_blocks("bash")[0]
    line = next(line for line in quickstart.splitlines() if line.startswith("edgeopt build "))
    words = shlex.split(line, comments=True)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "edgeopt.cli", *words[1:]], cwd=work, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stderr}"
    assert (work / "dist" / "model-jetson-orin" / "manifest.json").is_file()
