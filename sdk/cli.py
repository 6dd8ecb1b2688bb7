"""The `edgeopt` command: a thin layer where every command is one call of the public API."""

from __future__ import annotations

import enum
import functools
import json
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import click

from edgeopt.errors import EdgeoptError
from edgeopt.runtime.isa import IsaClass
from edgeopt.runtime.kinds import BackendName, CalibrationMethod, Effort, FinetuneMode, Precision, PruneCriterion, Technique
from edgeopt.runtime.manifest import JsonObject

if TYPE_CHECKING:
    from edgeopt.runtime.__main__ import ErrorDocument

__all__ = ["main"]

EXIT_CODES = """\b
Exit codes:
  0  success
  1  unexpected error (a bug: please report it with the traceback)
  2  bad usage or input (missing/corrupt model, unknown target, bad data,
     unsupported ops, existing output, unreachable host, missing backend,
     damaged bundle or checksum mismatch, unsafe archive)
  3  lowering parity missed (a bug), quality budget missed, parity missed
     on a device, a broken int8 result (non-finite, or cosine with fp32
     below 0.5), or a backend rejecting an artifact edgeopt wrote
  130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM): nothing is
     left half-written, the previous output stays as it was"""

F = TypeVar("F", bound=Callable[..., Any])


class _FiniteFloat(click.FloatRange):
    """click's FloatRange, which also refuses nan and inf (FloatRange lets both through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


E = TypeVar("E", bound=enum.Enum)


class _Names(click.Choice, Generic[E]):
    """click.Choice over a closed set's values that hands the command the enum member:
    the string is parsed once, here at the edge, and a wrong one is a usage error (exit 2)."""

    def __init__(self, kind: type[E]) -> None:
        super().__init__([member.value for member in kind])
        self._kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> E:
        return self._kind(super().convert(value, param, ctx))


#: Option types for counts, ports and durations: a value outside is a usage error (exit 2).
_COUNT = click.IntRange(min=1)
_NON_NEGATIVE_COUNT = click.IntRange(min=0)
_PORT = click.IntRange(1, 65535)
_SECONDS = _FiniteFloat(min=0, min_open=True)


def _echo_json(data: JsonObject) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@dataclass(frozen=True)
class _Shown:
    """What a command prints: `document` (a JSON object) with --json, else `text` (None: nothing).

    `failure` is an expected failure that still has results to show (a verify that missed, hosts
    that failed): it is printed after them and sets the exit code.
    """

    document: JsonObject
    text: str | None
    failure: EdgeoptError | None = None


def _failure(kind: str, message: str, hint: str | None, exit_code: int) -> ErrorDocument:
    """The one error document --json prints; the device runtime's `error_document` has the same shape."""
    return {"error": {"type": kind, "message": message, "hint": hint, "exit_code": exit_code}}


def _usage_error_document(exc: click.UsageError) -> ErrorDocument:
    ctx = exc.ctx or click.get_current_context(silent=True)
    where = ctx.command_path if ctx is not None else "edgeopt"
    return _failure(type(exc).__name__, exc.format_message(), f"see `{where} --help`", exc.exit_code)


def _error_document(exc: EdgeoptError) -> ErrorDocument:
    from edgeopt.runtime.__main__ import error_document  # the device runtime prints the same document

    return error_document(exc)


def _expected_errors(func: F) -> F:
    """Print what a command returns (--json: exactly one JSON object on stdout, failures included).

    Expected failures print one `error: ...` on stderr, no traceback, and exit with their code;
    with --json stdout holds {"error": {type, message, hint, exit_code}} (beside the results a
    failed verify or profile still has). Bad option values raised in the body are reported the
    same way; those click finds while parsing go through _JsonUsageErrors.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = bool(kwargs.get("as_json"))
        try:
            shown = func(*args, **kwargs)
        except EdgeoptError as exc:
            shown = _Shown({}, None, failure=exc)
        except click.UsageError as exc:
            if as_json:
                _echo_json(_usage_error_document(exc))
            raise
        except Interrupted as exc:  # main() says so on stderr and exits 130/143
            if as_json:
                _echo_json(_failure("Interrupted", f"interrupted by {exc}; nothing was written", None, exc.exit_code))
            raise
        except Exception as exc:  # a bug: the traceback goes to stderr (exit 1), --json still gets its one document
            if as_json:
                hint = "this is a bug in edgeopt: please report it with the traceback printed on stderr"
                _echo_json(_failure(type(exc).__name__, str(exc), hint, 1))
            raise
        failure = shown.failure
        if as_json:
            _echo_json(shown.document if failure is None else {**shown.document, **_error_document(failure)})
        elif shown.text:
            click.echo(shown.text)
        if failure is not None:
            click.echo(f"error: {failure}", err=True)
            sys.exit(failure.exit_code)

    return wrapper  # type: ignore[return-value]


class _JsonUsageErrors:
    """Usage errors click finds while parsing (bad option values, unknown options or commands):
    with --json among the arguments, also one {"error": ...} document on stdout (exit code 2)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        given = list(args)  # the parser consumes `args`
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except click.UsageError as exc:
            if "--json" in given:
                _echo_json(_usage_error_document(exc))
            raise

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)  # type: ignore[misc]
        except click.UsageError as exc:
            if "--json" in args:
                _echo_json(_usage_error_document(exc))
            raise


class _Command(_JsonUsageErrors, click.Command):
    pass


class _Group(_JsonUsageErrors, click.Group):
    command_class = _Command


class _StageProgress:
    """Stage lines and a calibration bar on stderr; silent when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._bar: Any = None
        self._shown = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if total == 0:
            self._close_bar()
            click.echo(f"· {stage}", err=True)
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=f"  {stage}", file=sys.stderr)
            self._bar.__enter__()
            self._shown = 0
        self._bar.update(done - self._shown)
        self._shown = done
        if done >= total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@click.group(cls=_Group, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeopt")
def cli() -> None:
    """Take a trained ONNX model to an edge device: quantize, lower, verify, profile."""


@cli.command(epilog=EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON: {\"targets\": [...]}.")
@_expected_errors
def targets(as_json: bool) -> _Shown:
    """List the device targets and what each runs."""
    from edgeopt.targets import all_targets

    profiles = all_targets()
    rows = [(t.name, t.artifact_format.value, t.backend.value, ",".join(p.value for p in t.precisions), ", ".join(t.aliases)) for t in profiles]
    headers = ("target", "format", "backend", "precisions", "aliases")
    widths = [max(len(str(r[i])) for r in (*rows, headers)) for i in range(len(headers))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (headers, *rows))
    return _Shown({"targets": [t.to_dict() for t in profiles]}, table)


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", help="Check the model against this target's ops and Q/DQ rules.")
@click.option("--quant-debug", "quant_debug", type=click.Path(path_type=Path), help="Data (.npz) for a per-layer SQNR report of int8 quantization.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_expected_errors
def inspect(model: Path, target: str | None, quant_debug: Path | None, as_json: bool) -> _Shown:
    """Show a model's inputs, size, compute and op mix, and what a target cannot run."""
    from edgeopt.inspect import inspect_model
    from edgeopt.targets import get_target

    report = inspect_model(model, get_target(target) if target else None, quant_debug_data=quant_debug)
    return _Shown(report.to_dict(), report.format_text())


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    shapes = {}
    for value in values:
        name, sep, dims = value.partition("=")
        try:
            if not sep:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise click.BadParameter(f"'{value}' is not NAME=D0,D1,... (e.g. image=1,3,224,224)", param_hint="--input-shape") from None
    return shapes or None


def _technique_switches(pairs: tuple[str, ...]) -> dict[Technique, bool]:
    """`--technique NAME=on|off` pairs as switches; a malformed one is a usage error (exit 2)."""
    switches: dict[Technique, bool] = {}
    for pair in pairs:
        name, _, state = pair.partition("=")
        if name not in {t.value for t in Technique} or state not in ("on", "off"):
            raise click.BadParameter(
                f"'{pair}' is not NAME=on|off with NAME one of {', '.join(t.value for t in Technique)}", param_hint="--technique"
            )
        switches[Technique(name)] = state == "on"
    return switches


@cli.command(epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", required=True, help="Device target or alias (see `edgeopt targets`).")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Bundle folder [default: dist/<model>-<target>].")
@click.option("--precision", "-p", type=_Names(Precision), help="The target's default when omitted; int8 for QAT models.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration data for int8: .npz/.npy or an image folder.")
@click.option(
    "--effort",
    type=_Names(Effort),
    default=Effort.DEFAULT.value,
    show_default=True,
    help="int8 build time for fidelity: fast = min-max ranges; default also tries per-tensor range search, equalization,"
    " bias absorption, SmoothQuant and bias correction; max adds AdaRound. Each is kept only if it helps"
    " on held-out calibration samples.",
)
@click.option("--technique", "techniques", multiple=True, metavar="NAME=on|off", help=f"Force a technique on or off, unmeasured (repeatable): {', '.join(t.value for t in Technique)}.")
@click.option(
    "--calibration-method",
    type=click.Choice([m.value for m in CalibrationMethod]),
    help="Activation range estimator for every tensor [default: min-max, or per tensor by output error when --effort finds it helps].",
)
@click.option("--eval", "evaluation", type=click.Path(path_type=Path), help="Evaluation data (.npz with optional 'labels') to measure quality.")
@click.option("--max-accuracy-drop", type=_FiniteFloat(min=0), help="Quality budget in accuracy points; sensitive layers stay in float to meet it.")
@click.option("--io-layout", type=click.Choice(["nchw", "nhwc"]), help="Input/output layout of NHWC formats (TFLite).")
@click.option("--input-shape", "input_shapes", multiple=True, help="Fix a dynamic input: NAME=D0,D1,... (repeatable).")
@click.option(
    "--isa",
    type=_Names(IsaClass),
    help="CPU class an int8 CPU bundle is for (onnxruntime-cpu, intel-openvino) [default: avx2, exact on every CPU;"
    " vnni/amx/arm64 keep 8-bit weights but saturate on x86 without VNNI].",
)
@click.option("--prune", "prune_ratio", type=_FiniteFloat(min=0), help="Remove this share of each dependency group's channels after simplify (e.g. 0.3); widths stay multiples of the target's channel multiple.")
@click.option("--prune-criterion", type=_Names(PruneCriterion), default=PruneCriterion.AUTO.value, show_default=True, help="How --prune ranks channels (taylor: on --calibration data, needs torch; auto: taylor when both are there, else l2).")
@click.option("--prune-global", is_flag=True, help="One ranking over every group instead of the same share in each.")
@click.option("--prune-protect", "prune_protected", multiple=True, metavar="NODE", help="Keep this layer's output channels (repeatable).")
@click.option(
    "--recover",
    is_flag=True,
    help="With --prune: distil the pruned fp32 model from the unpruned one on --train-data (labels used if given) before quantizing."
    " Needs PyTorch (pip install 'edgeopt[train]').",
)
@click.option(
    "--finetune",
    type=_Names(FinetuneMode),
    help="int8: train the quantized graph's weights and scales on --train-data: qad distils from the fp32 model"
    " (no labels needed), qat trains on the labels. Needs PyTorch (pip install 'edgeopt[train]').",
)
@click.option(
    "--train-data",
    type=click.Path(path_type=Path),
    help="Data for --finetune and --recover: .npz (one array per input, labels as 'labels'), .npy, or an image folder (a sub-folder per class gives labels).",
)
@click.option("--epochs", type=_COUNT, help="--finetune: most epochs [default: 8]; training stops when held-out fidelity stops improving.")
@click.option("--lr", type=_FiniteFloat(min=0, min_open=True), help="--finetune: Adam's learning rate [default: 1e-4].")
@click.option(
    "--finetune-checkpoints",
    type=click.Path(path_type=Path),
    help="--finetune: keep a checkpoint per epoch in this folder; a later build with the same model, data and options resumes from it.",
)
@click.option("--archive", is_flag=True, help="Also pack the bundle as <bundle>.tar.gz.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stdout or stderr but errors (no progress, no summary).")
@click.option("--json", "as_json", is_flag=True, help="Print {bundle, archive, warnings, manifest} as JSON instead of a summary.")
@_expected_errors
def build(
    model: Path,
    target: str,
    output: Path | None,
    precision: Precision | None,
    calibration: Path | None,
    effort: Effort,
    techniques: tuple[str, ...],
    calibration_method: str | None,
    evaluation: Path | None,
    max_accuracy_drop: float | None,
    io_layout: str | None,
    input_shapes: tuple[str, ...],
    isa: IsaClass | None,
    prune_ratio: float | None,
    prune_criterion: PruneCriterion,
    prune_global: bool,
    prune_protected: tuple[str, ...],
    recover: bool,
    finetune: FinetuneMode | None,
    train_data: Path | None,
    epochs: int | None,
    lr: float | None,
    finetune_checkpoints: Path | None,
    archive: bool,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> _Shown:
    """Build a verified bundle of MODEL (ONNX) for a device target."""
    from edgeopt.pipeline import build as run_build
    from edgeopt.targets import get_target

    result = run_build(
        model,
        get_target(target),
        output=output,
        precision=precision,
        calibration=calibration,
        calibration_method=calibration_method,
        effort=effort,
        techniques=_technique_switches(techniques),
        evaluation=evaluation,
        max_accuracy_drop=max_accuracy_drop,
        io_layout=io_layout,
        input_shapes=_parse_shapes(input_shapes),
        isa=isa,
        prune=prune_ratio,
        prune_criterion=prune_criterion,
        prune_global=prune_global,
        prune_protected=prune_protected,
        recover=recover,
        finetune=finetune,
        train_data=train_data,
        epochs=epochs,
        lr=lr,
        finetune_checkpoints=finetune_checkpoints,
        archive=archive,
        force=force,
        progress=_StageProgress(quiet or as_json),
    )
    document = {
        "bundle": str(result.bundle),
        "archive": str(result.archive) if result.archive else None,
        "warnings": result.warnings,
        "manifest": result.manifest,
    }
    return _Shown(document, None if quiet else result.summary_text())


@cli.command(name="prune", epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="The pruned ONNX file.")
@click.option("--ratio", type=_FiniteFloat(min=0), required=True, help="Share of each dependency group's channels to remove (0 <= R < 1).")
@click.option("--target", "-t", help="Round kept widths up to this target's channel multiple.")
@click.option("--channel-multiple", type=_COUNT, help="Round kept widths up to a multiple of N [default: 1, or the target's].")
@click.option("--criterion", type=_Names(PruneCriterion), default=PruneCriterion.AUTO.value, show_default=True, help="How channels are ranked (auto: taylor with --calibration and torch, else l2).")
@click.option("--global", "global_ranking", is_flag=True, help="One ranking over every group instead of the same share in each.")
@click.option("--protect", "protected", multiple=True, metavar="NODE", help="Keep this layer's output channels (repeatable).")
@click.option("--input-shape", "input_shapes", multiple=True, help="Fix a dynamic input: NAME=D0,D1,... (repeatable), so reshapes can be traced.")
@click.option("--calibration", type=click.Path(path_type=Path), help="Representative inputs (.npz, .npy, image folder) the taylor criterion runs on.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stdout but errors.")
@click.option("--json", "as_json", is_flag=True, help="Print {output, changed, report} as JSON instead of a summary.")
@_expected_errors
def prune_command(
    model: Path,
    output: Path,
    ratio: float,
    target: str | None,
    channel_multiple: int | None,
    criterion: PruneCriterion,
    global_ranking: bool,
    protected: tuple[str, ...],
    input_shapes: tuple[str, ...],
    calibration: Path | None,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> _Shown:
    """Remove channels from MODEL (ONNX) structurally: the build's prune step alone, ONNX to ONNX."""
    from edgeopt.pruning import prune

    outcome = prune(
        model,
        output,
        ratio=ratio,
        target=target,
        channel_multiple=channel_multiple,
        criterion=criterion,
        global_ranking=global_ranking,
        protected=protected,
        input_shapes=_parse_shapes(input_shapes),
        calibration=calibration,
        force=force,
    )
    document = {"output": str(outcome.output), "changed": outcome.changed, "report": outcome.report}
    return _Shown(document, None if quiet else outcome.summary_text())


@cli.command(epilog=EXIT_CODES)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=_Names(BackendName), help="Run the reference check on this backend (e.g. onnxruntime for a jetson-orin bundle).")
@click.option("--json", "as_json", is_flag=True)
@_expected_errors
def verify(bundle: Path, backend: BackendName | None, as_json: bool) -> _Shown:
    """Check a bundle's checksums and schema, and re-run its reference inputs here."""
    from edgeopt.verify import verify_bundle

    result = verify_bundle(bundle, backend=backend)
    try:
        result.raise_for_failure()
    except EdgeoptError as failure:
        return _Shown(result.to_dict(), result.format_text(), failure)
    return _Shown(result.to_dict(), result.format_text())


@cli.command(epilog=EXIT_CODES)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=_Names(BackendName), help="Backend to run on [default: the bundle's, or the file type's].")
@click.option("--warmup", type=_NON_NEGATIVE_COUNT, default=10, show_default=True)
@click.option("--runs", type=_COUNT, default=100, show_default=True)
@click.option("--duration", type=_SECONDS, help="Run for this many seconds instead of --runs.")
@click.option("--threads", type=_COUNT, help="Intra-op threads [default: the bundle's].")
@click.option("--no-record", is_flag=True, help="Leave the bundle untouched [default: append the result to its manifest's benchmarks].")
@click.option("--layers", is_flag=True, help="Also time each layer with the backend's own profiler: ONNX node names, int8/float, share of the time.")
@click.option("--layer-runs", type=_COUNT, default=20, show_default=True, help="Profiled runs for --layers.")
@click.option("--json", "as_json", is_flag=True)
@_expected_errors
def bench(
    bundle: Path,
    backend: BackendName | None,
    warmup: int,
    runs: int,
    duration: float | None,
    threads: int | None,
    no_record: bool,
    layers: bool,
    layer_runs: int,
    as_json: bool,
) -> _Shown:
    """Measure a bundle or artifact on this machine (the runtime's own benchmark).

    A bundle folder's result is appended to its manifest (one line on stderr says where);
    --no-record leaves the bundle byte-for-byte untouched.
    """
    from edgeopt.benchmark import benchmark_here

    def said(manifest: Path, count: int) -> None:
        click.echo(f"recorded in {manifest} (benchmarks: {count})", err=True)

    result = benchmark_here(
        bundle, backend=backend, warmup=warmup, runs=runs, duration=duration, threads=threads, record=not no_record, on_record=said,
        layers=layers, layer_runs=layer_runs,
    )
    return _Shown(result.to_dict(), result.format_text())


@cli.command(epilog=EXIT_CODES)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "-i", "input_path", type=click.Path(path_type=Path), required=True, help=".npy (one input) or .npz named by input.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write the outputs to this .npz [default: print a summary].")
@click.option("--backend", type=_Names(BackendName), help="Backend to run on [default: the bundle's, or the file type's].")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs' shapes, dtypes and values (over 10,000 elements: the .npz holding them).")
@_expected_errors
def predict(bundle: Path, input_path: Path, output: Path | None, backend: BackendName | None, as_json: bool) -> _Shown:
    """Run a bundle or artifact on inputs from a file, float in and float out.

    This is the device runtime's own `predict` command, run here.
    """
    from edgeopt.runtime.__main__ import predict_file

    return _Shown(*predict_file(bundle, input_path, output, backend=backend, values=as_json))


@cli.command(epilog=EXIT_CODES)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", "hosts", multiple=True, help="[user@]host of the device (repeatable: hosts run concurrently).")
@click.option("--hosts-file", type=click.Path(path_type=Path), help="More devices: one SSH destination a line (ssh_config aliases, ssh://user@host:port; # comments).")
@click.option("--port", type=_PORT, help="SSH port.")
@click.option("--identity", "-i", type=click.Path(path_type=Path), help="SSH private key.")
@click.option("--jump", "-J", help="ProxyJump host.")
@click.option("--ssh-config", "-F", type=click.Path(path_type=Path), help="ssh_config file to use instead of ~/.ssh/config.")
@click.option("--python", "python", default="python3", show_default=True, help="Python interpreter on the device.")
@click.option("--runs", type=_COUNT, default=100, show_default=True)
@click.option("--warmup", type=_NON_NEGATIVE_COUNT, default=10, show_default=True)
@click.option("--threads", type=_COUNT, help="Intra-op threads on the device [default: the bundle's].")
@click.option("--keep", is_flag=True, help="Keep the pushed runtime and bundle in the device's cache for the next run.")
@click.option("--accept-new-host-key", is_flag=True, help="Accept an unknown host key (StrictHostKeyChecking=accept-new).")
@click.option("--connect-timeout", type=_SECONDS, default=10.0, show_default=True, help="Seconds to wait for the SSH connection.")
@click.option("--timeout", type=_SECONDS, default=600.0, show_default=True, help="Seconds allowed for each remote command.")
@click.option("--max-parallel", type=_COUNT, default=4, show_default=True, help="Hosts profiled at the same time.")
@click.option("--device-timeout", type=_SECONDS, help="Seconds allowed for each device's whole profile [default: no limit beyond --timeout per step].")
@click.option("--layers", is_flag=True, help="Also time each layer on the device with its backend's profiler.")
@click.option("--layer-runs", type=_COUNT, default=20, show_default=True, help="Profiled runs for --layers.")
@click.option("--json", "as_json", is_flag=True)
@_expected_errors
def profile(
    bundle: Path,
    hosts: tuple[str, ...],
    hosts_file: Path | None,
    port: int | None,
    identity: Path | None,
    jump: str | None,
    ssh_config: Path | None,
    python: str,
    runs: int,
    warmup: int,
    threads: int | None,
    keep: bool,
    accept_new_host_key: bool,
    connect_timeout: float,
    timeout: float,
    max_parallel: int,
    device_timeout: float | None,
    layers: bool,
    layer_runs: int,
    as_json: bool,
) -> None:
    """Run a bundle's parity check and benchmark on devices over SSH.

    Results are appended to the bundle's manifest (each device's history under its host name).
    Exit code 3 when a device fails the parity check. --json prints {"profiles": [one result per
    host], "failures": [{host, type, message, hint}]}, with "error" beside them when a host failed.
    """
    from edgeopt.errors import VerificationError
    from edgeopt.remote import ProfileFailedError, ProfileOptions, format_profile_table, read_hosts_file
    from edgeopt.remote import profile as run_profile

    options = ProfileOptions(
        port=port, identity=identity, jump=jump, ssh_config=ssh_config, python=python, runs=runs, warmup=warmup,
        threads=threads, keep=keep, accept_new_host_key=accept_new_host_key, connect_timeout=connect_timeout,
        command_timeout=timeout, max_parallel=max_parallel, device_timeout=device_timeout, layers=layers, layer_runs=layer_runs,
    )
    destinations = [*hosts, *(read_hosts_file(hosts_file) if hosts_file is not None else [])]
    if not destinations:
        raise click.UsageError("name the devices with --host USER@HOST (repeatable) or --hosts-file FILE")

    def shown(results: list[Any], failure: EdgeoptError | None, failures: dict[str, Any] | None = None) -> _Shown:
        document = {
            "profiles": [r.to_dict() for r in results],
            "failures": [
                {"host": host, "type": type(error).__name__, "message": error.message, "hint": error.hint} for host, error in (failures or {}).items()
            ],
        }
        text = format_profile_table(results, failures) if results or failures else None
        return _Shown(document, text, failure)

    try:
        results = run_profile(bundle, destinations, options, progress=None if as_json else (lambda m: click.echo(f"· {m}", err=True)))
    except ProfileFailedError as exc:
        return shown(exc.results, exc, exc.failures)
    failed = [r.host for r in results if not r.verify.get("passed", False)]
    if failed:
        return shown(results, VerificationError(
            f"parity check failed on {', '.join(failed)}: outputs differ from the bundle's reference",
            hint="see each host's verify figures (the table, or profiles[].verify with --json)",
        ))
    return shown(results, None)


@cli.command(epilog=EXIT_CODES)
@click.argument("runs", nargs=-1, required=True)
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="Also write the comparison with its charts as one HTML file.")
@click.option("--json", "as_json", is_flag=True)
@_expected_errors
def compare(runs: tuple[str, ...], html_path: Path | None, as_json: bool) -> _Shown:
    """Set runs side by side against the first: latency, memory, fidelity, per-layer time.

    \b
    Each RUN is one of:
      BUNDLE                 its newest benchmark or profile (a bundle never
                             measured: its build's size and fidelity only)
      BUNDLE#benchmarks:N    an entry of its history (N from 0; -1 the newest)
      BUNDLE#profiles:N
      BUNDLE#HOST            the newest run on that device
      FILE.json              `edgeopt bench --json` output, a profile entry, or
                             `edgeopt profile --json` output of one device
      FILE.json#HOST         that device's entry in `edgeopt profile --json` output
    """
    from edgeopt.bundle import write_text_atomically
    from edgeopt.compare import compare as compare_runs
    from edgeopt.compare import load_run

    comparison = compare_runs([load_run(run) for run in runs])
    text = comparison.format_text()
    if html_path is not None:
        from edgeopt.report import comparison_page

        write_text_atomically(html_path, comparison_page(comparison))
        text += f"\nwrote {html_path}"
    return _Shown(comparison.to_dict(), text)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so it unwinds through every
    `finally` (staging folders, ssh children, remote staging are removed) and past click, which would
    turn KeyboardInterrupt into "Aborted!" and exit 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    """The first SIGINT/SIGTERM raises Interrupted; later ones are ignored so the cleanup it starts finishes."""
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def main() -> None:
    for interrupt in (signal.SIGINT, signal.SIGTERM):
        signal.signal(interrupt, _raise_interrupted)
    try:
        cli(prog_name="edgeopt")
    except Interrupted as exc:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
