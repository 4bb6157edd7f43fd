"""`netboot serve` over TFTP: the same namespace as HTTP, fetched by real clients (curl, tftp-hpa)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import ServerProcess, curl_tftp, need

MAC = "52-54-00-12-34-56"


@pytest.fixture(scope="module")
def server(outs: dict[str, Path]):
    s = ServerProcess(
        "--dir", outs["squashfs"], "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0", "--tftp-workers", "1"
    )
    yield s
    s.stop()


@pytest.mark.parametrize("name", ["boot.ipxe", f"machine/{MAC}/boot.ipxe"])
def test_scripts_are_the_same_over_both_protocols(server: ServerProcess, name: str) -> None:
    import urllib.request

    over_tftp = curl_tftp(server.tftp_port, name)
    assert over_tftp.returncode == 0, over_tftp.stderr
    with urllib.request.urlopen(server.url(name), timeout=30) as r:
        assert over_tftp.stdout == r.read()


@pytest.mark.parametrize("blksize", ["512", "1432", "65464"])
def test_initrd_over_tftp(server: ServerProcess, outs: dict[str, Path], blksize: str) -> None:
    script = curl_tftp(server.tftp_port, f"machine/{MAC}/boot.ipxe").stdout.decode()
    gen = next(ln for ln in script.splitlines() if ln.startswith("initrd ")).split()[-1].split("/")[3]
    got = curl_tftp(server.tftp_port, f"machine/{MAC}/{gen}/initrd", "--tftp-blksize", blksize)
    assert got.returncode == 0, got.stderr
    assert got.stdout == (outs["squashfs"] / "initrd").read_bytes()
    assert server.logged(f"mac=52:54:00:12:34:56 profile=default tftp /machine/{MAC}/{gen}/initrd complete"), server.log


def test_tftp_hpa_gets_the_kernel(server: ServerProcess, outs: dict[str, Path], tmp_path: Path) -> None:
    need("tftp")
    proc = subprocess.run(
        ["tftp", "127.0.0.1", str(server.tftp_port), "-m", "binary", "-c", "get", "bzImage", str(tmp_path / "k")],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "k").read_bytes() == (outs["squashfs"] / "bzImage").read_bytes()


def test_invalid_mac_is_an_error_with_a_message(server: ServerProcess) -> None:
    got = curl_tftp(server.tftp_port, "machine/52-54-00/boot.ipxe")
    assert got.returncode != 0 and got.stdout == b""
    assert server.logged("refused, invalid MAC address '52-54-00' (ERROR 0)"), server.log


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "profile/default/../../../etc/passwd",
        "..\\..\\etc\\passwd",
        "/etc/passwd",
        "machine/x/../../etc/passwd",
    ],
)
def test_nothing_outside_the_namespace_over_tftp(server: ServerProcess, name: str) -> None:
    got = curl_tftp(server.tftp_port, name)
    assert got.returncode != 0 and b"root:" not in got.stdout
