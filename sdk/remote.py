"""Remote profiling: run a bundle on a device over SSH and bring back latency, memory, parity and
the device's facts.

Everything goes through the system OpenSSH client, so the user's ~/.ssh/config, agent, ProxyJump
and known_hosts apply as they do for `ssh`. Per device: one master connection (host key and
authentication are checked there), then a handful of `ssh HOST COMMAND` calls over it, each
command built from `shlex.quote`d words: a probe (Python version, what the cache holds), an
upload per missing file (streamed on stdin into a small Python program that checks its sha256
before renaming it into place), and one run of the runtime zipapp's `info`, `verify` and `bench`
with `--json`. Nothing on the device needs edgeopt installed.

Device cache: `~/.cache/edgeopt/<sha256>/` (option `remote_cache`), one folder per file keyed by
its checksum: the runtime zipapp, and the bundle's device copy (a reproducible tar.gz, extracted
next to itself). A run uses what the cache holds. With `keep`, it uploads what is missing into the
cache, where it stays for the next run; without, it uploads into a folder of its own
(`<cache>/.run-<random>/`) that it removes when done. Cache entries are never removed by a run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from edgeopt.errors import BundleError, OptionError, RemoteError
from edgeopt.remote_facts import bench_figures, device_facts, device_summary, parity_summary, temperature_summary
from edgeopt.remote_payload import (
    CLEANUP_SCRIPT,
    PROBE_SCRIPT,
    RECEIVE_SCRIPT,
    RUN_SCRIPT,
    Payload,
    device_copy,
    sha256_file,
    unpack_local_archive,
)
from edgeopt.runtime.manifest import JsonObject
from edgeopt.zipapp import ZIPAPP_NAME, build_runtime_zipapp

__all__ = [
    "DEFAULT_REMOTE_CACHE",
    "AuthenticationError",
    "HostKeyChangedError",
    "HostUnreachableError",
    "ProfileFailedError",
    "ProfileEntry",
    "ProfileOptions",
    "ProfileResult",
    "RemoteBackendMissingError",
    "RemoteCommandError",
    "RemoteError",
    "RemotePythonError",
    "RemoteTimeoutError",
    "UnknownHostKeyError",
    "format_profile_table",
    "profile",
    "read_hosts_file",
]

DEFAULT_REMOTE_CACHE = "~/.cache/edgeopt"
MIN_DEVICE_PYTHON = (3, 10)
"""The runtime zipapp needs what the package needs (requires-python)."""

_STDERR_TAIL_LINES = 25


# ----------------------------------------------------------------------------------------- errors


class HostUnreachableError(RemoteError):
    """No SSH connection: connection refused, no route, name not resolved, or timed out."""


class AuthenticationError(RemoteError):
    """The device's sshd refused every key (or method) the client offered."""


class HostKeyChangedError(RemoteError):
    """The device presented a host key that differs from the one in known_hosts."""


class UnknownHostKeyError(RemoteError):
    """The device's host key is not in known_hosts and strict checking is on."""


class RemotePythonError(RemoteError):
    """The `--python` interpreter is missing on the device, or too old for the runtime."""


class RemoteBackendMissingError(RemoteError):
    """The device lacks the library the bundle's backend needs; the hint says how to install it."""


class RemoteCommandError(RemoteError):
    """A command on the device failed; the message carries its exit code and stderr."""


class RemoteTimeoutError(RemoteError):
    """A step on the device did not finish within the command timeout."""


class ProfileFailedError(RemoteError):
    """Some of several hosts failed; `results` holds the hosts that succeeded, `failures` the rest."""

    def __init__(self, results: list[ProfileResult], failures: dict[str, RemoteError]) -> None:
        self.results = results
        self.failures = failures
        lines = [f"{len(failures)} of {len(results) + len(failures)} hosts failed:"]
        lines += [f"  {host}: {type(error).__name__}: {error}" for host, error in failures.items()]
        super().__init__("\n".join(lines), hint="the hosts that succeeded were recorded in the bundle's profiles")


# ---------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ProfileOptions:
    """How to reach the devices and what to run there.

    `identity`, `jump`, `port`, `ssh_config` (-F) and `known_hosts` (UserKnownHostsFile) override
    the user's ~/.ssh/config only when given. `remote_cache` is on the device; a relative path is
    relative to the login folder. `device_timeout` bounds each device's whole profile (connecting,
    uploads, verify, bench), so one slow or hung device of a fleet cannot hold the others' results;
    `command_timeout` bounds each step. `layers` adds the per-layer table to the bench
    (`layer_runs` profiled runs).
    """

    port: int | None = None
    identity: Path | None = None
    jump: str | None = None
    python: str = "python3"
    runs: int = 100
    warmup: int = 10
    threads: int | None = None
    keep: bool = False
    accept_new_host_key: bool = False
    connect_timeout: float = 10.0
    command_timeout: float = 600.0
    max_parallel: int = 4
    ssh_config: Path | None = None
    known_hosts: Path | None = None
    remote_cache: str = DEFAULT_REMOTE_CACHE
    device_timeout: float | None = None
    layers: bool = False
    layer_runs: int = 20

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0:
            raise OptionError(f"runs must be >= 1 and warmup >= 0, got runs={self.runs} warmup={self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"threads must be >= 1, got {self.threads}")
        if self.max_parallel < 1:
            raise OptionError(f"max_parallel must be >= 1, got {self.max_parallel}")
        if not (0 < self.connect_timeout < math.inf and 0 < self.command_timeout < math.inf):
            raise OptionError(
                f"connect_timeout and command_timeout must be positive seconds, got {self.connect_timeout} and {self.command_timeout}"
            )
        if self.device_timeout is not None and not 0 < self.device_timeout < math.inf:
            raise OptionError(f"device_timeout must be positive seconds, got {self.device_timeout}")
        if self.layer_runs < 1:
            raise OptionError(f"layer_runs must be >= 1, got {self.layer_runs}")
        if self.port is not None and not 0 < self.port < 65536:
            raise OptionError(f"port must be in 1..65535, got {self.port}")
        if not self.python.strip():
            raise OptionError("python must name the device's interpreter, e.g. python3")


# ----------------------------------------------------------------------------------------- result


class ProfileEntry(TypedDict):
    """An entry of the manifest's `profiles`."""

    host: str
    time: str
    device: JsonObject
    bench: JsonObject
    verify: JsonObject
    warnings: list[str]


@dataclass(frozen=True)
class ProfileResult:
    """One device's measurements; `to_dict()` is the entry appended to the manifest's `profiles`.

    `device`, `bench` and `verify` are the documents the device's runtime printed (its `info`,
    `bench` and `verify` --json), kept as it wrote them: that runtime may be another version.
    """

    host: str
    time: str
    device: JsonObject
    bench: JsonObject
    verify: JsonObject
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def throttled(self) -> bool:
        return bool(self.device.get("throttled_during_run"))

    def to_dict(self) -> ProfileEntry:
        return {
            "host": self.host,
            "time": self.time,
            "device": self.device,
            "bench": self.bench,
            "verify": self.verify,
            "warnings": list(self.warnings),
        }


# -------------------------------------------------------------------------------------------- ssh


_HOST_KEY_CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed")
_HOST_KEY_UNKNOWN = re.compile(r"No \S+ host key is known for|Host key verification failed")
_AUTH_REFUSED = re.compile(r"Permission denied \(|Too many authentication failures|no mutual signature")
_UNREACHABLE = re.compile(
    r"Connection refused|No route to host|Network is unreachable|timed out|Could not resolve hostname"
    r"|Name or service not known|Temporary failure in name resolution|Connection closed by|Connection reset"
    r"|kex_exchange_identification|banner exchange",
    re.IGNORECASE,
)


def _ssh_option_path(path: Path) -> str:
    """A path as an ssh -o value: `%` escaped (ssh expands %-tokens), quoted when it has spaces."""
    text = str(path).replace("%", "%%")
    if '"' in text:
        raise OptionError(f"ssh cannot take a path with a double quote in an option: {path}", hint="rename the file or pass a path without '\"'")
    return f'"{text}"' if any(ch.isspace() for ch in text) else text


class _Ssh:
    """One device, reached through the system `ssh`; every remote word is quoted here.

    Inside `connection()`, one master connection (ControlMaster) carries every command, so a
    profile costs one handshake; a command whose master is gone falls back to its own connection.
    """

    def __init__(self, host: str, options: ProfileOptions, control_dir: Path, cancel: _Cancel) -> None:
        self.host = host
        self.options = options
        self.cancel = cancel
        self.control_path = control_dir / "master"
        self.master_log = control_dir / "master.log"
        timeout = options.device_timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def _options(self) -> list[str]:
        opts = self.options
        argv = []
        if opts.ssh_config is not None:
            argv += ["-F", str(opts.ssh_config)]
        argv += [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, math.ceil(opts.connect_timeout))}",
            "-o", f"StrictHostKeyChecking={'accept-new' if opts.accept_new_host_key else 'yes'}",
            "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4",
            "-o", f"ControlPath={_ssh_option_path(self.control_path)}",
        ]  # fmt: skip
        if opts.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={_ssh_option_path(opts.known_hosts)}"]
        if opts.port is not None:
            argv += ["-p", str(opts.port)]
        if opts.identity is not None:
            argv += ["-o", f"IdentityFile={_ssh_option_path(opts.identity)}"]
        if opts.jump is not None:
            argv += ["-J", opts.jump]
        return argv

    def argv(self, remote_words: Sequence[str]) -> list[str]:
        # `--` ends ssh's options, so a host can never be read as one; the command is one string
        # for the remote shell, each word quoted.
        return ["ssh", *self._options(), "-o", "ControlMaster=no", "--", self.host, shlex.join(remote_words)]

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Open the master connection (this is where host keys and keys are checked), close it after."""
        argv = ["ssh", *self._options(), "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N", "-f", "--", self.host]
        # The master goes to the background holding its stderr: a file, not a pipe we would wait on.
        with self.master_log.open("wb") as log:
            completed = self._subprocess(argv, "connecting", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        if completed.returncode != 0:
            raise self._ssh_failure(self.master_log.read_text(errors="replace"), "connecting")
        close = ["ssh", *self._options(), "-O", "exit", "--", self.host]
        self.cancel.masters.append(close)
        try:
            yield
        finally:
            self.cancel.masters.remove(close)
            _close_master(close)

    def _subprocess(self, argv: list[str], step: str, *, cleanup: bool = False, **streams: Any) -> subprocess.CompletedProcess[bytes]:
        if self.cancel.interrupted.is_set() and not cleanup:
            raise RemoteError(f"{self.host}: interrupted before {step}", hint="run the profile again")
        timeout, device_bound = self.options.command_timeout, False
        if self.deadline is not None and not cleanup:  # cleanup after a timeout still gets its own time
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._device_timeout(step)
            timeout, device_bound = min(timeout, remaining), remaining < timeout
        try:
            return self.cancel.run(argv, timeout, **streams)
        except FileNotFoundError as exc:
            raise RemoteError(
                "the OpenSSH client `ssh` is not installed on this machine",
                hint="install it (apt-get install openssh-client, or your system's OpenSSH package)",
            ) from exc
        except subprocess.TimeoutExpired as exc:
            if device_bound:
                raise self._device_timeout(step) from exc
            raise RemoteTimeoutError(
                f"{self.host}: {step} did not finish within {self.options.command_timeout:g} s",
                hint="raise the command timeout, or lower --runs for a slow device",
            ) from exc

    def _device_timeout(self, step: str) -> RemoteTimeoutError:
        return RemoteTimeoutError(
            f"{self.host}: the device did not finish within its {self.options.device_timeout:g} s (device timeout), while {step}",
            hint="raise --device-timeout, or lower --runs for a slow device or link",
        )

    def run(
        self, remote_words: Sequence[str], *, step: str, stdin_path: Path | None = None, hold_stdin: bool = False, cleanup: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one command on the device; ssh's own failures (exit 255) become RemoteError subclasses.

        `stdin_path` streams a file to the command. `hold_stdin` keeps the command's stdin open
        until ssh has exited, so RUN_SCRIPT sees end of file when the host stops waiting. A `cleanup`
        command still runs after an interrupt.
        """
        argv = self.argv(remote_words)
        with contextlib.ExitStack() as stack:
            stdin: Any = subprocess.DEVNULL
            if stdin_path is not None:
                stdin = stack.enter_context(stdin_path.open("rb"))
            elif hold_stdin:
                stdin, write_end = os.pipe()
                stack.callback(os.close, write_end)
                stack.callback(os.close, stdin)
            completed = self._subprocess(argv, step, cleanup=cleanup, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if completed.returncode == 255:
            raise self._ssh_failure(completed.stderr.decode(errors="replace"), step)
        return completed

    def _ssh_failure(self, stderr: str, step: str) -> RemoteError:
        shown = _tail(stderr)
        where = self.host if self.options.port is None else f"{self.host} (port {self.options.port})"
        if _HOST_KEY_CHANGED.search(stderr):
            return HostKeyChangedError(
                f"{where}: the device's host key has CHANGED since it was recorded in known_hosts; "
                f"refusing to connect (possible man-in-the-middle)\n{shown}",
                hint="if the device was reinstalled, remove its old key with `ssh-keygen -R HOST` "
                "(ssh names the file and line above) and connect once with `ssh` to check the new one",
            )
        if _HOST_KEY_UNKNOWN.search(stderr):
            return UnknownHostKeyError(
                f"{where}: the device's host key is not in known_hosts and strict host key checking is on\n{shown}",
                hint="connect once with `ssh` to check and record its key, or pass --accept-new-host-key "
                "to trust a device seen for the first time",
            )
        if _AUTH_REFUSED.search(stderr):
            return AuthenticationError(
                f"{where}: authentication refused\n{shown}",
                hint="pass --identity KEY, add the key to ssh-agent, or install your public key on the "
                "device with `ssh-copy-id`; edgeopt never asks for a password (BatchMode)",
            )
        if _UNREACHABLE.search(stderr):
            return HostUnreachableError(
                f"{where}: cannot reach the device\n{shown}",
                hint="check the host name, --port and that the device is on and runs sshd; "
                f"the connect timeout is {self.options.connect_timeout:g} s",
            )
        return RemoteError(f"{where}: ssh failed while {step} (exit 255)\n{shown}")

    def python_json(self, words: Sequence[str], *, step: str, hold_stdin: bool = False) -> Any:
        """Run a short Python program on the device and parse the JSON it prints."""
        completed = self.run(words, step=step, hold_stdin=hold_stdin)
        stdout = completed.stdout.decode(errors="replace")
        stderr = completed.stderr.decode(errors="replace")
        if completed.returncode != 0:
            raise self.command_failure(words, completed.returncode, stdout, stderr, step)
        return self.parse_json(stdout, stderr, completed.returncode, step)

    def parse_json(self, stdout: str, stderr: str, code: int, step: str) -> Any:
        """The JSON document a command printed: all of stdout, or its last line when a login
        script on the device printed something before it."""
        lines = stdout.strip().splitlines()
        for candidate in (stdout, lines[-1] if lines else ""):
            try:
                return json.loads(candidate)
            except json.JSONDecodeError:
                continue
        raise RemoteCommandError(
            f"{self.host}: {step} printed no JSON (exit {code})\n  stdout: {stdout[:500]!r}\n{_tail(stderr)}"
        )

    def command_failure(self, shown: Sequence[str], code: int, stdout: str, stderr: str, step: str) -> RemoteError:
        """The error for a device command that exited non-zero; `shown` is the command as a user reads it."""
        if code in (126, 127):
            return RemotePythonError(
                f"{self.host}: cannot run the Python interpreter {self.options.python!r} on the device "
                f"(exit {code})\n{_tail(stderr)}",
                hint="install Python 3 on the device, or pass --python with the interpreter's path",
            )
        runtime_error = _runtime_error(stdout)
        if runtime_error is not None and runtime_error.get("type") == "BackendUnavailableError":
            return RemoteBackendMissingError(f"{self.host}: {runtime_error.get('message')}", hint=runtime_error.get("hint"))
        return RemoteCommandError(
            f"{self.host}: {step} failed with exit code {code}\n  command: {_display(shown)}\n{_tail(stderr)}"
        )


def _display(words: Sequence[str]) -> str:
    """A command for a message: the long inline programs (`-c SCRIPT`) shortened to `-c ...`."""
    shown = [("..." if index and words[index - 1] == "-c" else word) for index, word in enumerate(words)]
    return shlex.join(shown).replace("'...'", "...")


def _tail(text: str) -> str:
    lines = [line for line in text.replace("\r", "").splitlines() if line.strip()]
    if not lines:
        return "  (nothing on stderr)"
    if len(lines) > _STDERR_TAIL_LINES:
        lines = ["...", *lines[-_STDERR_TAIL_LINES:]]
    return "\n".join(f"  | {line}" for line in lines)


def _runtime_error(stdout: str) -> JsonObject | None:
    """The runtime's `{"error": {type, message, hint, exit_code}}` document (it prints one with --json)."""
    lines = stdout.strip().splitlines()
    try:
        document = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, dict) else None


# ----------------------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class _Upload:
    runtime: Payload
    bundle: Payload
    bundle_name: str


def profile(
    bundle: Path,
    hosts: Sequence[str],
    options: ProfileOptions,
    progress: Callable[[str], None] | None = None,
) -> list[ProfileResult]:
    """Profile `bundle` on every host (concurrently, at most `options.max_parallel` at once).

    Returns one result per host, in the order given, and appends each to the bundle's manifest
    `profiles` (a bundle folder; a .tar.gz is left untouched). When a single host fails its
    RemoteError is raised; when some of several fail, ProfileFailedError carries both the results
    and the failures. `progress` receives one-line messages, from worker threads.
    """
    from edgeopt.bundle import append_history

    say = progress or (lambda message: None)
    unique_hosts = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not unique_hosts:
        raise RemoteError("no host to profile on", hint="pass --host USER@DEVICE (repeat it for several devices)")
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="edgeopt-profile-") as work_name:
        work = Path(work_name)
        bundle_dir = _local_bundle_dir(bundle, work)
        runtime_path = build_runtime_zipapp(work / ZIPAPP_NAME)
        upload = _Upload(
            runtime=Payload(path=runtime_path, name=ZIPAPP_NAME, sha256=sha256_file(runtime_path), extract=False),
            bundle=device_copy(bundle_dir, work),
            bundle_name=bundle_dir.name,
        )
        results: dict[str, ProfileResult] = {}
        failures: dict[str, RemoteError] = {}
        cancel = _Cancel()
        started = time.monotonic()

        def finished() -> str:  # the tail of each device's last progress line
            return f"[{len(results) + len(failures)}/{len(unique_hosts)} devices, {time.monotonic() - started:.1f} s]"

        with ThreadPoolExecutor(max_workers=min(options.max_parallel, len(unique_hosts))) as pool, cancel.on_interrupt():
            futures: dict[Future[ProfileResult], str] = {
                pool.submit(_profile_host, host, upload, options, say, cancel): host for host in unique_hosts
            }
            for future in as_completed(futures):
                host = futures[future]
                try:
                    result = future.result()
                except RemoteError as error:
                    failures[host] = error
                    say(f"{host}: failed ({type(error).__name__}) {finished()}")
                    continue
                results[host] = result
                figures = bench_figures(result.bench)
                say(f"{host}: done, p50 {figures['p50']} ms, parity {parity_summary(result.verify)} {finished()}")
                if bundle.is_dir():
                    count = append_history(bundle, "profiles", result.to_dict())
                    say(f"{host}: recorded in {bundle / 'manifest.json'} (profiles: {count})")
        if not bundle.is_dir() and results:
            say(f"{bundle} is an archive: the results were not added to its manifest (profile the folder to record them)")
    ordered = [results[host] for host in unique_hosts if host in results]
    if failures:
        if len(unique_hosts) == 1:
            raise failures[unique_hosts[0]]
        raise ProfileFailedError(ordered, {host: failures[host] for host in unique_hosts if host in failures})
    return ordered


def _local_bundle_dir(bundle: Path, work: Path) -> Path:
    if bundle.is_dir():
        bundle_dir = bundle
    elif bundle.is_file() and bundle.name.endswith((".tar.gz", ".tgz")):
        bundle_dir = unpack_local_archive(bundle, work / "unpacked")
    else:
        raise BundleError(
            f"no bundle at {bundle}", hint="pass a bundle folder written by `edgeopt build`, or its .tar.gz"
        )
    if not (bundle_dir / "manifest.json").is_file():
        raise BundleError(f"{bundle} has no manifest.json", hint="pass a bundle folder written by `edgeopt build`")
    return bundle_dir


def _close_master(close: list[str]) -> None:
    subprocess.run(close, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)


class _Cancel:
    """The ssh commands and master connections the workers hold, and whether the main thread was interrupted.

    Ctrl-C or SIGTERM arrives in the main thread while the workers wait on ssh. `on_interrupt`
    then kills every running ssh and closes every master connection (a command multiplexed over a
    master lives in the master, which also holds our end of its pipes: killing the client alone
    would leave the worker waiting for the remote step to end). The device sees its stdin close
    and stops the running step; the workers run nothing more but their cleanup (removing this
    run's folder on the device, over a connection of its own), so the interrupt ends the profile
    promptly and leaves nothing behind on either side.
    """

    def __init__(self) -> None:
        self.interrupted = threading.Event()
        self.masters: list[list[str]] = []
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()

    def run(self, argv: list[str], timeout: float, **streams: Any) -> subprocess.CompletedProcess[bytes]:
        """subprocess.run, with the child known to `on_interrupt` while it runs."""
        with subprocess.Popen(argv, **streams) as child:
            with self._lock:
                self._running.add(child)
            try:
                stdout, stderr = child.communicate(timeout=timeout)
            except BaseException:
                child.kill()
                child.wait()
                raise
            finally:
                with self._lock:
                    self._running.discard(child)
        return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)

    @contextlib.contextmanager
    def on_interrupt(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.interrupted.set()
            with self._lock:
                for child in self._running:
                    child.kill()
            for close in list(self.masters):
                _close_master(close)
            raise


def _profile_host(host: str, upload: _Upload, options: ProfileOptions, say: Callable[[str], None], cancel: _Cancel) -> ProfileResult:
    # A short folder for the control socket: a unix socket path must stay under ~100 bytes.
    control_dir = Path(tempfile.mkdtemp(prefix="eo-ssh-"))
    try:
        ssh = _Ssh(host, options, control_dir, cancel)
        say(f"{host}: connecting")
        with ssh.connection():
            return _profile_connected(ssh, upload, say)
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)


def _profile_connected(ssh: _Ssh, upload: _Upload, say: Callable[[str], None]) -> ProfileResult:
    host, options, python = ssh.host, ssh.options, ssh.options.python
    payloads = (upload.runtime, upload.bundle)
    probe_words = [python, "-c", PROBE_SCRIPT, options.remote_cache]
    for payload in payloads:
        probe_words += [payload.sha256, payload.name]
    probe = ssh.python_json(probe_words, step="checking Python and the cache on the device")
    if tuple(probe["python"]) < MIN_DEVICE_PYTHON:
        raise RemotePythonError(
            f"{host}: {python} on the device is Python {probe['version']}; the runtime needs "
            f"{'.'.join(map(str, MIN_DEVICE_PYTHON))} or newer",
            hint="pass --python with a newer interpreter on the device",
        )
    cache: str = probe["cache"]
    # With keep, uploads go into the shared cache (kept, found by checksum next time); without,
    # into a folder of this run's own that is removed at the end. Entries already cached are used
    # in place either way, and never removed.
    run_dir = cache if options.keep else posixpath.join(cache, f".run-{uuid.uuid4().hex[:12]}")
    remote: dict[str, str] = {}
    pushed = False
    cleaned = False
    try:
        for payload in payloads:
            if probe["cached"].get(payload.sha256):
                say(f"{host}: {payload.name} already in the device cache")
                remote[payload.sha256] = posixpath.join(cache, payload.sha256)
                continue
            say(f"{host}: uploading {payload.name} ({payload.size / 1e6:.2f} MB)")
            pushed = True
            receive = [python, "-c", RECEIVE_SCRIPT, run_dir, payload.sha256, payload.name, "1" if payload.extract else "0"]
            step = f"uploading {payload.name}"
            completed = ssh.run(receive, step=step, stdin_path=payload.path)
            if completed.returncode != 0:
                stdout, stderr = completed.stdout.decode(errors="replace"), completed.stderr.decode(errors="replace")
                raise ssh.command_failure(receive, completed.returncode, stdout, stderr, step)
            remote[payload.sha256] = posixpath.join(run_dir, payload.sha256)

        zipapp = posixpath.join(remote[upload.runtime.sha256], ZIPAPP_NAME)
        remote_bundle = posixpath.join(remote[upload.bundle.sha256], upload.bundle_name)
        bench_args = ["bench", remote_bundle, "--warmup", str(options.warmup), "--runs", str(options.runs)]
        if options.threads is not None:
            bench_args += ["--threads", str(options.threads)]
        if options.layers:
            bench_args += ["--layers", "--layer-runs", str(options.layer_runs)]
        steps = [
            ("info", ["info", remote_bundle, "--json"], [0]),
            ("verify", ["verify", remote_bundle, "--json"], [0, 3]),
            ("bench", [*bench_args, "--json"], [0]),
        ]
        spec = {
            "zipapp": zipapp,
            "steps": [{"name": name, "args": args, "ok": ok} for name, args, ok in steps],
            "remove": [run_dir] if pushed and not options.keep else [],
        }
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        layers = f", then {options.layer_runs} profiled runs for layer times" if options.layers else ""
        say(f"{host}: verify, then bench ({options.warmup} warmup, {options.runs} runs{layers})")
        report = ssh.python_json([python, "-c", RUN_SCRIPT, json.dumps(spec)], step="verify and bench on the device", hold_stdin=True)
        cleaned = True
        documents: dict[str, JsonObject] = {}
        for name, args, ok in steps:
            outcome = report["steps"][name]
            if outcome["code"] not in ok:
                raise ssh.command_failure([python, zipapp, *args], outcome["code"], outcome["stdout"], outcome["stderr"], f"runtime {name}")
            documents[name] = ssh.parse_json(outcome["stdout"], outcome["stderr"], outcome["code"], f"runtime {name}")
    finally:
        if pushed and not options.keep and not cleaned:
            _remove_run_dir(ssh, run_dir)
    bench = documents["bench"]
    device, warnings = device_facts(documents["info"], bench.get("thermal_after") or {})
    for warning in warnings:
        say(f"{host}: warning: {warning}")
    return ProfileResult(host=host, time=started, device=device, bench=bench, verify=documents["verify"], warnings=tuple(warnings))


def _remove_run_dir(ssh: _Ssh, run_dir: str) -> None:
    """Best effort after a failed run: the run's own error is the one worth reporting."""
    with contextlib.suppress(RemoteError):
        ssh.run([ssh.options.python, "-c", CLEANUP_SCRIPT, run_dir], step="cleaning up", cleanup=True)


# ------------------------------------------------------------------------------------------ table


def format_profile_table(results: Sequence[ProfileResult], failures: Mapping[str, RemoteError] | None = None) -> str:
    """One row per host: the device (CPU, OS), latency percentiles, throughput, load, memory, parity,
    temperature, warnings; a failed host's row says what failed. Below, each host's layer summary."""
    header = [
        "host", "device", "backend", "threads", "p50 ms", "p90 ms", "p99 ms", "per s", "load ms", "first ms", "peak RSS MiB",
        "parity", "temp °C", "warnings",
    ]  # fmt: skip
    rows = [header]
    for result in results:
        figures = bench_figures(result.bench)
        rows.append(
            [
                result.host,
                device_summary(result.device),
                figures["backend"],
                figures["threads"],
                figures["p50"],
                figures["p90"],
                figures["p99"],
                figures["throughput"],
                figures["load"],
                figures["first"],
                figures["rss"],
                parity_summary(result.verify),
                temperature_summary(result.device),
                "; ".join(result.warnings) or "-",
            ]
        )
    for host, error in (failures or {}).items():
        rows.append([host, f"FAILED: {type(error).__name__}", *["-"] * (len(header) - 3), _first_line(error)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for result in results:
        layers = result.bench.get("layers")
        if isinstance(layers, dict) and layers.get("summary"):
            lines.append(f"{result.host} layers: {layers['summary']}")
    return "\n".join(lines)


def _first_line(error: RemoteError) -> str:
    return error.message.splitlines()[0] if error.message else type(error).__name__


def read_hosts_file(path: Path) -> list[str]:
    """SSH destinations from a file, one a line: `user@host`, an ~/.ssh/config alias, or `ssh://user@host:port`;
    `#` starts a comment, blank lines are skipped, a host named twice is profiled once."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise OptionError(f"cannot read the hosts file {path}: {exc.strerror or exc}", hint="one SSH destination a line") from None
    hosts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry.split()) != 1 or entry.startswith("-"):
            raise OptionError(
                f"{path}:{number}: {entry!r} is not one SSH destination",
                hint="one destination a line (user@host, an ssh_config alias or ssh://user@host:port); # starts a comment",
            )
        hosts.append(entry)
    if not hosts:
        raise OptionError(f"{path} names no host", hint="one SSH destination a line; # starts a comment")
    return list(dict.fromkeys(hosts))
