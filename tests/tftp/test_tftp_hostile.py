"""Hostile requests against the server and its worker processes: whatever a client sends, the others go on
being served, nothing a client sent reaches a log line whole, and a worker that dies is replaced."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rawtftp import Peer
from tftp_support import ServerThread

from netboot.tftp import TftpConfig, packets
from netboot.tftp.packets import Data, Error


def workers_of(served: ServerThread) -> list[int]:
    pool = served.server._pool  # type: ignore[union-attr]
    assert pool is not None
    return served.call(lambda: [w.process.pid for w in pool.workers])  # type: ignore[return-value]


def test_a_64k_file_name_gets_one_error_and_one_short_line_and_kills_no_worker(
        tftp_server: Callable[..., ServerThread], tftp_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = tftp_server(config=TftpConfig(workers=1))
    before = workers_of(served)
    # Leading "./" and "/" repeated: the name still names a real file, in a request of nearly 64 KiB.
    for name in ("./" * 32_000 + "small.bin", "/" * 65_000 + "small.bin"):
        with caplog.at_level(logging.INFO, logger="netboot.tftp"), Peer() as peer:
            peer.request(served.port, name)
            packet, _ = peer.receive()
            assert isinstance(packet, Error) and packet.code == 4, packet
            assert "512" in packet.message and len(packet.message) < 200
            assert peer.nothing_within(0.3)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and all(len(line) < 300 for line in lines), lines
    # The worker lives on and serves.
    with Peer() as peer:
        assert peer.download(served.port, "small.bin") == (tftp_root / "small.bin").read_bytes()
    assert workers_of(served) == before
    (stats,) = served.wait_stats(1)
    assert stats.outcome == "complete" and stats.filename == "small.bin"


def test_a_request_of_64k_options_is_served_by_a_worker(tftp_server: Callable[..., ServerThread],
                                                       tftp_root: Path) -> None:
    served = tftp_server(config=TftpConfig(workers=1))
    before = workers_of(served)
    options = (("blksize", "1024"), *((f"x{i}", "y" * 40) for i in range(1400)), ("tsize", "0"))
    with Peer() as peer:
        datagram = packets.build_request("3m.bin", "octet", options)
        assert len(datagram) > 60_000
        peer.send(datagram, served.port)
        packet, tid = peer.receive()
        # The first options are honoured; the flood beyond them is ignored, as unknown options are (RFC 2347).
        assert isinstance(packet, packets.OptionAck) and dict(packet.options) == {"blksize": "1024"}
        peer.send(packets.build_ack(0), tid)
        got, block = bytearray(), 1
        while True:
            packet, _ = peer.receive()
            assert isinstance(packet, Data)
            if packet.block == block & 0xFFFF:
                got += packet.payload
                block += 1
            peer.send(packets.build_ack(packet.block), tid)
            if len(packet.payload) < 1024:
                break
    assert bytes(got) == (tftp_root / "3m.bin").read_bytes()
    assert workers_of(served) == before


def test_a_worker_killed_mid_transfer_is_replaced_and_its_transfer_fails_at_once(
        tftp_server: Callable[..., ServerThread], tftp_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = tftp_server(config=TftpConfig(workers=2))
    with Peer() as peer, caplog.at_level(logging.INFO, logger="netboot.tftp"):
        peer.request(served.port, "3m.bin")
        packet, tid = peer.receive()
        assert isinstance(packet, Data)
        pool = served.server._pool  # type: ignore[union-attr]
        # Read on the server's own loop, which is the one that changes the pool.
        running = served.call(lambda: [w for w in pool.workers if w.transfers])
        assert running, "the transfer is not running in a worker"
        running = running[0]
        os.kill(running.process.pid, signal.SIGKILL)
        running.process.wait(10)
        # Failed cleanly: the client is told now, from its transfer's port, rather than left to time out.
        peer.sock.settimeout(3)
        packet, port = peer.receive()
        assert isinstance(packet, Error) and port == tid, packet
    (stats,) = served.wait_stats(1)
    assert stats.outcome == "cancelled" and stats.detail == "worker exited" and stats.filename == "3m.bin"
    deadline = time.monotonic() + 10
    while len(workers_of(served)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = workers_of(served)
    assert len(pids) == 2 and running.process.pid not in pids
    assert any(f"TFTP worker {running.process.pid} exited" in r.getMessage() for r in caplog.records)
    # Transfers still complete, and every worker serves: two at once go to the two workers.
    with Peer() as one, Peer() as two:
        one.request(served.port, "3m.bin")
        two.request(served.port, "3m.bin")
        for peer in (one, two):
            assert isinstance(peer.receive()[0], Data)
        assert served.call(lambda: sorted(len(w.transfers) for w in pool.workers)) == [1, 1]
    with Peer() as again:
        assert again.download(served.port, "small.bin") == (tftp_root / "small.bin").read_bytes()
