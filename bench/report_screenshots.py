"""Screenshots of report.html for one int8 build and of `edgeopt compare` for fp32 against int8.

    python bench/report_screenshots.py [--model ppocr_cls] [--out bench/results]

Builds the zoo model for onnxruntime-cpu in fp32 and int8 (--effort fast, 64 calibration and 128
evaluation images), benchmarks both here with layer timings in interleaved rounds, profiles both over
a real sshd on 127.0.0.1 (the tests' fixture, started by hand: the zero-install runtime on the
"device"), compares the last benchmarks, and renders the int8 report and the comparison in headless
Chromium (Debian's `chromium` package; `apt-get install chromium`). Writes to --out:
report_int8_<model>.png (1280×3000, as a first screen), report_int8_<model>_full.png (the whole
page), report_compare_<model>.png, report_compare_<model>.txt/.json and report_screenshots_<model>.md.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgeopt  # noqa: E402
from edgeopt.benchmark import benchmark_here  # noqa: E402
from edgeopt.remote import ProfileOptions, profile  # noqa: E402
from tests import zoo  # noqa: E402
from tests.sdk.conftest import (  # noqa: E402
    SSHD,
    _wait_for_port,
    _write_client_config,
    _write_sshd_config,
    free_port,
    generate_key,
    known_hosts_line,
)

ROUNDS, RUNS, LAYER_RUNS, THREADS = 3, 300, 20, 1


def _npz(path: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    np.savez(path, **{k: np.concatenate([s[k] for s in samples]) for k in samples[0]})
    return path


def _profile_over_ssh(bundles: list[Path], work: Path) -> None:
    """Each bundle profiled once, with layer timings, over a real OpenSSH server on 127.0.0.1."""
    root = work / "sshd"
    root.mkdir()
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    port, user = free_port(), getpass.getuser()
    host_key, client = generate_key(root / "host_key"), generate_key(root / "client")
    (root / "authorized_keys").write_text(client.with_suffix(".pub").read_text())
    known = root / "known_hosts"
    known.write_text(known_hosts_line(port, host_key.with_suffix(".pub")))
    config = _write_sshd_config(root, port, user, host_key, root / "authorized_keys")
    log = root / "sshd.log"
    server = subprocess.Popen([str(SSHD), "-D", "-E", str(log), "-f", str(config)])
    try:
        _wait_for_port(port, server, log)
        options = ProfileOptions(
            port=port, identity=client, python=sys.executable, runs=RUNS, warmup=20, threads=THREADS, connect_timeout=5,
            command_timeout=600, ssh_config=_write_client_config(root, known), known_hosts=known, remote_cache=str(root / "cache"),
            layers=True, layer_runs=LAYER_RUNS,
        )
        for bundle in bundles:
            profile(bundle, [f"{user}@127.0.0.1"], options, progress=lambda m: print("·", m, flush=True))
    finally:
        server.terminate()
        server.wait()


def _screenshot(page: Path, png: Path, height: int) -> None:
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
         f"--window-size=1280,{height}", page.as_uri()],
        check=True, capture_output=True, timeout=300,
    )


def _trim_bottom(png: Path) -> None:
    """The full-page shot is taken tall; cut the white below the last line of the page."""
    image = Image.open(png)
    ink = np.where(np.asarray(image.convert("L")).min(axis=1) < 250)[0]
    image.crop((0, 0, image.width, int(ink.max()) + 40)).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocr_cls", choices=sorted(zoo.REAL_MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    name = args.model
    work = Path(tempfile.mkdtemp(prefix="report_screens_"))
    model = zoo.require_real_model(name)
    shapes = {k: tuple(v) for k, v in zoo.REAL_MODELS[name].inputs.items()}
    calibration = _npz(work / "calibration.npz", zoo.real_inputs(name, 64, split="calibration"))
    evaluation = _npz(work / "eval.npz", zoo.real_inputs(name, 128, split="eval"))
    bundles = {}
    for precision in ("fp32", "int8"):
        bundles[precision] = work / f"{name}-{precision}"
        edgeopt.build(model, "onnxruntime-cpu", output=bundles[precision], precision=precision, calibration=calibration,
                      evaluation=evaluation, input_shapes=shapes, effort="fast")
    lines = []
    for number in range(ROUNDS):
        for precision, bundle in bundles.items():
            result = benchmark_here(bundle, warmup=20, runs=RUNS, threads=THREADS, layers=True, layer_runs=LAYER_RUNS).to_dict()
            latency, layers = result["latency_ms"], result["layers"]
            lines.append(f"| {number} | {precision} | {latency['p50']:.3f} | {latency['p90']:.3f} | {latency['p99']:.3f} | "
                         f"{layers['coverage']} | {layers['overhead']} | {layers['summary']} |")
            print(lines[-1], flush=True)
    _profile_over_ssh(list(bundles.values()), work)
    load = os.getloadavg()

    out = args.out
    runs = [f"{bundles['fp32']}#benchmarks:-1", f"{bundles['int8']}#benchmarks:-1"]
    page = work / "compare.html"
    text = subprocess.run([sys.executable, "-m", "edgeopt.cli", "compare", *runs, "--html", str(page)], capture_output=True, text=True, check=True).stdout
    document = subprocess.run([sys.executable, "-m", "edgeopt.cli", "compare", *runs, "--json"], capture_output=True, text=True, check=True).stdout
    (out / f"report_compare_{name}.txt").write_text(text.replace(str(work) + "/", ""))
    (out / f"report_compare_{name}.json").write_text(json.dumps(json.loads(document.replace(str(work) + "/", "")), indent=2) + "\n")
    _screenshot(page, out / f"report_compare_{name}.png", 3000)
    report = bundles["int8"] / "report.html"
    _screenshot(report, out / f"report_int8_{name}.png", 3000)
    _screenshot(report, out / f"report_int8_{name}_full.png", 9000)
    _trim_bottom(out / f"report_int8_{name}_full.png")
    (out / f"report_screenshots_{name}.md").write_text("\n".join([
        f"# report.html and `edgeopt compare` screenshots: {name}",
        "",
        f"`python bench/report_screenshots.py --model {name}`: {name} built for onnxruntime-cpu in fp32 and in int8 "
        "(--effort fast, 64 calibration / 128 evaluation images), each benchmarked here in "
        f"{ROUNDS} interleaved rounds ({RUNS} runs after 20 warm-up, {THREADS} thread, layer timings over {LAYER_RUNS} "
        f"profiled runs), then profiled once over a real sshd on 127.0.0.1 ({RUNS} runs, layer timings). Load average after: "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on 2 shared cores: latency figures are disturbed (the verdict says "
        "which run is noisy).",
        "",
        f"- report_int8_{name}.png: the int8 bundle's report.html, first 3000 px at 1280 px wide",
        f"- report_int8_{name}_full.png: the whole page",
        f"- report_compare_{name}.png: `edgeopt compare` fp32 (A) against int8 (B), --html",
        f"- report_compare_{name}.txt / .json: the same comparison as text and --json",
        "",
        "| round | precision | p50 ms | p90 ms | p99 ms | layer coverage | profiler overhead | layers |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
