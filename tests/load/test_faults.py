"""Faults: `kill -9` of a build at any moment, of a server during transfers, and a disk that fills up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, ServerProcess, free_port, netboot, netboot_ok

from netboot.tftp import packets

sys.path.insert(0, str(ROOT / "bench"))
from measure import descendants


def alive(pid: int) -> bool:
    """Running (a zombie that its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_all_exit(pids: list[int], what: str, timeout: float = 10) -> None:
    """Every one of `pids` ends within `timeout`; the ones that do not are killed, and the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"{what}: processes {left} outlived it"


def usable(out: Path) -> dict:
    """The output's manifest, after checking every artifact against it."""
    manifest = json.loads((out / "manifest.json").read_text())
    for name, meta in manifest["artifacts"].items():
        data = (out / name).read_bytes()
        assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name
    return manifest


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of its own (needs root, as the LAN tests do)."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot mount a tmpfs (the fault tests run as root): {proc.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def leftovers(where: Path) -> list[str]:
    return sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.name.startswith("."))


# -- builds ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["squashfs", "direct"])
def test_kill_9_of_a_build_at_any_moment(tmp_path: Path, system: Path, fmt: str) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    netboot_ok("build", system, "--out", out, "--format", fmt, "--append", "generation=1", "--cache-dir", cache)
    before = usable(out)
    # Builds that change every compressed member (another level), killed at growing moments: from reading the
    # closure to compressing, writing the cache and swapping the output in.
    moments = [0.05, 0.2, 0.4, 0.7, 1.0, 1.4, 2.0, 3.0]
    for i, moment in enumerate(moments):
        proc = subprocess.Popen([sys.executable, "-m", "netboot", "build", str(system), "--out", str(out),
                                 "--format", fmt, "--level", "5", "--append", f"generation={i + 2}",
                                 "--cache-dir", str(cache), "-q"], cwd=ROOT, stderr=subprocess.PIPE)
        time.sleep(moment)
        helpers = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_all_exit(helpers, "a build killed with SIGKILL")
        manifest = usable(out)  # the previous build, or a complete new one
        assert manifest["cmdline"].split()[-1] in {f"generation={n}" for n in range(1, i + 3)}
        assert manifest["cmdline"].split()[:-1] == before["cmdline"].split()[:-1]
    # The next build removes what the killed ones left, and the cache gives what a build without it makes.
    netboot_ok("build", system, "--out", out, "--format", fmt, "--level", "5", "--append", "final",
               "--cache-dir", cache)
    netboot_ok("build", system, "--out", tmp_path / "fresh", "--format", fmt, "--level", "5", "--append", "final",
               "--no-cache")
    assert (out / "initrd").read_bytes() == (tmp_path / "fresh" / "initrd").read_bytes()
    assert leftovers(tmp_path) == []


def test_build_onto_another_file_system(tmp_path: Path, system: Path, outs: dict[str, Path]) -> None:
    # The cache on one file system, the output on a tmpfs: members are copied across (sendfile where
    # copy_file_range refuses), and the bytes are those of the same build elsewhere.
    with tmpfs(tmp_path / "fs", "128m") as fs:
        netboot_ok("build", system, "--out", fs / "out")
        assert (fs / "out" / "initrd").read_bytes() == (outs["squashfs"] / "initrd").read_bytes()


@pytest.mark.parametrize("full", ["output", "cache"])
@pytest.mark.parametrize("fmt", ["squashfs", "direct"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path: Path, system: Path, fmt: str,
                                                                 full: str) -> None:
    with tmpfs(tmp_path / "fs", "6m") as fs:
        out = fs / "out" if full == "output" else tmp_path / "out"
        cache = fs / "cache" if full == "cache" else tmp_path / "cache"
        proc = netboot("build", system, "--out", out, "--format", fmt, "--cache-dir", cache)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("netboot: error: "), proc.stderr
        assert "No space left on device" in lines[0], lines[0]
        assert not out.exists()
        assert leftovers(fs) == [] and leftovers(tmp_path) == []
        if cache.exists():  # what the cache holds is whole: every entry with its metadata
            entries = [p for p in cache.iterdir() if p.suffix != ".json"]
            assert all(p.with_name(p.name.split(".", 1)[0] + ".json").is_file() for p in entries)


# -- serving -----------------------------------------------------------------------------------------------

def test_kill_9_of_the_server_during_transfers_and_a_restart(outs: dict[str, Path]) -> None:
    http, tftp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    args = ("--dir", outs["squashfs"], "--http", f"127.0.0.1:{http}", "--tftp", f"127.0.0.1:{tftp}",
            "--tftp-workers", "2")
    server = ServerProcess(*args)
    try:
        workers = descendants(server.proc.pid)
        assert len(workers) == 2
        with socket.create_connection(("127.0.0.1", http)) as slow, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            # An HTTP download and a TFTP transfer in progress: neither client reads on.
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.sendall(b"GET /initrd HTTP/1.1\r\nHost: x\r\n\r\n")
            assert slow.recv(100).startswith(b"HTTP/1.1 200")
            peer.settimeout(5)
            peer.sendto(packets.build_request("initrd", "octet", (("blksize", "1432"),)), ("127.0.0.1", tftp))
            assert isinstance(packets.parse(peer.recv(2048)), packets.OptionAck)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
        assert_all_exit(workers, "netboot serve killed with SIGKILL")
        restarted = ServerProcess(*args)  # the same ports, at once
        try:
            with urllib_get(f"http://127.0.0.1:{http}/initrd") as body:
                assert body == (outs["squashfs"] / "initrd").read_bytes()
            fetched = subprocess.run(["curl", "-sf", f"tftp://127.0.0.1:{tftp}/boot.ipxe"], capture_output=True)
            assert fetched.returncode == 0 and fetched.stdout.startswith(b"#!ipxe")
        finally:
            restarted.stop()
    finally:
        server.stop()


@contextlib.contextmanager
def urllib_get(url: str) -> Iterator[bytes]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        yield r.read()
