"""The bad-input corpus: every misuse a user or a hostile file brings, through the real CLI.

Each case gives the command line (and makes the files it needs), the documented exit code and a
piece of the one-line message. Every case must end with exactly one line starting with "error:"
(edgeopt's own errors) or "Error:" (click's usage errors, printed under click's usage lines), and
never with a traceback. Most cases run in-process with click's CliRunner; the few marked
`subprocess` run `python -m edgeopt.cli` to check the real exit path. Grow CASES whenever a new
bad input is found.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgeopt import build
from edgeopt.benchmark import benchmark_here
from edgeopt.cli import cli
from edgeopt.errors import OptionError
from edgeopt.remote import ProfileOptions
from tests.converters.test_data import write_bomb_png, write_lying_npz

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"
MODEL = str(DIGITS / "model.onnx")
ERROR_LINE = re.compile(r"^(error|Error): ", re.MULTILINE)


class Workspace:
    """A case's folder: makes the files its command line names, and copies of one built bundle."""

    def __init__(self, root: Path, built_bundle: Callable[[], Path]) -> None:
        self.root = root
        self._built_bundle = built_bundle

    def path(self, name: str) -> str:
        return str(self.root / name)

    @property
    def out(self) -> str:
        """The output folder every build case writes to; a failed build must leave nothing there."""
        return self.path("out")

    def text(self, name: str, content: str) -> str:
        (self.root / name).write_text(content)
        return self.path(name)

    def data(self, name: str, content: bytes) -> str:
        (self.root / name).write_bytes(content)
        return self.path(name)

    def npz(self, name: str, **arrays: np.ndarray) -> str:
        np.savez(self.root / name, **arrays)
        return self.path(name)

    def onnx(self, name: str, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str]) -> str:
        graph = helper.make_graph(
            nodes,
            name.removesuffix(".onnx"),
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8]) for n in outputs],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), self.root / name)
        return self.path(name)

    def image_folder(self, name: str, *, junk: bool = False, bomb: bool = False) -> str:
        from PIL import Image

        folder = self.root / name
        folder.mkdir()
        Image.new("L", (8, 8), 128).save(folder / "good.png")
        if junk:
            (folder / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a PNG" * 4)
        if bomb:
            write_bomb_png(folder / "bomb.png")
        return str(folder)

    def bundle(self, tamper: Callable[[Path], None] | None = None) -> str:
        """A copy of the digits fp32 onnxruntime-cpu bundle, changed by `tamper`."""
        copy = self.root / "bundle"
        shutil.copytree(self._built_bundle(), copy)
        if tamper is not None:
            tamper(copy)
        return str(copy)


def _digits(count: int = 8) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS / "eval.npz")
    return data["image"][:count], data["labels"][:count]


def _labels(kind: str) -> dict[str, np.ndarray]:
    images, labels = _digits()
    if kind == "object":
        return {"image": images, "labels": np.array([{"label": int(v)} for v in labels], dtype=object)}
    if kind == "string":
        return {"image": images, "labels": labels.astype(str)}
    nan = labels.astype(np.float64)
    nan[3] = np.nan
    return {"image": images, "labels": nan}


def _drift_reference(bundle: Path) -> None:
    """Outputs that no longer match, with the manifest's checksums updated: a verification failure."""
    from edgeopt.bundle import artifact_entry, read_manifest, write_manifest

    outputs = dict(np.load(bundle / "reference" / "outputs.npz"))
    np.savez(bundle / "reference" / "outputs.npz", **{k: v + 1.0 for k, v in outputs.items()})
    manifest = read_manifest(bundle)
    manifest["artifacts"] = [
        artifact_entry(bundle, a["path"], a["format"], a["role"]) if a["path"] == "reference/outputs.npz" else a
        for a in manifest["artifacts"]
    ]
    write_manifest(bundle, manifest)


def _flip_a_model_byte(bundle: Path) -> None:
    """A changed artifact whose checksum the manifest still holds: a damaged bundle."""
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Workspace], list[str]]
    exit_code: int
    message: str
    subprocess: bool = False


def _build(w: Workspace, *extra: str, model: str = MODEL, target: str = "ort") -> list[str]:
    return ["build", model, "-t", target, "-o", w.out, *extra]


def _int8(w: Workspace, calibration: str, *extra: str) -> list[str]:
    return _build(w, "-p", "int8", "--calibration", calibration, *extra)


CASES = [
    # -- the model --
    Case("missing-model", lambda w: _build(w, model=w.path("nope.onnx")), 2, "nope.onnx"),
    Case("not-onnx", lambda w: _build(w, model=w.text("notes.onnx", "hello, I am not a model\n")), 2, "notes.onnx", subprocess=True),
    Case("truncated-protobuf", lambda w: _build(w, model=w.data("cut.onnx", Path(MODEL).read_bytes()[:2000])), 2, "cut.onnx"),
    Case(
        "unsupported-ops",
        lambda w: _build(w, model=w.onnx("hardmax.onnx", [helper.make_node("Hardmax", ["x"], ["y"], name="first_hardmax")], ["x"], ["y"]), target="jetson-orin"),
        2,
        "first_hardmax",
    ),
    Case("no-nodes-on-intel-openvino", lambda w: _build(w, model=w.onnx("empty.onnx", [], ["x"], ["x"]), target="intel-openvino"), 2, "the model has no nodes"),
    Case("input-shape-for-a-missing-input", lambda w: _build(w, "--input-shape", "foo=1,2"), 2, "--input-shape names foo"),
    # -- target, precision, output --
    Case("unknown-target", lambda w: _build(w, target="jetson-orn"), 2, "did you mean 'jetson-orin'"),
    Case("precision-the-target-lacks", lambda w: _build(w, "-p", "palettized-4", target="jetson-orin"), 2, "precision 'palettized-4' is not available"),
    Case("int8-without-calibration", lambda w: _build(w, "-p", "int8"), 2, "--calibration"),
    Case("existing-output-without-force", lambda w: ["build", MODEL, "-t", "ort", "-o", str(w.bundle())], 2, "--force"),
    # -- the budget --
    Case("budget-without-eval", lambda w: _int8(w, str(DIGITS / "calib.npz"), "--max-accuracy-drop", "1"), 2, "--eval"),
    Case("budget-nan", lambda w: _build(w, "--max-accuracy-drop", "nan"), 2, "'--max-accuracy-drop': 'nan' is not a finite number"),
    Case("budget-inf", lambda w: _build(w, "--max-accuracy-drop", "inf"), 2, "'--max-accuracy-drop': 'inf' is not a finite number"),
    Case("budget-negative", lambda w: _build(w, "--max-accuracy-drop", "-1"), 2, "'--max-accuracy-drop': -1.0 is not in the range x>=0"),
    # -- calibration and evaluation data --
    Case("calibration-wrong-shape", lambda w: _int8(w, w.npz("calib.npz", image=np.zeros((4, 1, 4, 4), np.float32))), 2, "input 'image'"),
    Case("corrupt-png-in-calibration-folder", lambda w: _int8(w, w.image_folder("images", junk=True)), 2, "junk.png"),
    Case("png-decompression-bomb", lambda w: _int8(w, w.image_folder("images", bomb=True)), 2, "bomb.png has more than 64,000,000 pixels"),
    Case("object-labels", lambda w: _build(w, "--eval", w.npz("eval.npz", **_labels("object"))), 2, "eval.npz:labels.npy holds Python objects"),
    Case("string-labels", lambda w: _build(w, "--eval", w.npz("eval.npz", **_labels("string"))), 2, "expected integer class indices"),
    Case("nan-labels", lambda w: _build(w, "--eval", w.npz("eval.npz", **_labels("nan"))), 2, "that are not class indices (label 3 is nan)"),
    Case(
        "npz-header-lies-about-its-size",
        lambda w: _int8(w, str(write_lying_npz(w.root / "calib.npz", "image", _digits()[0], claimed_samples=10**9))),
        2,
        "declares shape (1000000000, 1, 8, 8)",
    ),
    Case(
        "extra-arrays-in-calibration",
        lambda w: _int8(w, w.npz("calib.npz", image=_digits()[0], mask=_digits()[0], other=_digits()[0])),
        2,
        "'mask', 'other' that are not inputs of the model (its inputs: 'image')",
    ),
    Case("wrongly-named-single-array", lambda w: _int8(w, w.npz("calib.npz", pixels=_digits()[0])), 2, "'pixels' that are not inputs of the model (its inputs: 'image')"),
    # -- bench, profile, verify --
    Case("bench-runs-negative", lambda w: ["bench", w.bundle(), "--runs", "-5"], 2, "'--runs': -5 is not in the range x>=1"),
    Case("bench-missing-bundle", lambda w: ["bench", w.path("nowhere")], 2, "nowhere"),
    Case("profile-runs-0", lambda w: ["profile", w.bundle(), "--host", "pi@device", "--runs", "0"], 2, "'--runs': 0 is not in the range x>=1"),
    Case(
        "profile-port-out-of-range",
        lambda w: ["profile", w.bundle(), "--host", "pi@device", "--port", "70000"],
        2,
        "'--port': 70000 is not in the range 1<=x<=65535",
        subprocess=True,
    ),
    Case("verify-checksum-mismatch", lambda w: ["verify", w.bundle(_flip_a_model_byte)], 2, "does not match manifest.json"),
    Case("verify-drifted-reference", lambda w: ["verify", w.bundle(_drift_reference)], 3, "outputs differ from the reference", subprocess=True),
    Case("predict-missing-input-file", lambda w: ["predict", w.bundle(), "--input", w.path("absent.npy")], 2, "absent.npy"),
    Case("predict-wrongly-named-input", lambda w: ["predict", w.bundle(), "--input", w.npz("x.npz", pixels=_digits(1)[0])], 2, "image"),
    Case("inspect-not-onnx", lambda w: ["inspect", w.text("notes.onnx", "not a model")], 2, "notes.onnx"),
]


@pytest.fixture(scope="module")
def built_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """The digits model built once for onnxruntime-cpu (fp32), on first use."""
    built: list[Path] = []

    def get() -> Path:
        if not built:
            built.append(build(MODEL, "onnxruntime-cpu", output=tmp_path_factory.mktemp("built") / "digits").bundle)
        return built[0]

    return get


def _run(case: Case, args: list[str]) -> tuple[int, str]:
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "edgeopt.cli", *args], capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    result = CliRunner().invoke(cli, args, prog_name="edgeopt")
    assert result.exception is None or isinstance(result.exception, SystemExit), f"unexpected {result.exception!r}\n{result.output}"
    return result.exit_code, result.output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_with_the_documented_exit_code(case: Case, tmp_path: Path, built_bundle: Callable[[], Path]) -> None:
    workspace = Workspace(tmp_path, built_bundle)
    code, output = _run(case, case.args(workspace))
    assert code == case.exit_code, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if ERROR_LINE.match(line)]
    assert len(error_lines) == 1, output
    assert case.message in output, output
    assert not Path(workspace.out).exists(), "a failed build left output behind"


def test_the_corpus_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "call",
    [
        lambda: build(MODEL, "ort", max_accuracy_drop=float("nan"), evaluation=DIGITS / "eval.npz"),
        lambda: build(MODEL, "ort", max_accuracy_drop=-1.0, evaluation=DIGITS / "eval.npz"),
        lambda: benchmark_here(MODEL, runs=-5),
        lambda: benchmark_here(MODEL, duration=float("inf")),
        lambda: ProfileOptions(runs=0),
        lambda: ProfileOptions(port=70000),
        lambda: ProfileOptions(command_timeout=float("nan")),
    ],
    ids=["build-budget-nan", "build-budget-negative", "bench-runs-negative", "bench-duration-inf", "profile-runs-0", "profile-port-70000", "profile-timeout-nan"],
)
def test_the_python_api_refuses_what_the_cli_refuses_with_an_option_error(call: Callable[[], object]) -> None:
    """Scripts call the API directly: the same values are an EdgeoptError (exit 2), not a ValueError or a silent accept."""
    with pytest.raises(OptionError):
        call()


@pytest.mark.parametrize("option", [["--runs", "-5"], ["--runs", "0"], ["--warmup", "-1"], ["--duration", "nan"]], ids=lambda o: " ".join(o))
def test_the_device_runtime_refuses_what_edgeopt_bench_refuses(tmp_path: Path, built_bundle: Callable[[], Path], option: list[str]) -> None:
    """`python -m edgeopt.runtime bench` on the device: the same values are exit 2 with one error line, not clamped."""
    bundle = Workspace(tmp_path, built_bundle).bundle()
    proc = subprocess.run([sys.executable, "-m", "edgeopt.runtime", "bench", bundle, *option], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [proc.stderr.splitlines()[0]], proc.stderr


def test_a_parity_miss_on_a_device_exits_3(tmp_path: Path, built_bundle: Callable[[], Path], sshd) -> None:
    """The documented code for a device that fails the bundle's parity check, over the real test sshd."""
    bundle = Workspace(tmp_path, built_bundle).bundle(_drift_reference)
    args = [
        "profile", bundle, "--host", sshd.host, "--port", str(sshd.port), "-i", str(sshd.client_key),
        "-F", str(sshd.ssh_config), "--python", sys.executable, "--runs", "2", "--warmup", "0",
    ]
    result = CliRunner().invoke(cli, args, prog_name="edgeopt")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if ERROR_LINE.match(line)]) == 1, result.output
    assert "parity check failed on" in result.output
