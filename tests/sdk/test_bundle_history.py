"""The bundle's history: concurrent appends lose nothing, the manifest stays strict JSON, and
`edgeopt bench` records (and says so) or, with --no-record, leaves the bundle byte-for-byte alone."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeopt
from edgeopt.bundle import append_history, read_manifest, write_manifest
from edgeopt.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"
WRITERS = 2
ENTRIES = 50  # per writer

# One writer: append ENTRIES entries to the bundle's benchmarks, each naming its writer and number.
APPEND = """
import sys
from edgeopt.bundle import append_history
from pathlib import Path
bundle, writer, entries = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # start together
for number in range(entries):
    append_history(bundle, "benchmarks", {"writer": writer, "number": number, "latency_ms": {"p50": 1.0}})
"""


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """The digits model built for onnxruntime-cpu (fp32): a real bundle with report.html."""
    output = tmp_path / "digits-ort"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=output, precision="fp32")
    return output


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_appending_fifty_results_each_end_with_a_hundred(bundle: Path) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", APPEND, str(bundle), str(w), str(ENTRIES)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(WRITERS)
    ]
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    failures = [writer.communicate()[1] for writer in writers if writer.wait() != 0]
    entries = json.loads((bundle / "manifest.json").read_text())["benchmarks"]
    print(f"{WRITERS} processes x {ENTRIES} appends -> {len(entries)} entries, {len(failures)} failed writers")
    assert failures == []
    assert sorted((e["writer"], e["number"]) for e in entries) == [(str(w), n) for w in range(WRITERS) for n in range(ENTRIES)]
    assert not [p.name for p in bundle.iterdir() if p.name.endswith((".tmp", ".partial"))]
    verified = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert verified.exit_code == 0, verified.output


def test_the_manifest_is_strict_json(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    with pytest.raises(ValueError, match="JSON compliant"):
        write_manifest(bundle, {**manifest, "benchmarks": [{"latency_ms": {"p50": math.nan}}]})
    assert read_manifest(bundle) == manifest  # the refused write left the old manifest in place
    with pytest.raises(ValueError, match="JSON compliant"):
        append_history(bundle, "benchmarks", {"latency_ms": {"p50": math.inf}})
    assert read_manifest(bundle) == manifest


def test_bench_records_in_the_bundle_and_says_so(bundle: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", str(bundle), "--runs", "3", "--warmup", "0"])
    assert result.exit_code == 0, result.output + result.stderr
    assert len(read_manifest(bundle)["benchmarks"]) == 1
    assert f"recorded in {bundle / 'manifest.json'} (benchmarks: 1)" in result.stderr
    assert CliRunner().invoke(cli, ["verify", str(bundle)]).exit_code == 0


def test_bench_no_record_leaves_the_bundle_byte_for_byte_untouched(bundle: Path) -> None:
    before = file_hashes(bundle)
    result = CliRunner().invoke(cli, ["bench", str(bundle), "--runs", "3", "--warmup", "0", "--no-record"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "recorded" not in result.stderr
    assert file_hashes(bundle) == before
