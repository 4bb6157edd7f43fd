"""The server on the wire, seen by a raw peer: TIDs, duplicates, limits, refusals, timers, hostile input."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawtftp import Peer
from tftp_support import EACH, ServerThread, tool

from netboot.tftp import BytesContent, FileSystemResolver, NotFound, SessionConfig, TftpConfig, packets
from netboot.tftp.content import Content
from netboot.tftp.mtu import interface_mtu
from netboot.tftp.packets import Data, Error, OptionAck


@pytest.fixture
def peer() -> Iterator[Peer]:
    with Peer() as p:
        yield p


def test_transfer_comes_from_its_own_port_and_the_address_asked(
        tftp_server: Callable[..., ServerThread], tftp_root: Path) -> None:
    # Listening on every IPv4 address of lo; the answer must come from the one the request went to.
    served = tftp_server(hosts=("0.0.0.0",), interface="lo")
    with Peer("127.0.0.1") as client:
        client.sock.sendto(packets.build_request("small.bin"), ("127.0.0.2", served.port))
        data, (host, port) = client.sock.recvfrom(2048)
        assert host == "127.0.0.2" and port != served.port
        assert packets.parse(data) == Data(1, (tftp_root / "small.bin").read_bytes()[:512])


@EACH
def test_a_stranger_is_refused_and_the_transfer_goes_on(served: ServerThread, peer: Peer, tftp_root: Path
                                                        ) -> None:
    peer.request(served.port, "3m.bin")
    first, tid = peer.receive()
    assert isinstance(first, Data) and first.block == 1
    with Peer() as stranger:
        # The transfer's socket is connected to its peer, as tftpd-hpa's are: the kernel refuses anyone else
        # (ICMP port unreachable, which a connected client socket sees as ECONNREFUSED).
        stranger.sock.connect(("127.0.0.1", tid))
        stranger.sock.send(packets.build_ack(1))
        with pytest.raises(ConnectionRefusedError):
            stranger.sock.recv(2048)
    peer.send(packets.build_ack(1), tid)
    second, _ = peer.receive()
    assert isinstance(second, Data) and second.block == 2
    assert second.payload == (tftp_root / "3m.bin").read_bytes()[512:1024]


def test_retransmitted_request_does_not_start_a_second_transfer(tftp_server: Callable[..., ServerThread],
                                                                peer: Peer) -> None:
    served = tftp_server(config=TftpConfig(session=SessionConfig(timeout=0.1, max_timeout=0.2, retries=2)))
    for _ in range(3):
        peer.request(served.port, "small.bin", (("blksize", "1468"),))
    got = peer.collect(0.5)
    assert [type(p) for p, _ in got] == [OptionAck] * 3 and len({port for _, port in got}) == 1
    (stats,) = served.wait_stats(1)
    time.sleep(0.3)
    assert len(served.stats) == 1  # one transfer: its OACK and two retransmissions, then it gave up
    assert stats.outcome == "timed out" and stats.retransmissions == 2


@EACH
def test_one_transfer_per_repeated_request(served: ServerThread, peer: Peer) -> None:
    for _ in range(5):
        peer.request(served.port, "small.bin")
    packet, tid = peer.receive()
    assert isinstance(packet, Data)
    peer.send(packets.build_ack(1), tid)
    packet, _ = peer.receive()
    peer.send(packets.build_ack(2), tid)
    stats = served.wait_stats(1)
    time.sleep(0.3)
    assert len(served.stats) == 1 and stats[0].outcome == "complete"
    assert served.call(lambda: served.server.transfers) == 0  # type: ignore[union-attr]


@EACH
def test_a_different_request_from_the_same_port_replaces_the_transfer(served: ServerThread, peer: Peer
                                                                      ) -> None:
    peer.request(served.port, "3m.bin")
    _, old_tid = peer.receive()
    peer.request(served.port, "small.bin")
    packet, tid = peer.receive()
    assert tid != old_tid and isinstance(packet, Data) and packet.block == 1 and len(packet.payload) == 512
    (stats,) = served.wait_stats(1)
    assert stats.filename == "3m.bin" and stats.outcome == "cancelled" and "superseded" in stats.detail


@EACH
def test_a_new_request_right_after_the_last_ack_finds_the_transfer_complete(served: ServerThread,
                                                                            peer: Peer) -> None:
    # The final ACK (or EDK2's ERROR 8) to the transfer port and the next request to the listening port race;
    # the next request differs, as EDK2's after its size probe does.
    for i in range(20):
        peer.request(served.port, "small.bin", (("blksize", str(1468 - i % 2)),))
        _, tid = peer.receive()
        peer.send(packets.build_ack(0), tid)
        peer.receive()
        peer.send(packets.build_ack(1), tid)
    stats = served.wait_stats(20)
    assert [s.outcome for s in stats] == ["complete"] * 20


def test_oack_order_follows_the_request(served: ServerThread, peer: Peer, tftp_root: Path) -> None:
    # U-Boot's lwIP client expects the options back in the order it asked for them.
    options = (("windowsize", "4"), ("TSIZE", "0"), ("x-unknown", "1"), ("blksize", "1024"), ("timeout", "2"))
    peer.request(served.port, "3m.bin", options)
    oack, _ = peer.receive()
    size = str((tftp_root / "3m.bin").stat().st_size)
    assert oack == OptionAck((("windowsize", "4"), ("tsize", size), ("blksize", "1024"), ("timeout", "2")))


@EACH
def test_size_probe_then_real_download(served: ServerThread, peer: Peer, tftp_root: Path) -> None:
    # EDK2: tsize only, ERROR 8 on the OACK, then a fresh request for the data.
    peer.request(served.port, "3m.bin", (("tsize", "0"),))
    oack, tid = peer.receive()
    assert oack == OptionAck((("tsize", str((tftp_root / "3m.bin").stat().st_size)),))
    peer.send(packets.build_error(8, "User aborted the transfer"), tid)
    assert served.wait_stats(1)[0].outcome == "size probe"
    with Peer() as again:
        got = again.download(served.port, "3m.bin", (("blksize", "1468"),))
        assert got == (tftp_root / "3m.bin").read_bytes()


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "..\\..\\etc\\passwd", "sub/../../etc/passwd",
                                  "escape", "sub/../escape", "missing.bin", "sub", ""])
def test_refused_names_get_an_error_and_not_a_byte(tftp_server: Callable[..., ServerThread], tmp_path: Path,
                                                   name: str) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("secret")
    (root / "escape").symlink_to(tmp_path / "secret")
    served = tftp_server(resolver=FileSystemResolver(root))
    with Peer() as peer:
        peer.request(served.port, name, (("tsize", "0"), ("blksize", "1468")))
        packet, _ = peer.receive()
        assert isinstance(packet, Error) and packet.code in (1, 2), packet  # an ERROR, not an OACK first
        assert peer.nothing_within(0.3)
    assert served.stats == []


def test_write_request_refused_and_nothing_written(served: ServerThread, peer: Peer, tftp_root: Path) -> None:
    peer.send(packets.build_request("new.bin", opcode=packets.WRQ), served.port)
    packet, _ = peer.receive()
    assert packet == Error(2, "this server is read-only")
    assert not (tftp_root / "new.bin").exists()
    assert peer.nothing_within(0.3)


def test_malformed_requests_get_error_4_and_other_opcodes_nothing(served: ServerThread, peer: Peer,
                                                                  tftp_root: Path) -> None:
    peer.send(b"\x00\x01small.bin\x00mail\x00", served.port)
    packet, _ = peer.receive()
    assert isinstance(packet, Error) and packet.code == 4
    for junk in (b"\x00\x03\x00\x01data", b"\x00\x04\x00\x01", b"\x00\x05\x00\x01x\x00", b"\xff", b""):
        peer.send(junk, served.port)
    assert peer.nothing_within(0.3)
    assert peer.download(served.port, "small.bin") == (tftp_root / "small.bin").read_bytes()


def test_retransmissions_are_bounded_and_the_transfer_dropped(tftp_server: Callable[..., ServerThread],
                                                             peer: Peer) -> None:
    config = TftpConfig(session=SessionConfig(timeout=0.05, max_timeout=0.1, retries=3))
    served = tftp_server(config=config)
    peer.request(served.port, "3m.bin")
    got = peer.collect(0.5)
    # The first DATA 1 and three retransmissions, then silence (a spoofed request is amplified 4x at most).
    assert [p.block for p, _ in got] == [1, 1, 1, 1]  # type: ignore[attr-defined]
    (stats,) = served.wait_stats(1)
    assert stats.outcome == "timed out" and stats.retransmissions == 3


def test_transfer_limit_queues_and_starts_when_one_ends(tftp_server: Callable[..., ServerThread]) -> None:
    served = tftp_server(config=TftpConfig(max_transfers=2))
    with Peer() as a, Peer() as b, Peer() as c:
        for p in (a, b, c):
            p.request(served.port, "3m.bin")
        _, tid = a.receive()
        assert isinstance(b.receive()[0], Data)
        assert c.nothing_within(0.5), "a third transfer started beyond the limit of 2"
        assert served.call(lambda: served.server.waiting) == 1
        a.send(packets.build_error(0, "TFTP Aborted"), tid)  # one client goes away
        assert served.wait_stats(1)[0].outcome == "aborted by client"
        # The waiting client gets its first block at once, without having to repeat its request.
        packet, _ = c.receive()
        assert isinstance(packet, Data) and packet.block == 1


def test_per_source_limit(tftp_server: Callable[..., ServerThread]) -> None:
    served = tftp_server(config=TftpConfig(max_per_source=1))
    with Peer() as first, Peer() as second, Peer("127.0.0.2") as elsewhere:
        first.request(served.port, "3m.bin")
        _, tid = first.receive()
        second.request(served.port, "3m.bin")
        assert second.nothing_within(0.5), "a second transfer from 127.0.0.1 started beyond the limit of 1"
        elsewhere.sock.sendto(packets.build_request("3m.bin"), ("127.0.0.1", served.port))
        assert isinstance(elsewhere.receive()[0], Data)
        first.send(packets.build_error(0, "TFTP Aborted"), tid)
        assert isinstance(second.receive()[0], Data)


def _ask(peer: Peer, port: int) -> None:
    peer.sock.sendto(packets.build_request("3m.bin"), ("127.0.0.1", port))  # the server's address


def _abort(peer: Peer, tid: int) -> None:
    peer.sock.sendto(packets.build_error(0, "TFTP Aborted"), ("127.0.0.1", tid))


def _first_block(peer: Peer) -> int:
    packet, tid = peer.receive()
    assert isinstance(packet, Data) and packet.block == 1
    return tid


def test_waiting_requests_take_turns_between_addresses(tftp_server: Callable[..., ServerThread]) -> None:
    # One transfer at a time: three clients behind one address (a NAT) queue before one elsewhere, and the
    # one elsewhere still gets the second turn, not the fourth.
    served = tftp_server(config=TftpConfig(max_transfers=1))
    with Peer("127.0.0.5") as running, Peer() as a1, Peer() as a2, Peer() as a3, Peer("127.0.0.2") as b:
        _ask(running, served.port)
        tid = _first_block(running)
        for p in (a1, a2, a3, b):
            _ask(p, served.port)
            time.sleep(0.02)
        _ask(a2, served.port)  # a retransmission keeps its place and adds nothing
        assert served.call(lambda: served.server.waiting) == 4
        order, waiting, current = [], [a1, a2, a3, b], running
        while waiting:
            _abort(current, tid)
            ready, _, _ = select.select([p.sock for p in waiting], [], [], 2)
            assert len(ready) == 1, "not exactly one waiting request started when a transfer ended"
            (current,) = [p for p in waiting if p.sock is ready[0]]
            tid = _first_block(current)
            assert all(p.nothing_within(0.05) for p in waiting if p is not current)
            waiting.remove(current)
            order.append(current)
        assert order == [a1, b, a2, a3]


def test_a_request_its_client_stopped_repeating_is_forgotten(tftp_server: Callable[..., ServerThread]
                                                              ) -> None:
    served = tftp_server(config=TftpConfig(max_transfers=1, wait_timeout=0.3))
    with Peer("127.0.0.5") as running, Peer() as gone, Peer() as patient:
        _ask(running, served.port)
        tid = _first_block(running)
        _ask(gone, served.port)
        _ask(patient, served.port)
        for _ in range(3):  # one client keeps retransmitting its request, the other asked once
            time.sleep(0.2)
            _ask(patient, served.port)
        _abort(running, tid)
        _first_block(patient)
        assert gone.nothing_within(0.5)
        assert served.call(lambda: served.server.waiting) == 0


def test_a_full_queue_drops_from_the_address_with_most_waiting(tftp_server: Callable[..., ServerThread]
                                                               ) -> None:
    served = tftp_server(config=TftpConfig(max_transfers=1, max_waiting=2))
    with Peer("127.0.0.5") as running, Peer() as flood1, Peer() as flood2, Peer("127.0.0.2") as other, \
            Peer() as flood3:
        _ask(running, served.port)
        tid = _first_block(running)
        _ask(flood1, served.port)
        _ask(flood2, served.port)
        _ask(other, served.port)  # full: 127.0.0.1's oldest request makes room
        _ask(flood3, served.port)  # 127.0.0.1 would then hold the most: this one is dropped
        assert served.call(lambda: served.server.waiting) == 2
        _abort(running, tid)
        tid = _first_block(flood2)
        _abort(flood2, tid)
        _first_block(other)
        assert flood1.nothing_within(0.3) and flood3.nothing_within(0.1)


def test_generated_content_and_resolver_failures(tftp_server: Callable[..., ServerThread], peer: Peer
                                                 ) -> None:
    def resolver(name: str, client: tuple) -> Content:
        if name == "boot.ipxe":
            return BytesContent(f"#!ipxe\necho hello {client[0]}\n".encode())
        if name == "crash":
            raise RuntimeError("a bug in the resolver")
        raise NotFound("no such script")

    served = tftp_server(resolver=resolver)
    assert peer.download(served.port, "boot.ipxe") == b"#!ipxe\necho hello 127.0.0.1\n"
    peer.request(served.port, "crash")
    assert peer.receive()[0] == Error(0, "internal error")
    peer.request(served.port, "other")
    assert peer.receive()[0] == Error(1, "no such script")
    assert peer.download(served.port, "boot.ipxe").startswith(b"#!ipxe")


def test_shutdown_tells_running_transfers(tftp_server: Callable[..., ServerThread], peer: Peer) -> None:
    served = tftp_server()
    peer.request(served.port, "3m.bin")
    _, tid = peer.receive()
    served.stop()
    packet, port = peer.receive()
    while isinstance(packet, Data):  # a retransmission may come first
        packet, port = peer.receive()
    assert packet == Error(0, "server shutting down") and port == tid
    assert served.stats[0].outcome == "cancelled"


def test_lo_mtu_is_read_from_the_kernel() -> None:
    index = socket.if_nametoindex("lo")
    assert interface_mtu(index) == int(Path("/sys/class/net/lo/mtu").read_text())


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "f.bin").write_bytes(os.urandom(20000))
    server = ServerThread(FileSystemResolver(root), TftpConfig(max_transfers=1000, max_per_source=1000),
                          ("127.0.0.1",))
    yield server, root
    server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda op, rest: op + rest,
              st.sampled_from([b"\x00\x01", b"\x00\x02", b"\x00\x04", b"\x00\x05"]), st.binary(max_size=60)),
    st.builds(lambda name, opts: packets.build_request(name, "octet", opts),
              st.sampled_from(["f.bin", "../f.bin", "\\f.bin", "nope", "/f.bin"]),
              st.lists(st.tuples(st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "x"]),
                                 st.text("0123456789-x", max_size=7)), max_size=4).map(tuple)),
), min_size=1, max_size=12))
def test_fuzzed_datagrams_never_break_the_server(fuzz_target: tuple[ServerThread, Path],
                                                 datagrams: list[bytes]) -> None:
    served, root = fuzz_target
    with Peer() as attacker, Peer() as client:
        client.request(served.port, "f.bin")
        packet, tid = client.receive()
        for datagram in datagrams:
            attacker.send(datagram, served.port)  # at the listening port
            attacker.send(datagram, tid)  # and at a running transfer
        client.sock.settimeout(5)
        got = bytearray()
        block = 1
        while True:
            assert isinstance(packet, Data)
            if packet.block == block:
                got += packet.payload
                block += 1
            client.send(packets.build_ack(packet.block), tid)
            if len(packet.payload) < 512 and packet.block == block - 1:
                break
            packet, _ = client.receive()
        assert bytes(got) == (root / "f.bin").read_bytes()
    assert not served.loop_errors


def test_command_line_server(tftp_root: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "netboot.tftp", "--root", str(tftp_root), "--listen", "127.0.0.1:0",
            "--listen", "[::1]:0", "--interface", "lo", "--tftp-max-transfers", "4"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert "listening on 127.0.0.1:" in lines[0] and "listening on [::1]:" in lines[1], lines
        for line, host in zip(lines, ("127.0.0.1", "[::1]"), strict=True):
            port = int(line.rsplit(":", 1)[1])
            out = tmp_path / "out"
            curl = [tool("curl"), "-sS", "--tftp-blksize", "1468", "-o", str(out), f"tftp://{host}:{port}/3m.bin"]
            result = subprocess.run(curl, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert out.read_bytes() == (tftp_root / "3m.bin").read_bytes()
            log = proc.stderr.readline()
            assert "'3m.bin'" in log and "complete" in log and "blksize=1468" in log, log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_command_line_rejects_bad_arguments(tmp_path: Path) -> None:
    for args in (["--root", str(tmp_path / "missing"), "--listen", "127.0.0.1:0"],
                 ["--root", str(tmp_path), "--listen", "::1:69"],
                 ["--root", str(tmp_path), "--listen", "127.0.0.1:0", "--tftp-max-windowsize", "0"]):
        result = subprocess.run([sys.executable, "-m", "netboot.tftp", *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert "error" in result.stderr


def test_a_worker_that_dies_is_reported_and_serving_goes_on(tftp_server: Callable[..., ServerThread],
                                                             peer: Peer, tftp_root: Path) -> None:
    served = tftp_server(config=TftpConfig(workers=1))
    peer.request(served.port, "3m.bin")
    assert isinstance(peer.receive()[0], Data)
    pool = served.server._pool  # type: ignore[union-attr]
    assert pool is not None
    process = pool.workers[0].process
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    (stats,) = served.wait_stats(1)
    assert stats.outcome == "cancelled" and stats.detail == "worker exited" and stats.filename == "3m.bin"
    with Peer() as again:  # a new worker took its place
        assert again.download(served.port, "small.bin") == (tftp_root / "small.bin").read_bytes()
