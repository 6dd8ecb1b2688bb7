"""A real OpenSSH server on 127.0.0.1 for the remote-profiling tests.

The session-scoped `sshd` fixture generates a host key and a client key in a temporary folder,
starts `/usr/sbin/sshd -D` on a free port with a config that accepts only that client key, and
hands the tests everything a client needs: a hermetic ssh_config (no agent, no global known_hosts),
a known_hosts file that trusts the server, and the key. Nothing outside the temporary folder is
touched except /run/sshd, which sshd insists on when it runs as root.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generate_key(path: Path) -> Path:
    """An unencrypted ed25519 key pair at `path` and `path`.pub; returns the private key."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeopt-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def known_hosts_line(port: int, public_key: Path) -> str:
    key_type, key_data = public_key.read_text().split()[:2]
    return f"[127.0.0.1]:{port} {key_type} {key_data}\n"


@dataclass(frozen=True)
class SshServer:
    """A running test sshd and the client files that reach it."""

    port: int
    user: str
    root: Path
    client_key: Path
    host_public_key: Path
    known_hosts: Path
    ssh_config: Path
    log: Path

    @property
    def host(self) -> str:
        return f"{self.user}@127.0.0.1"

    def profile_options(self, **overrides: Any) -> Any:
        """ProfileOptions that reach this server, with this interpreter as the device's Python."""
        from edgeopt.remote import ProfileOptions

        options = ProfileOptions(
            port=self.port,
            identity=self.client_key,
            python=sys.executable,
            runs=5,
            warmup=1,
            connect_timeout=5,
            command_timeout=60,
            ssh_config=self.ssh_config,
            known_hosts=self.known_hosts,
        )
        return replace(options, **overrides)


def _write_sshd_config(root: Path, port: int, user: str, host_key: Path, authorized_keys: Path) -> Path:
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized_keys}",
                f"PidFile {root / 'sshd.pid'}",
                "UsePAM no",
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                f"AllowUsers {user}",
                "Subsystem sftp internal-sftp",
                "LogLevel DEBUG1",  # the jump-host test reads the direct-tcpip request from it
                "",
            ]
        )
    )
    return config


def _write_client_config(root: Path, known_hosts: Path) -> Path:
    """Settings that keep the tests away from the user's agent, keys and known_hosts."""
    config = root / "ssh_config"
    config.write_text(
        "\n".join(
            [
                "Host *",
                "  IdentitiesOnly yes",
                "  IdentityAgent none",
                f"  UserKnownHostsFile {known_hosts}",
                "  GlobalKnownHostsFile /dev/null",
                "  PasswordAuthentication no",
                "  KbdInteractiveAuthentication no",
                "",
            ]
        )
    )
    return config


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}:\n{log.read_text()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if not SSHD.exists():
        pytest.skip("OpenSSH server not installed (/usr/sbin/sshd): apt-get install openssh-server")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH client not installed (ssh, ssh-keygen): apt-get install openssh-client")
    if os.geteuid() == 0:
        # sshd running as root refuses to start without its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    root = tmp_path_factory.mktemp("sshd")
    user = getpass.getuser()
    port = free_port()
    host_key = generate_key(root / "ssh_host_ed25519_key")
    client_key = generate_key(root / "client_ed25519")
    authorized_keys = root / "authorized_keys"
    authorized_keys.write_text(client_key.with_suffix(".pub").read_text())
    known_hosts = root / "known_hosts"
    host_public_key = host_key.with_suffix(".pub")
    known_hosts.write_text(known_hosts_line(port, host_public_key))
    config = _write_sshd_config(root, port, user, host_key, authorized_keys)
    log = root / "sshd.log"

    # -E: the log goes to a file (with -e, sshd's session processes would print their debug lines
    # into the client's stderr); what sshd says before it opens the log goes to the same file.
    with log.open("ab") as early:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-E", str(log), "-f", str(config)], stdout=early, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_port(port, process, log)
        yield SshServer(
            port=port,
            user=user,
            root=root,
            client_key=client_key,
            host_public_key=host_public_key,
            known_hosts=known_hosts,
            ssh_config=_write_client_config(root, known_hosts),
            log=log,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
