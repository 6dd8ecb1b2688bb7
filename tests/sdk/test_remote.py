"""`edgeopt profile` over a real OpenSSH server on 127.0.0.1 (the `sshd` fixture in conftest.py).

The "device" is this machine reached through sshd, so the tests can look at the device's cache
folder directly. Its Python is this interpreter (it has numpy and ONNX Runtime); the
backend-missing case uses a virtual environment that holds numpy and nothing else.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeopt
import edgeopt.runtime
from edgeopt.remote import (
    AuthenticationError,
    HostKeyChangedError,
    HostUnreachableError,
    ProfileFailedError,
    RemoteBackendMissingError,
    RemoteCommandError,
    RemotePythonError,
    RemoteTimeoutError,
    UnknownHostKeyError,
    format_profile_table,
    profile,
)
from edgeopt.bundle import artifact_entry, pack, write_manifest
from edgeopt.remote_facts import device_facts
from edgeopt.errors import BundleError
from edgeopt.remote_payload import Payload, device_copy, sha256_file
from edgeopt.runtime.device import decode_throttled
from tests.sdk.conftest import SshServer, free_port, generate_key, known_hosts_line

BENCHMARK_SCHEMA = json.loads((Path(edgeopt.runtime.__file__).parent / "benchmark.schema.json").read_text())
MANIFEST_SCHEMA = json.loads((Path(edgeopt.__file__).parent / "schemas" / "manifest.schema.json").read_text())


def _tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weight"], ["matmul"]),
            helper.make_node("Add", ["matmul", "bias"], ["sum"]),
            helper.make_node("Relu", ["sum"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def built_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `edgeopt build` bundle for onnxruntime-cpu (model, reference data, report)."""
    folder = tmp_path_factory.mktemp("built")
    onnx.save(_tiny_model(), folder / "tiny.onnx")
    return edgeopt.build(folder / "tiny.onnx", "onnxruntime-cpu", output=folder / "tiny-onnxruntime-cpu").bundle


def copy_bundle(built: Path, folder: Path) -> Path:
    shutil.copytree(built, folder)
    return folder


@pytest.fixture
def bundle(built_bundle: Path, tmp_path: Path) -> Path:
    return copy_bundle(built_bundle, tmp_path / built_bundle.name)


@pytest.fixture
def device_cache(tmp_path: Path) -> Path:
    """The cache folder on the "device" (an absolute path, so the tests can look into it)."""
    return tmp_path / "device cache"


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _manifest(bundle: Path) -> dict[str, object]:
    return json.loads((bundle / "manifest.json").read_text())


# ----------------------------------------------------------------------------- the happy path


def test_profile_runs_verify_and_bench_on_the_device_and_records_them(sshd: SshServer, bundle: Path, device_cache: Path) -> None:
    messages: list[str] = []
    options = sshd.profile_options(remote_cache=str(device_cache))

    (result,) = profile(bundle, [sshd.host], options, progress=messages.append)

    assert result.host == sshd.host
    assert result.verify["passed"] is True
    jsonschema.validate(result.bench, BENCHMARK_SCHEMA)
    assert result.bench["runs"] == 5
    assert result.device["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert result.device["libraries"]["onnxruntime"] == ort.__version__
    assert set(result.device["thermal_before"]) == set(result.device["thermal_after"]) >= {"temperatures_c", "throttled"}
    assert result.device["throttled_during_run"] is False

    manifest = _manifest(bundle)
    jsonschema.validate(manifest, MANIFEST_SCHEMA)
    profiles = manifest["profiles"]
    assert profiles == [json.loads(json.dumps(result.to_dict()))]
    assert profiles[0]["host"] == sshd.host and profiles[0]["time"].endswith("+00:00")
    assert f"{sshd.host}: recorded in {bundle / 'manifest.json'} (profiles: 1)" in messages

    table = format_profile_table([result])
    assert sshd.host in table and "pass" in table
    assert any("uploading edgeopt-runtime.pyz" in m for m in messages)
    assert _cache_entries(device_cache) == [], "without keep, what was pushed is removed"


def test_keep_leaves_the_cache_and_the_next_run_uploads_nothing(sshd: SshServer, bundle: Path, device_cache: Path) -> None:
    options = sshd.profile_options(remote_cache=str(device_cache), keep=True)
    profile(bundle, [sshd.host], options)
    cached = _cache_entries(device_cache)
    assert len(cached) == 2, "the runtime zipapp and the bundle, each under its sha256"

    messages: list[str] = []
    profile(bundle, [sshd.host], options, progress=messages.append)

    assert not any("uploading" in m for m in messages), messages
    assert sum("already in the device cache" in m for m in messages) == 2
    assert _cache_entries(device_cache) == cached, "the profile history appended to the manifest keeps the key"
    assert len(_manifest(bundle)["profiles"]) == 2

    profile(bundle, [sshd.host], sshd.profile_options(remote_cache=str(device_cache)))
    assert _cache_entries(device_cache) == cached, "entries cached before a run are not removed by it"


def test_every_remote_word_is_quoted(sshd: SshServer, built_bundle: Path, tmp_path: Path) -> None:
    marker = f"edgeopt-pwned-{uuid.uuid4().hex[:8]}"
    hostile = f"a b 'q' \"d\" $(touch {marker}) `touch {marker}`; touch {marker} & \\"
    bundle = copy_bundle(built_bundle, tmp_path / f"bundle {hostile}")
    cache = tmp_path / f"cache {hostile}" / "x"

    (result,) = profile(bundle, [sshd.host], sshd.profile_options(remote_cache=str(cache), keep=True))

    assert result.verify["passed"] is True
    assert cache.is_dir() and len(_cache_entries(cache)) == 2
    for folder in (Path.home(), Path.cwd(), tmp_path):
        assert not (folder / marker).exists(), f"a remote shell ran the injected command in {folder}"


def test_a_parity_failure_on_the_device_is_recorded_not_raised(sshd: SshServer, bundle: Path, device_cache: Path) -> None:
    outputs_path = bundle / "reference" / "outputs.npz"
    with np.load(outputs_path) as stored:
        shifted = {name: stored[name] + 1.0 for name in stored.files}
    np.savez(outputs_path, **shifted)
    manifest = _manifest(bundle)
    manifest["artifacts"] = [
        artifact_entry(bundle, a["path"], a["format"], a["role"]) if a["path"] == "reference/outputs.npz" else a
        for a in manifest["artifacts"]
    ]
    write_manifest(bundle, manifest)

    (result,) = profile(bundle, [sshd.host], sshd.profile_options(remote_cache=str(device_cache)))

    assert result.verify["passed"] is False
    assert result.bench["runs"] == 5, "the benchmark still ran"
    assert "FAIL (output" in format_profile_table([result])
    assert _manifest(bundle)["profiles"][0]["verify"]["passed"] is False


def test_a_packed_bundle_is_profiled_and_left_as_it_is(sshd: SshServer, bundle: Path, device_cache: Path) -> None:
    archive = pack(bundle)
    packed = archive.read_bytes()
    messages: list[str] = []

    (result,) = profile(archive, [sshd.host], sshd.profile_options(remote_cache=str(device_cache)), progress=messages.append)

    assert result.verify["passed"] is True
    assert archive.read_bytes() == packed
    assert any("not added to its manifest" in m for m in messages)


def test_several_hosts_run_concurrently_into_one_table(sshd: SshServer, bundle: Path, device_cache: Path, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts.read_text() + known_hosts_line(sshd.port, sshd.host_public_key).replace("127.0.0.1", "localhost"))
    hosts = [sshd.host, f"{sshd.user}@localhost", f"{sshd.user}@127.0.0.2"]
    options = sshd.profile_options(remote_cache=str(device_cache), known_hosts=known_hosts, max_parallel=3)

    with pytest.raises(ProfileFailedError) as failed:
        profile(bundle, hosts, options)

    assert [r.host for r in failed.value.results] == hosts[:2]
    assert list(failed.value.failures) == [hosts[2]]
    assert isinstance(failed.value.failures[hosts[2]], HostUnreachableError)
    assert failed.value.exit_code == 2
    table = format_profile_table(failed.value.results)
    assert len(table.splitlines()) == 4 and hosts[0] in table and hosts[1] in table
    assert sorted(p["host"] for p in _manifest(bundle)["profiles"]) == sorted(hosts[:2])


def test_a_jump_host_carries_the_connection(sshd: SshServer, bundle: Path, device_cache: Path, tmp_path: Path) -> None:
    """ssh refuses to jump from a host to itself, so the target is the same sshd named localhost."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts.read_text() + known_hosts_line(sshd.port, sshd.host_public_key).replace("127.0.0.1", "localhost"))
    config = tmp_path / "ssh_config"  # the ssh that reaches the jump host reads -F, not our -o options
    config.write_text(sshd.ssh_config.read_text() + f"  IdentityFile {sshd.client_key}\n")
    options = sshd.profile_options(
        jump=f"{sshd.user}@127.0.0.1:{sshd.port}", ssh_config=config, known_hosts=known_hosts, remote_cache=str(device_cache)
    )

    (result,) = profile(bundle, [f"{sshd.user}@localhost"], options)

    assert result.verify["passed"] is True
    assert f"target localhost port {sshd.port}" in sshd.log.read_text(), "the jump host opened the way to the target"


# ------------------------------------------------------------------------ failures, each clear


def test_unreachable_port_is_a_clear_error(sshd: SshServer, bundle: Path) -> None:
    with pytest.raises(HostUnreachableError, match="Connection refused") as error:
        profile(bundle, [sshd.host], sshd.profile_options(port=free_port()))
    assert error.value.exit_code == 2 and "port" in error.value.hint


def test_a_key_the_device_does_not_accept_is_refused(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "stranger")
    with pytest.raises(AuthenticationError, match=r"Permission denied \(publickey\)") as error:
        profile(bundle, [sshd.host], sshd.profile_options(identity=stranger))
    assert "--identity" in error.value.hint


def test_a_changed_host_key_is_refused(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    impostor = generate_key(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line(sshd.port, impostor.with_suffix(".pub")))
    for accept_new in (False, True):
        with pytest.raises(HostKeyChangedError, match="CHANGED") as error:
            profile(bundle, [sshd.host], sshd.profile_options(known_hosts=known_hosts, accept_new_host_key=accept_new))
        assert "ssh-keygen -R" in error.value.hint


def test_an_unknown_host_key_is_refused_unless_accept_new(sshd: SshServer, bundle: Path, tmp_path: Path, device_cache: Path) -> None:
    known_hosts = tmp_path / "known hosts %h"
    known_hosts.write_text("")
    with pytest.raises(UnknownHostKeyError, match="not in known_hosts") as error:
        profile(bundle, [sshd.host], sshd.profile_options(known_hosts=known_hosts))
    assert "--accept-new-host-key" in error.value.hint

    options = sshd.profile_options(known_hosts=known_hosts, accept_new_host_key=True, remote_cache=str(device_cache))
    (result,) = profile(bundle, [sshd.host], options)
    assert result.verify["passed"] is True
    assert known_hosts.read_text().strip(), "accept-new recorded the device's key"


def test_a_missing_python_on_the_device_is_named(sshd: SshServer, bundle: Path) -> None:
    with pytest.raises(RemotePythonError, match="/nonexistent/python") as error:
        profile(bundle, [sshd.host], sshd.profile_options(python="/nonexistent/python"))
    assert "--python" in error.value.hint


@pytest.fixture(scope="module")
def numpy_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with numpy and no backend library: a venv without site packages, plus this numpy."""
    venv = tmp_path_factory.mktemp("numpy-only")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    numpy_home = Path(np.__file__).parent
    for name in (numpy_home.name, f"{numpy_home.name}.libs"):
        if (numpy_home.parent / name).exists():
            (site / name).symlink_to(numpy_home.parent / name)
    probe = subprocess.run([str(python), "-c", "import numpy, importlib.util as u; assert u.find_spec('onnxruntime') is None"])
    assert probe.returncode == 0, "the venv must see numpy and not onnxruntime"
    return python


def test_a_missing_backend_on_the_device_says_how_to_install_it(
    sshd: SshServer, bundle: Path, device_cache: Path, numpy_only_python: Path
) -> None:
    options = sshd.profile_options(python=str(numpy_only_python), remote_cache=str(device_cache))
    with pytest.raises(RemoteBackendMissingError, match="onnxruntime") as error:
        profile(bundle, [sshd.host], options)
    assert error.value.hint == _manifest(bundle)["runtime"]["install"], "the hint is the bundle's install command"
    assert _cache_entries(device_cache) == [], "a failed run removes what it pushed too"


def test_a_failing_remote_command_shows_its_stderr(sshd: SshServer, bundle: Path, device_cache: Path) -> None:
    options = sshd.profile_options(remote_cache=str(device_cache), keep=True)
    profile(bundle, [sshd.host], options)
    (model_on_device,) = device_cache.glob(f"*/{bundle.name}/model.onnx")
    model_on_device.write_bytes(model_on_device.read_bytes()[:-8])

    with pytest.raises(RemoteCommandError, match=r"exit code 2[\s\S]*\| error: .*model\.onnx") as error:
        profile(bundle, [sshd.host], options)
    assert error.value.exit_code == 2


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_step_that_outlives_the_command_timeout_is_stopped_on_the_device_too(
    sshd: SshServer, bundle: Path, device_cache: Path
) -> None:
    options = sshd.profile_options(runs=10_000_000, command_timeout=4, remote_cache=str(device_cache))
    with pytest.raises(RemoteTimeoutError, match="did not finish within 4 s"):
        profile(bundle, [sshd.host], options)

    deadline = time.monotonic() + 10
    while (_processes_mentioning(str(device_cache)) or _cache_entries(device_cache)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(device_cache)) == [], "the benchmark was killed when the host gave up"
    assert _cache_entries(device_cache) == [], "and what this run pushed was removed"


def test_throttling_is_read_from_pi_flags_clocks_and_temperatures() -> None:
    idle = {"cpu_governor": {"cpu0": "performance"}, "cpu_frequency_mhz": {"cpu0": 1800.0},
            "temperatures_c": {"cpu-thermal": 52.0}, "throttled": decode_throttled(0), "power_mode": None}
    hot = {**idle, "cpu_frequency_mhz": {"cpu0": 1500.0}, "temperatures_c": {"cpu-thermal": 82.5},
           "throttled": decode_throttled(0x20002)}

    device, warnings = device_facts({"device": {"python": {"version": "3.11.2"}, **idle}}, hot)

    assert device["throttled_during_run"] is True
    assert device["python"] == {"version": "3.11.2"}
    assert device["thermal_before"]["temperatures_c"] == {"cpu-thermal": 52.0}
    assert device["thermal_after"]["throttled"]["raw"] == "0x20002"
    assert any("frequency_capped_now" in w and "frequency_capping_occurred" in w for w in warnings)
    assert any("1800 to 1500 MHz" in w for w in warnings)
    assert any("82 °C" in w for w in warnings) and any("rose 30 °C" in w for w in warnings)

    calm, quiet = device_facts({"device": idle}, idle)
    assert calm["throttled_during_run"] is False and quiet == []


def test_the_device_copy_is_reproducible_and_leaves_host_only_files_out(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = device_copy(bundle, tmp_path / "first")
    manifest = _manifest(bundle)
    manifest["profiles"] = [{"host": "pi@pi", "time": "2026-01-01T00:00:00+00:00"}]
    write_manifest(bundle, manifest)
    (bundle / "report.html").write_text("<html>redrawn with the new profile</html>")
    second = device_copy(bundle, tmp_path / "second")

    assert first.sha256 == second.sha256, "history and report changes do not change the device copy"
    with tarfile.open(second.path) as archive:
        names = archive.getnames()
        device_manifest = json.load(archive.extractfile(f"{bundle.name}/manifest.json"))
    assert f"{bundle.name}/model.onnx" in names and f"{bundle.name}/reference/outputs.npz" in names
    assert f"{bundle.name}/report.html" not in names
    assert "profiles" not in device_manifest
    assert "report.html" not in [a["path"] for a in device_manifest["artifacts"]]


# --------------------------------------------------------------------- hostile archives


def _symlink_chain_archive(path: Path, top: str) -> Path:
    """`top/a -> .`, `top/a/b -> ..`, then a file written through `top/a/b/`: the escape that the
    old fallback (Pythons without tarfile.data_filter) let through."""
    with tarfile.open(path, "w:gz") as tar:
        for name, target in ((f"{top}/a", "."), (f"{top}/a/b", "..")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        data = b"written outside\n"
        escaped = tarfile.TarInfo(f"{top}/a/b/a/b/escaped.txt")
        escaped.size = len(data)
        tar.addfile(escaped, io.BytesIO(data))
    return path


def _python_without_data_filter(folder: Path) -> Path:
    """A device "python" that runs `-c SCRIPT ARGS...` as this interpreter would on 3.11.2 (no data_filter)."""
    wrapper = folder / "python-without-data-filter"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import sys, tarfile\n"
        "if hasattr(tarfile, 'data_filter'):\n"
        "    del tarfile.data_filter\n"
        "script, sys.argv = sys.argv[2], ['-c', *sys.argv[3:]]\n"
        "exec(compile(script, '<string>', 'exec'), {'__name__': '__main__'})\n"
    )
    wrapper.chmod(0o755)
    return wrapper


def test_the_device_refuses_a_hostile_archive_on_a_python_without_data_filter(
    sshd: SshServer, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receive script runs the runtime's safe_extract (embedded) on the device, over real ssh."""
    import edgeopt.remote

    device_cache = tmp_path / "device" / "cache"
    hostile = _symlink_chain_archive(tmp_path / "hostile.tar.gz", bundle.name)
    monkeypatch.setattr(
        edgeopt.remote, "device_copy", lambda bundle_dir, work: Payload(hostile, hostile.name, sha256_file(hostile), True)
    )
    options = sshd.profile_options(remote_cache=str(device_cache), python=str(_python_without_data_filter(tmp_path)))

    with pytest.raises(RemoteCommandError, match=r"error: .*hostile\.tar\.gz: member '.*/a/b' goes through the link") as error:
        profile(bundle, [sshd.host], options)

    assert error.value.exit_code == 2
    assert [p for p in tmp_path.rglob("escaped.txt")] == []
    assert [p.name for p in device_cache.rglob("*") if p.name.startswith(".partial-")] == []


def test_a_hostile_local_archive_is_refused_before_anything_is_sent(sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    hostile = _symlink_chain_archive(tmp_path / "hostile.tar.gz", "tiny")

    with pytest.raises(BundleError, match="goes through the link 'tiny/a'") as error:
        profile(hostile, [sshd.host], sshd.profile_options(remote_cache=str(tmp_path / "device cache")))

    assert error.value.exit_code == 2
    assert [p for p in tmp_path.rglob("escaped.txt")] == []
    assert not (tmp_path / "device cache").exists()
