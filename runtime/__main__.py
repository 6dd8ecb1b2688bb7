"""`python -m edgeopt.runtime {info,predict,bench,verify} [--json]` — the device-side commands.

argparse only (a device has no click). With --json, stdout carries exactly one JSON document;
expected failures (bad arguments included) print one `error: ...` line on stderr (and, with
--json, an {"error": {type, message, hint, exit_code}} document on stdout; a failed verify adds
"error" to its result) and exit with the error's code: 2 bad usage or input, 3 verification failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn, TypedDict

import numpy as np

from edgeopt.runtime.backends import BACKENDS, BackendSummary, backends_summary
from edgeopt.runtime.bundle import SCHEMA_VERSION, open_bundle
from edgeopt.runtime.device import DeviceFacts, device_facts
from edgeopt.runtime.errors import EdgeoptError, InputSpecError
from edgeopt.runtime.kinds import BackendName
from edgeopt.runtime.model import load
from edgeopt.runtime.verify import verify

__all__ = ["main", "build_parser", "error_document", "predict_file"]

EPILOG = (
    "exit codes: 0 ok, 1 unexpected error, 2 bad usage or input (incl. missing backend, damaged bundle or checksum "
    "mismatch, unsafe archive), 3 verification failed (outputs differ from the reference beyond its tolerance), 130 interrupted (Ctrl-C)"
)

#: predict --json prints outputs up to this many elements inline; larger ones are left in the .npz it writes
INLINE_ELEMENTS = 10_000

#: what a command returns: the --json document, the text printed without --json, the exit code
Outcome = tuple[Mapping[str, object], str, int]


class RuntimeFacts(TypedDict):
    version: str | None
    bundle_schema: str


class InfoDocument(TypedDict):
    runtime: RuntimeFacts
    device: DeviceFacts
    backends: dict[BackendName, BackendSummary]
    bundle: dict[str, Any] | None  # Bundle.summary()


class OutputEntry(TypedDict, total=False):
    """One output in predict's document: values inline (small outputs, with --json) or the .npz holding them."""

    shape: list[int]
    dtype: str
    values: list[Any]  # nested lists of numbers (null for non-finite floats)
    file: str


class PredictDocument(TypedDict):
    output_file: str | None
    outputs: dict[str, OutputEntry]


class ErrorDetails(TypedDict):
    type: str
    message: str
    hint: str | None
    exit_code: int


class ErrorDocument(TypedDict):
    error: ErrorDetails


class UsageError(EdgeoptError):
    """Bad command-line arguments (argparse's own errors, so --json reports them like any other)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message, hint=f"see `{self.prog} --help`")


def runtime_version() -> str | None:
    return getattr(sys.modules.get("edgeopt"), "__version__", None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m edgeopt.runtime", description="Run, measure and verify an edgeopt bundle on this device.", epilog=EPILOG
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("bundle", type=Path, help="bundle folder, .tar.gz bundle, or .onnx/.tflite/.xml/.mlpackage")
        command.add_argument("--backend", choices=[name.value for name in BACKENDS], help="override the manifest's backend")
        command.add_argument("--threads", type=int, help="CPU threads for the backend")
        command.add_argument("--device", help="backend device: CPU/GPU/NPU/AUTO (OpenVINO), cpu/cuda/tensorrt (ONNX Runtime), ALL/CPU_ONLY/... (Core ML)")
        command.add_argument("--json", action="store_true", help="print one JSON document")

    info = commands.add_parser("info", help="device facts, available backends, and a bundle's summary", epilog=EPILOG)
    info.add_argument("bundle", type=Path, nargs="?", help="bundle to summarize (checksums are checked)")
    info.add_argument("--json", action="store_true", help="print one JSON document")

    bench = commands.add_parser("bench", help="benchmark latency, throughput and memory", epilog=EPILOG)
    model_options(bench)
    bench.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    bench.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    bench.add_argument("--duration", type=float, help="time for S seconds instead of --runs")
    bench.add_argument("--layers", action="store_true", help="also time each layer with the backend's profiler (after the latency runs)")
    bench.add_argument("--layer-runs", type=int, default=20, help="profiled runs for --layers (default 20)")

    check = commands.add_parser("verify", help="compare outputs with the bundle's reference at its tolerance", epilog=EPILOG)
    model_options(check)

    predict = commands.add_parser("predict", help="run inputs from .npy/.npz and write outputs to .npz", epilog=EPILOG)
    model_options(predict)
    predict.add_argument("--input", type=Path, required=True, help=".npy (one-input models) or .npz keyed by input name")
    predict.add_argument("--output", type=Path, help=".npz to write (keyed by output name)")
    predict.add_argument("--raw", action="store_true", help="integer tensors in and out, no (de)quantization")
    return parser


def command_info(args: argparse.Namespace) -> Outcome:
    bundle = open_bundle(args.bundle).summary() if args.bundle is not None else None
    document: InfoDocument = {
        "runtime": {"version": runtime_version(), "bundle_schema": SCHEMA_VERSION},
        "device": device_facts(),
        "backends": backends_summary(),
        "bundle": bundle,
    }
    device = document["device"]
    lines = [
        f"edgeopt runtime {runtime_version() or ''} on {device['hostname']}: {device['os']['system']} {device['os']['release']} {device['os']['machine']}",
        f"  cpu     {device['cpu']['model']} ({device['cpu']['logical_cores']} logical cores)",
        f"  python  {device['python']['version']}  numpy {device['libraries'].get('numpy')}",
    ]
    for name, backend in document["backends"].items():
        state = backend["version"] if backend["available"] else f"not available ({backend['install']})"
        lines.append(f"  {name:12} {state}")
    if bundle is not None:
        lines.append(f"  bundle  {bundle['name']}: {bundle['target']} {bundle['precision']} on {bundle['backend']} ({bundle['model']})")
    return document, "\n".join(lines), 0


def command_bench(args: argparse.Namespace) -> Outcome:
    with load(args.bundle, backend=args.backend, threads=args.threads, device=args.device, allow_stand_in=True) as model:
        result = model.benchmark(warmup=args.warmup, runs=args.runs, duration=args.duration, layers=args.layers, layer_runs=args.layer_runs)
    return result.to_dict(), result.format_text(), 0


def command_verify(args: argparse.Namespace) -> Outcome:
    result = verify(args.bundle, backend=args.backend, threads=args.threads, device=args.device)
    if not result.passed:
        try:
            result.raise_for_failure()
        except EdgeoptError as error:
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return {**result.to_dict(), **error_document(error)}, result.format_text(), error.exit_code
    return result.to_dict(), result.format_text(), 0


def read_inputs(path: Path, single_input: str | None) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputSpecError(f"{path}: no such input file", hint="pass a .npy or .npz file")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
            if single_input is None:
                raise InputSpecError(f"{path}: a .npy holds one array but the model has several inputs", hint="pass a .npz keyed by input name")
            return {single_input: array}
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputSpecError(f"{path}: cannot read ({exc})", hint="save arrays with numpy.save / numpy.savez (no pickled objects)") from None


def write_outputs(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """Write to a temporary sibling and rename, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **outputs)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def predict_file(
    bundle: Path,
    input_path: Path,
    output: Path | None = None,
    *,
    backend: BackendName | str | None = None,
    threads: int | None = None,
    device: str | None = None,
    raw: bool = False,
    values: bool = False,
) -> tuple[PredictDocument, str]:
    """Run the inputs of a .npy/.npz file; returns the JSON document and the text summary.

    With `values`, each output of at most INLINE_ELEMENTS elements is in the document as a
    nested list (non-finite values as null); larger ones are only in the .npz, which is then
    written even without `output` (to a new temporary file) and named in the document.
    """
    with load(bundle, backend=backend, threads=threads, device=device) as model:
        single = model.inputs[0].name if len(model.inputs) == 1 else None
        outputs = model.predict(read_inputs(input_path, single), raw=raw)
    if output is None and values and any(value.size > INLINE_ELEMENTS for value in outputs.values()):
        handle, temporary = tempfile.mkstemp(prefix=f"{input_path.stem}-outputs-", suffix=".npz")
        os.close(handle)
        output = Path(temporary)
        print(f"note: outputs over {INLINE_ELEMENTS:,} elements are in {output}", file=sys.stderr)
    if output is not None:
        write_outputs(output, outputs)
    document: PredictDocument = {
        "output_file": str(output) if output is not None else None,
        "outputs": {name: _output_entry(value, output, values) for name, value in outputs.items()},
    }
    lines = [f"{name}: {value.shape} {value.dtype}" for name, value in outputs.items()]
    if output is not None:
        lines.append(f"wrote {output}")
    return document, "\n".join(lines)


def _output_entry(value: np.ndarray, output: Path | None, values: bool) -> OutputEntry:
    entry: OutputEntry = {"shape": list(value.shape), "dtype": value.dtype.name}
    if not values:
        return entry
    if value.size > INLINE_ELEMENTS:
        return {**entry, "file": str(output)}
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        return {**entry, "values": np.where(np.isfinite(value), value.astype(np.float64), None).tolist()}
    return {**entry, "values": value.tolist()}


def command_predict(args: argparse.Namespace) -> Outcome:
    document, text = predict_file(
        args.bundle, args.input, args.output, backend=args.backend, threads=args.threads, device=args.device,
        raw=args.raw, values=args.json,
    )
    return document, text, 0


COMMANDS = {"info": command_info, "bench": command_bench, "verify": command_verify, "predict": command_predict}


def error_document(error: EdgeoptError) -> ErrorDocument:
    """What --json prints for an expected failure (the edgeopt CLI prints the same)."""
    return {"error": {"type": type(error).__name__, "message": error.message, "hint": error.hint, "exit_code": error.exit_code}}


def _one_line(error: EdgeoptError) -> str:
    text = error.message if error.hint is None else f"{error.message} (hint: {error.hint})"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        document, text, code = COMMANDS[args.command](args)
    except EdgeoptError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        if "--json" in argv:
            print(json.dumps(error_document(error)))
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(document, default=str) if args.json else text)
    return code


if __name__ == "__main__":
    sys.exit(main())
