"""report.html: a page a person can read — every chart decodes and is not blank, every section the
manifest has data for is there, and headless Chromium loads it without a console message.

The bundle is the digits model in int8 with a real history: a benchmark here and a profile over
SSH (the `sshd` fixture: a real OpenSSH server on 127.0.0.1 running the zero-install runtime).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeopt
from edgeopt.benchmark import benchmark_here
from edgeopt.bundle import append_history
from edgeopt.remote import profile
from edgeopt.report import render
from edgeopt.report_charts import latency_histogram
from edgeopt.runtime.bundle import read_manifest
from edgeopt.runtime.manifest import Manifest
from edgeopt.verify import verify_bundle

from .conftest import SshServer

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
IMAGE = re.compile(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'")
CHROMIUM = shutil.which("chromium")
CONSOLE = re.compile(r":CONSOLE\(?:?\d*\)?\]? \"(.*)\", source:")
# Loaded after the page in a copy under test: says how many images Chromium decoded.
PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
         "console.log('edgeopt-probe decoded='+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length)})</script>")


def expected_sections(manifest: Manifest) -> set[str]:
    """The sections a manifest has data for (written from the manifest, not from the report's code)."""
    sections = {"sizes", "stages", "parity", "artifacts"}
    if manifest.quality is not None:
        sections.add("quality")
    if (manifest.quantization or {}).get("per_layer_sqnr"):
        sections.add("quantization")
    history = [*manifest.benchmarks, *manifest.profiles]
    if history:
        sections |= {"runs", "history"}
    layer_profiles = [e.results.get("layers") or (e.results.get("bench") or {}).get("layers") for e in history]
    if any(isinstance(p, dict) and p.get("available") and p.get("layers") for p in layer_profiles):
        sections.add("layers")
    return sections


def page_problems(page: str, sections: set[str] = frozenset()) -> list[str]:
    """What is broken on a page: an image that does not decode or is blank, a missing section."""
    problems = []
    images = IMAGE.findall(page)
    if not images:
        problems.append("no embedded image")
    for number, encoded in enumerate(images):
        try:
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))).convert("L"), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
            problems.append(f"image {number} does not decode: {exc}")
            continue
        if pixels.size < 100 * 100 or pixels.std() < 5.0:
            problems.append(f"image {number} is blank or tiny ({pixels.shape}, pixel std {pixels.std():.2f})")
    problems += [f"section {key!r} missing" for key in sorted(sections) if f"<section id='{key}'>" not in page]
    return problems


def chromium_console(page: Path) -> list[str]:
    """Console messages headless Chromium printed while loading `page` with the image probe appended."""
    probed = page.with_name(page.stem + ".probe.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert "<section" in done.stdout, f"Chromium did not load the page:\n{done.stderr[-2000:]}"
    return CONSOLE.findall(done.stderr)


@pytest.fixture(scope="module")
def measured_bundle(tmp_path_factory: pytest.TempPathFactory, sshd: SshServer) -> Path:
    """digits in int8 with two benchmarks here (one with layer timings) and a profile over SSH in its history."""
    bundle = tmp_path_factory.mktemp("report") / "digits-int8"
    edgeopt.build(DIGITS / "model.onnx", "ort", output=bundle, precision="int8",
                  calibration=DIGITS / "calib.npz", evaluation=DIGITS / "eval.npz")
    benchmark_here(bundle, warmup=5, runs=60)
    benchmark_here(bundle, warmup=5, runs=60, layers=True, layer_runs=5)
    profile(bundle, [sshd.host], sshd.profile_options(runs=60, remote_cache=str(bundle.parent / "device-cache")))
    return bundle


def test_the_page_has_every_section_its_manifest_has_data_for_and_every_chart_decodes(measured_bundle: Path) -> None:
    manifest = read_manifest(measured_bundle)
    page = (measured_bundle / "report.html").read_text(encoding="utf-8")
    sections = expected_sections(manifest)
    assert {"quality", "quantization", "layers", "runs", "history"} <= sections
    assert page_problems(page, sections) == []
    # charts: sizes, stage times, layer times beside SQNR, per-layer SQNR, three latency histograms, the history
    assert len(IMAGE.findall(page)) == 8
    layers = manifest.benchmarks[1].results["layers"]
    assert f"<p class='verdict'>{layers['summary']}</p>" in page
    assert "beside each layer&#x27;s quantization error" in page  # the int8 kernels' nodes have SQNR in the quantizer's report
    for stage in ("simplify", "quantize", "lower", "verify"):
        assert f"<td>{stage}</td>" in page
    assert "Reference parity on the device: <span class='good'>passed</span>" in page
    assert page.count("Reference parity: not checked by this run") == 2  # the benchmarks time only
    assert "AMD" in page or "Intel" in page or "CPU" in page
    assert verify_bundle(measured_bundle).passed  # report.html was redrawn with its checksum


def test_the_checks_find_a_broken_page(measured_bundle: Path) -> None:
    page = (measured_bundle / "report.html").read_text(encoding="utf-8")
    first = IMAGE.search(page)
    assert first is not None
    corrupt = page.replace(first.group(1), first.group(1)[: len(first.group(1)) // 2] + "AAAA", 1)
    white = io.BytesIO()
    Image.new("RGB", (900, 300), "white").save(white, format="PNG")
    blank = page.replace(first.group(1), base64.b64encode(white.getvalue()).decode(), 1)
    without_history = page.replace("<section id='history'>", "<section id='h'>")

    assert any("does not decode" in p for p in page_problems(corrupt))
    assert any("blank" in p for p in page_problems(blank))
    assert page_problems(without_history, {"history"}) == ["section 'history' missing"]


def test_the_histogram_marks_the_real_p99_not_the_maximum() -> None:
    rng = np.random.default_rng(0)
    samples = list(rng.gamma(4.0, 0.5, size=30)) + [40.0]  # 31 runs, one outlier: p99 is not the max
    _, drawn = latency_histogram(samples)
    assert drawn.p99 == pytest.approx(float(np.percentile(samples, 99)))
    assert drawn.p99 < max(samples) == drawn.max
    assert (drawn.p50, drawn.p90) == pytest.approx(tuple(np.percentile(samples, [50, 90])))


def test_a_run_caption_gives_the_percentiles_of_its_samples(measured_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(measured_bundle, bundle)
    result = read_manifest(bundle).benchmarks[0].results
    # the measured run with one page-fault-like outlier in place of its last sample: p99 is not the max
    entry = {**result, "time": "2026-01-01T00:00:00+00:00", "samples_ms": [*result["samples_ms"][:39], 1000.0]}
    append_history(bundle, "benchmarks", entry)
    page = render(read_manifest(bundle))
    p99 = float(np.percentile(entry["samples_ms"], 99))
    assert f"p99 {p99:.4g} ms, max 1000 ms (1 run(s) slower than p99)" in page
    assert page_problems(page, expected_sections(read_manifest(bundle))) == []


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Chromium: apt-get install chromium (Debian's `chromium` package)")
def test_chromium_loads_the_page_without_console_errors_and_decodes_every_image(measured_bundle: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    shutil.copy(measured_bundle / "report.html", page)
    images = len(IMAGE.findall(page.read_text(encoding="utf-8")))
    assert chromium_console(page) == [f"edgeopt-probe decoded={images} of {images}"]

    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text(encoding="utf-8").replace("base64,", "base64,!!", 1).replace("</body>", "<script>missing()</script></body>"))
    messages = chromium_console(broken)
    assert f"edgeopt-probe decoded={images - 1} of {images}" in messages
    assert any("ReferenceError" in m for m in messages)


def test_the_page_is_self_contained(measured_bundle: Path) -> None:
    """Readable offline on a device: no script, no external resource."""
    page = (measured_bundle / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?(https?:|//)", page)
