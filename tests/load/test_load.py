"""Under load: boot storms over HTTP and TFTP (with packet loss, and many clients behind one address), and slow
clients that must not stop a boot."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from pathlib import Path

from lan_support import lan_fixture  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import ROOT, ServerProcess, closed_by_server, need

from devtools.lan import Lan

sys.path.insert(0, str(ROOT / "bench"))

import storm


def expected_digests(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {name: manifest["artifacts"][name]["sha256"] for name in ("bzImage", "initrd")}


def test_http_storm_every_machine_boots(outs: dict[str, Path]) -> None:
    server = ServerProcess("--dir", outs["squashfs"], "--http", "127.0.0.1:0", "--no-tftp")
    try:
        result = storm.http_storm("127.0.0.1", server.http_port, 100, check=True)
    finally:
        server.stop()
    assert result.failures == []
    assert len(result.script_latencies) == 100
    want = expected_digests(outs["squashfs"])
    got = {path.rsplit("/", 1)[1]: digest for path, digest in result.digests.items()
           if path.endswith(("/bzImage", "/initrd"))}
    assert got == want


def slow_client(address: str, port: int) -> socket.socket:
    """A slowloris connection: a request whose headers never end."""
    s = socket.socket()
    s.bind((address, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n")
    s.setblocking(False)
    return s


def test_slow_clients_do_not_stop_a_boot(outs: dict[str, Path], many_files: None) -> None:
    # Defaults but a shorter idle timeout (for the test's sake) and a per-address cap the slow clients reach.
    server = ServerProcess("--dir", outs["squashfs"], "--http", "127.0.0.1:0", "--no-tftp",
                           "--http-idle-timeout", "10", "--http-max-per-address", "100")
    slow: list[socket.socket] = []
    try:
        # 1,000 connections from 10 addresses that keep sending one more header line, forever.
        for i in range(1000):
            slow.append(slow_client(f"127.0.3.{1 + i % 10}", server.http_port))
        # One address beyond its cap: its oldest idle connections are closed to make room for the new ones.
        oldest = slow[0:50:10]  # 127.0.3.1's first five
        extra = [slow_client("127.0.3.1", server.http_port) for _ in range(5)]
        deadline = time.monotonic() + 10  # the server accepts the 1,000 others first, in order
        while time.monotonic() < deadline and not all(closed_by_server(s) for s in oldest):
            time.sleep(0.1)
        assert all(closed_by_server(s) for s in oldest), "no room was made at the per-address cap"
        assert not any(closed_by_server(s) for s in extra)
        for s in extra:
            s.close()
        assert sum(not closed_by_server(s) for s in slow) == 995
        # Machines boot meanwhile, whole.
        result = storm.http_storm("127.0.0.1", server.http_port, 10, check=True)
        assert result.failures == []
        for s in slow:
            with contextlib.suppress(OSError):
                s.send(b"X-a: b\r\n")
        # The idle timeout runs from each connection's start, whatever trickles in: all are closed.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(closed_by_server(s) for s in slow):
            time.sleep(0.2)
        assert all(closed_by_server(s) for s in slow), "slow connections outlived the idle timeout"
        assert "connection limits reached" in server.log
        assert storm.http_storm("127.0.0.1", server.http_port, 5).failures == []
    finally:
        for s in slow:
            s.close()
        server.stop()


def tftp_expect(tmp_path: Path, port: int, host) -> Path:
    """What the TFTP storm must receive: Debian's undionly.kpxe, and boot.ipxe as the server renders it."""
    expect = tmp_path / "expect"
    expect.mkdir()
    (expect / "undionly.kpxe").write_bytes(Path("/usr/lib/ipxe/undionly.kpxe").read_bytes())
    got = host.run(["curl", "-sf", f"tftp://127.0.0.1:{port}/boot.ipxe"], capture_output=True)
    assert got.returncode == 0, "boot.ipxe over TFTP failed before the storm"
    (expect / "boot.ipxe").write_bytes(got.stdout)
    return expect


def run_storm(host, port: int, clients: int, expect: Path, *sources: str) -> dict:
    argv = [sys.executable, str(ROOT / "bench" / "storm.py"), "tftp", "--port", str(port), "--clients",
            str(clients), "--files", "undionly.kpxe,boot.ipxe", "--expect", str(expect)]
    done = host.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_tftp_storm_with_packet_loss(lan: Lan, outs: dict[str, Path], tmp_path: Path) -> None:
    need("curl")
    host = lan.host("storm", "192.0.2.10/24")
    server = ServerProcess("--dir", outs["squashfs"], "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0",
                           prefix=host.argv([]))
    try:
        expect = tftp_expect(tmp_path, server.tftp_port, host)
        host.drop_udp(2)
        result = run_storm(host, server.tftp_port, 60, expect)
        assert result["failures"] == []
        assert host.dropped_udp() > 0, "no datagram was dropped: the loss rule did not apply"
        assert "retransmissions" in server.log
    finally:
        server.stop()


def test_tftp_storm_from_one_address_waits_its_turn(lan: Lan, outs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    # Many machines behind one NAT address, beyond the per-address limit: the requests over it wait and start
    # as transfers end, instead of being dropped into the clients' timeouts.
    host = lan.host("nat", "192.0.2.10/24")
    server = ServerProcess("--dir", outs["squashfs"], "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0",
                           "--tftp-max-per-source", "4", prefix=host.argv([]))
    try:
        expect = tftp_expect(tmp_path, server.tftp_port, host)
        argv = [sys.executable, "-c", "import sys, json, storm; "
                f"r = storm.tftp_storm('127.0.0.1', {server.tftp_port}, 50, ['undionly.kpxe', 'boot.ipxe'], "
                f"expect=__import__('pathlib').Path({str(expect)!r}), sources=['127.0.0.9']); "
                "json.dump(r.failures, sys.stdout)"]
        done = host.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT / "bench")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == []
        assert "transfer limits reached" in server.log and "started after waiting" in server.log
    finally:
        server.stop()
