"""Fleet profiling: `edgeopt profile --hosts-file` over several real sshd on 127.0.0.1.

Two devices answer (the session's `sshd` and a second server with its own host key and port),
one is unreachable (nothing listens on its port), one presents a host key other than the one
known_hosts records for it, and a tarpit that says hello and then never finishes the key exchange
shows the per-device timeout. Devices are ~/.ssh/config aliases, as users name their fleets.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgeopt
from edgeopt.cli import cli
from edgeopt.errors import OptionError
from edgeopt.remote import RemoteTimeoutError, profile, read_hosts_file
from tests.sdk.conftest import SSHD, SshServer, _wait_for_port, _write_sshd_config, free_port, generate_key, known_hosts_line

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def second_sshd(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """Another device: its own sshd, port and host key, the same user and client key."""
    root = tmp_path_factory.mktemp("sshd-b")
    port = free_port()
    host_key = generate_key(root / "ssh_host_ed25519_key")
    authorized = root / "authorized_keys"
    authorized.write_text(sshd.client_key.with_suffix(".pub").read_text())
    config = _write_sshd_config(root, port, sshd.user, host_key, authorized)
    log = root / "sshd.log"
    process = subprocess.Popen([str(SSHD), "-D", "-E", str(log), "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, log)
        yield port, host_key.with_suffix(".pub")
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fleet") / "digits-int8"
    edgeopt.build(DIGITS / "model.onnx", "onnxruntime-cpu", output=folder, precision="int8", calibration=DIGITS / "calib.npz", effort="fast")
    return folder


def _fleet_config(sshd: SshServer, folder: Path, hosts: dict[str, dict[str, str]], known: list[str]) -> tuple[Path, Path]:
    """An ssh_config with one alias per device (before the fixture's `Host *` defaults) and its known_hosts."""
    known_hosts = folder / "known_hosts"
    known_hosts.write_text("".join(known))
    blocks = []
    for alias, settings in hosts.items():
        blocks.append(f"Host {alias}\n" + "".join(f"  {key} {value}\n" for key, value in settings.items()))
    defaults = sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(known_hosts))
    config = folder / "ssh_config"
    config.write_text("".join(blocks) + defaults)
    return config, known_hosts


def test_a_fleet_from_a_hosts_file_gives_one_table_one_json_and_each_devices_history(
    sshd: SshServer, second_sshd: tuple[int, Path], int8_bundle: Path, tmp_path: Path
) -> None:
    port_b, host_key_b = second_sshd
    impostor = generate_key(tmp_path / "impostor").with_suffix(".pub")
    common = {"HostName": "127.0.0.1", "User": sshd.user, "IdentityFile": str(sshd.client_key)}
    config, _ = _fleet_config(
        sshd,
        tmp_path,
        {
            "dev-a": {**common, "Port": str(sshd.port)},
            "dev-b": {**common, "Port": str(port_b)},
            "dev-down": {**common, "Port": str(free_port())},
            "dev-impostor": {**common, "Port": str(sshd.port), "HostKeyAlias": "impostor-device"},
        },
        [
            known_hosts_line(sshd.port, sshd.host_public_key),
            known_hosts_line(port_b, host_key_b),
            "impostor-device " + " ".join(impostor.read_text().split()[:2]) + "\n",
        ],
    )
    hosts_file = tmp_path / "fleet.txt"
    hosts_file.write_text("# the lab's boards\ndev-a\n\ndev-b   # second shelf\ndev-down\ndev-impostor\ndev-a\n")
    bundle = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle)
    argv = [
        "profile", str(bundle), "--hosts-file", str(hosts_file), "--ssh-config", str(config), "--python", sys.executable,
        "--runs", "5", "--warmup", "1", "--connect-timeout", "5", "--timeout", "120", "--device-timeout", "180",
        "--max-parallel", "4", "--layers", "--layer-runs", "3",
    ]  # fmt: skip

    shown = CliRunner().invoke(cli, [*argv, "--json"], catch_exceptions=False)
    document = json.loads(shown.stdout)
    assert shown.exit_code == 2, shown.output
    assert [p["host"] for p in document["profiles"]] == ["dev-a", "dev-b"]
    failures = {f["host"]: f for f in document["failures"]}
    assert failures["dev-down"]["type"] == "HostUnreachableError" and "Connection refused" in failures["dev-down"]["message"]
    assert failures["dev-impostor"]["type"] == "HostKeyChangedError" and "ssh-keygen -R" in failures["dev-impostor"]["hint"]
    assert document["error"]["type"] == "ProfileFailedError" and "2 of 4 hosts failed" in document["error"]["message"]
    for entry in document["profiles"]:
        assert entry["verify"]["passed"] is True
        assert entry["device"]["cpu"]["model"] and entry["device"]["os"]["system"] == "Linux"  # each device's facts
        layers = entry["bench"]["layers"]  # measured on the device by the zipapp runtime
        assert layers["backend"] == "onnxruntime" and layers["runs"] == 3 and "int8" in layers["by_precision"]

    history = json.loads((bundle / "manifest.json").read_text())["profiles"]
    assert sorted(p["host"] for p in history) == ["dev-a", "dev-b"]  # one entry per device that answered

    text = CliRunner().invoke(cli, argv, catch_exceptions=False)  # the same fleet as a person reads it
    table = text.stdout.splitlines()
    assert table[0].split()[:2] == ["host", "device"]
    rows = {line.split()[0]: line for line in table[2:6]}
    assert set(rows) == {"dev-a", "dev-b", "dev-down", "dev-impostor"}
    assert "FAILED: HostUnreachableError" in rows["dev-down"] and "FAILED: HostKeyChangedError" in rows["dev-impostor"]
    assert "pass" in rows["dev-a"] and "Linux" in rows["dev-b"]
    assert any(line.startswith("dev-a layers: all") and "int8" in line for line in table)
    progress = [line for line in text.stderr.splitlines() if "devices," in line]
    assert len(progress) == 4 and any(line.startswith("· dev-down: failed (HostUnreachableError) [") for line in progress)
    assert any(line.startswith("· dev-b: done, p50 ") for line in progress)
    history = json.loads((bundle / "manifest.json").read_text())["profiles"]
    assert [p["host"] for p in history].count("dev-a") == 2  # the second run added to each device's history


@pytest.fixture
def tarpit() -> Iterator[int]:
    """A "device" that says hello as an SSH server and then never answers the key exchange."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.sendall(b"SSH-2.0-OpenSSH_9.2 tarpit\r\n")
            held.append(connection)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for connection in held:
        connection.close()


def test_a_device_that_hangs_is_stopped_at_its_device_timeout(sshd: SshServer, int8_bundle: Path, tarpit: int) -> None:
    started = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match=r"did not finish within its 3 s \(device timeout\), while connecting") as error:
        profile(int8_bundle, [f"{sshd.user}@127.0.0.1"], sshd.profile_options(port=tarpit, device_timeout=3, connect_timeout=30))
    assert time.monotonic() - started < 20 and "--device-timeout" in error.value.hint


def test_a_hosts_file_takes_aliases_uris_and_comments_and_refuses_what_is_not_a_host(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# fleet\npi@raspberrypi.local\n\njetson   # desk\nssh://root@10.0.0.7:2222\npi@raspberrypi.local\n")
    assert read_hosts_file(path) == ["pi@raspberrypi.local", "jetson", "ssh://root@10.0.0.7:2222"]
    path.write_text("pi@a pi@b\n")
    with pytest.raises(OptionError, match=r"hosts:1: 'pi@a pi@b' is not one SSH destination"):
        read_hosts_file(path)
    path.write_text("-oProxyCommand=evil\n")
    with pytest.raises(OptionError, match="is not one SSH destination"):
        read_hosts_file(path)
    path.write_text("# nobody\n\n")
    with pytest.raises(OptionError, match="names no host"):
        read_hosts_file(path)
    with pytest.raises(OptionError, match="cannot read the hosts file"):
        read_hosts_file(tmp_path / "missing")
