"""A listener that cannot bind says why and what to do: a port below 1024 as an unprivileged user names root and
CAP_NET_BIND_SERVICE, as the systemd unit grants it."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from support import fake_out, nobody_python

from netboot.core.errors import cannot_listen


def free_privileged_port(kind: int) -> int:
    """A port below 1024 on 127.0.0.1 that nothing holds (root may bind it: this test runs as root)."""
    for port in range(1023, 600, -1):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 600 and 1023 on 127.0.0.1")


@pytest.mark.root
@pytest.mark.parametrize("listener", ["http", "tftp", "status", "netboot.tftp"])
def test_a_port_below_1024_as_nobody_names_the_capability(listener: str) -> None:
    base = Path("/tmp") / f"netboot-listen-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        base.chmod(0o755)
        out = fake_out(base / "out", "direct")
        python, env = nobody_python(base / "python")
        port = free_privileged_port(socket.SOCK_DGRAM if "tftp" in listener else socket.SOCK_STREAM)
        command = {"http": ["netboot", "serve", "--http", f"127.0.0.1:{port}", "--no-tftp", "--status", "none"],
                   "tftp": ["netboot", "serve", "--http", "127.0.0.1:0", "--tftp", f"127.0.0.1:{port}",
                            "--status", "none"],
                   "status": ["netboot", "serve", "--http", "127.0.0.1:0", "--no-tftp", "--status",
                              f"127.0.0.1:{port}"],
                   "netboot.tftp": ["netboot.tftp", "--root", str(out), "--listen", f"127.0.0.1:{port}"]}[listener]
        if command[0] == "netboot":
            command += ["--dir", str(out)]
        proc = subprocess.run([*python, "-m", *command], capture_output=True, text=True, cwd="/", env=env,
                              timeout=60)
    finally:
        shutil.rmtree(base)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 or "error" in lines[-1], proc.stderr
    error = lines[-1]
    assert f"127.0.0.1:{port}" in error and "Permission denied" in error, error
    assert "ports below 1024 need root or CAP_NET_BIND_SERVICE" in error and "contrib/netboot.service" in error


def test_the_hint_is_for_permission_on_a_privileged_port_only() -> None:
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES))
    dhcp = str(cannot_listen("DHCP", "0.0.0.0:67", 67, denied))
    assert dhcp.startswith("cannot listen for DHCP on 0.0.0.0:67: Permission denied (ports below 1024 need root")
    high = str(cannot_listen("HTTP", "http://0.0.0.0:8080/", 8080, denied, "choose another"))
    assert high == "cannot listen for HTTP on http://0.0.0.0:8080/: Permission denied (choose another)"
    busy = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    assert "CAP_NET_BIND_SERVICE" not in str(cannot_listen("TFTP", "tftp://0.0.0.0:69/", 69, busy))
