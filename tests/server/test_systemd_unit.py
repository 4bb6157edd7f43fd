"""contrib/netboot.service: systemd's own checks of the unit (syntax, directives, sandboxing), and its command line
run with its credentials laid out as systemd lays them out."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, cli, fake_out, need, status_pki, write_machines

UNIT = ROOT / "contrib" / "netboot.service"


def installed_copy(tmp_path: Path) -> Path:
    """The unit as installed here: ExecStart names this checkout's netboot (systemd checks it exists)."""
    netboot = Path(sys.executable).parent / "netboot"
    assert netboot.exists(), f"{netboot}: the package's command is not installed (make venv)"
    copy = tmp_path / "netboot.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/netboot", str(netboot)))
    return copy


def test_the_unit_verifies_without_warnings(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = installed_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    text = UNIT.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "StateDirectory=netboot" in text


def test_the_unit_is_sandboxed(tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = installed_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    found = re.search(r"Overall exposure level for netboot.service: ([\d.]+) (\w+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    # systemd's scale: 0 (sandboxed) to 10 (exposed); below 2 is "OK".
    assert float(found.group(1)) < 2.0, proc.stdout


def as_systemd_writes_a_credential(path: Path, uid: int) -> None:
    """`path` as systemd's write_credential leaves it: mode 0400, and an ACL entry by which `uid` (the service's
    user) reads it, whose mask `stat` shows as group bits (0440). The ACL is the xattr acl_to_xattr writes:
    version 2, then (tag, permissions, id) for the owner, the user, the owning group, the mask and others."""
    path.chmod(0o400)
    none = 0xFFFFFFFF
    entries = ((0x01, 4, none), (0x02, 4, uid), (0x04, 0, none), (0x10, 4, none), (0x20, 0, none))
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    os.setxattr(path, "system.posix_acl_access", acl)
    assert path.stat().st_mode & 0o777 == 0o440


def test_the_units_command_line_serves_https_with_its_credentials(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    text = UNIT.read_text()
    argv = shlex.split(re.search(r"^ExecStart=(.*)$", text, re.MULTILINE).group(1))
    credentials = dict(re.findall(r"^LoadCredential=([^:\n]+):(.+)$", text, re.MULTILINE))
    # Every credential the command line names (%d: the service's credentials directory) is loaded, from
    # /etc/netboot, where docs/operations.md has the operator make it.
    named = {arg.removeprefix("%d/") for arg in argv if arg.startswith("%d/")}
    assert named == set(credentials) == {"status-token", "status.crt", "status.key"}, (named, credentials)
    operations = (ROOT / "docs" / "operations.md").read_text()
    for source in credentials.values():
        assert source.startswith("/etc/netboot/") and source in operations, source
    # The directory as systemd makes it, with the test's certificate and a token.
    given = tmp_path / "credentials"
    given.mkdir()
    pki = status_pki()
    shutil.copyfile(pki / "server.pem", given / "status.crt")
    shutil.copyfile(pki / "server-key.pem", given / "status.key")
    (given / "status-token").write_text("unit-token\n")
    for name in credentials:
        as_systemd_writes_a_credential(given / name, 65534)
    # The unit's command line, on loopback and with the test's machines file.
    local = {"--machines": str(write_machines(tmp_path / "machines.toml", {"p": fake_out(tmp_path / "out")}, {})),
             "--http": "127.0.0.1:0", "--status": "127.0.0.1:0", "--state-dir": str(tmp_path / "state")}
    assert argv[:2] == ["/usr/local/bin/netboot", "serve"] and set(local) <= set(argv)
    args = [local.get(before, arg.replace("%d", str(given))) for before, arg in itertools.pairwise(argv[1:])]
    # A token file of mode 0440 is refused, but for a credential of the service's own.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    refused = cli("serve", *args, "--no-tftp", timeout=30)
    assert refused.returncode == 2 and "(mode 0440): chmod 600" in refused.stderr, refused.stderr
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(given))
    server = ServerProcess(*args, "--no-tftp")
    try:
        answer = subprocess.run([need("curl"), "-sS", "--cacert", pki / "ca.pem", "-H",
                                 "Authorization: Bearer unit-token",
                                 f"https://127.0.0.1:{server.status_port}/api/machines"],
                                capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0 and json.loads(answer.stdout)["total"] == 0, answer.stderr
    finally:
        server.stop()
