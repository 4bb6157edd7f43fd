"""The worker's native lock-step loop (netboot/tftp/_lockstep.c), driven over real UDP sockets on loopback:
it must send exactly what `Session.next_block` would, and hand everything else back to Python."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import need

from netboot.tftp import packets
from netboot.tftp.content import FileContent
from netboot.tftp.packets import Request
from netboot.tftp.session import Session, SessionConfig

try:
    from netboot.tftp import _lockstep  # type: ignore[attr-defined]
except ImportError as e:
    _lockstep = None
    MISSING = str(e)


def test_the_native_loop_is_built() -> None:
    assert _lockstep is not None, (
        f"netboot/tftp/_lockstep.c is not compiled ({MISSING}): install gcc and python3-dev, then `make venv`")


class Pair:
    """A transfer socket connected to a peer socket, both on loopback, and the worker's epoll set."""

    def __init__(self) -> None:
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(5)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.connect(self.peer.getsockname())
        self.sock.setblocking(False)
        self.peer.connect(self.sock.getsockname())
        self.epoll = select.epoll()
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)

    def pump(self, may_spin: bool = False, wait: float = 0.2) -> list[tuple[int, bytes | None]]:
        assert _lockstep is not None
        return _lockstep.pump(self.epoll.fileno(), time.monotonic() + wait, may_spin)

    def close(self) -> None:
        assert _lockstep is not None
        _lockstep.take(self.sock.fileno())
        self.epoll.close()
        self.sock.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    if _lockstep is None:
        pytest.fail(f"the native loop is not built: {MISSING}")
    p = Pair()
    yield p
    p.close()


def file_of(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "f"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_the_expected_ack_gets_the_next_block_and_the_rest_is_handed_back(pair: Pair, tmp_path: Path) -> None:
    assert _lockstep is not None
    data = os.urandom(3 * 512 + 100)
    fd = file_of(tmp_path, data)
    try:
        _lockstep.add(pair.sock.fileno(), fd, 512, len(data), 0, 1)  # block 1 is out, its ACK awaited
        pair.peer.send(packets.build_ack(1))
        assert pair.pump() == []  # handled without Python; pump() returned at `until`
        assert pair.peer.recv(2048) == packets.build_data(2, data[512:1024])
        pair.peer.send(packets.build_ack(1))  # a duplicate: Python's to ignore
        assert pair.pump() == [(pair.sock.fileno(), packets.build_ack(1))]
        pair.peer.send(packets.build_ack(2))
        pair.pump()
        assert pair.peer.recv(2048) == packets.build_data(3, data[1024:1536])
        pair.peer.send(packets.build_ack(3))
        pair.pump()
        assert pair.peer.recv(2048) == packets.build_data(4, data[1536:])
        pair.peer.send(packets.build_ack(4))  # the final ACK: Python ends the transfer
        assert pair.pump() == [(pair.sock.fileno(), packets.build_ack(4))]
        acked, sent, progress = _lockstep.take(pair.sock.fileno())
        assert (acked, sent) == (3, 4) and 0 < progress <= time.monotonic()
        assert _lockstep.take(pair.sock.fileno()) is None
    finally:
        os.close(fd)


def test_errors_unregistered_descriptors_and_failed_reads_go_to_python(pair: Pair, tmp_path: Path) -> None:
    assert _lockstep is not None
    fd = file_of(tmp_path, b"x" * 2000)
    try:
        pair.peer.send(b"\0\4\0\1")  # not registered yet: the descriptor is Python's, datagram unread
        assert pair.pump() == [(pair.sock.fileno(), None)]
        assert pair.sock.recv(100) == b"\0\4\0\1"
        _lockstep.add(pair.sock.fileno(), fd, 512, 2000, 0, 1)
        error = packets.build_error(packets.ErrorCode.NOT_DEFINED, "stop")
        pair.peer.send(error)
        assert pair.pump() == [(pair.sock.fileno(), error)]
        os.close(fd)  # the next read fails: the ACK goes to Python, which reports the read error
        pair.peer.send(packets.build_ack(1))
        assert pair.pump() == [(pair.sock.fileno(), packets.build_ack(1))]
        assert _lockstep.take(pair.sock.fileno())[:2] == (0, 1)
    finally:
        os.closerange(fd, fd + 1)


def test_pump_waits_until_its_deadline(pair: Pair) -> None:
    start = time.monotonic()
    assert pair.pump(wait=0.3) == []
    assert time.monotonic() - start >= 0.29


def test_bad_registrations_are_refused() -> None:
    if _lockstep is None:
        pytest.fail(f"the native loop is not built: {MISSING}")
    for args in ((5, 6, 512, 100, 0, 2), (5, 6, 4, 100, 0, 1), (5, 6, 70000, 100, 0, 1), (-1, 6, 512, 100, 0, 1)):
        with pytest.raises(ValueError, match="lock-step"):
            _lockstep.add(*args)


SOURCE = Path(__file__).resolve().parents[2] / "netboot/tftp/_lockstep.c"
HOSTILE = Path(__file__).with_name("lockstep_hostile.py")
NOT_LOCKSTEP = "ValueError: not a lock-step transfer"
EBADF = "OSError: [Errno 9] not a lock-step transfer"


def test_hostile_arguments_are_refused_with_no_undefined_behaviour(tmp_path: Path) -> None:
    """The loop built as hatch_build.py builds it, with UBSan aborting at the first undefined behaviour, and
    called with descriptors past INT_MAX, sizes and block numbers that would wrap: each is a clear exception,
    and transfers at offsets past 2^32 and at the end of off_t send the right blocks, with no UBSan report."""
    target = tmp_path / ("_lockstep" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([need("gcc"), "-O1", "-g", "-Wall", "-fsanitize=undefined,float-cast-overflow",
                    "-fno-sanitize-recover=all", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                    SOURCE, "-o", target, "-lm"], check=True)
    proc = subprocess.run([sys.executable, HOSTILE, tmp_path], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert proc.returncode == 0 and "runtime error" not in proc.stderr, proc.stdout + proc.stderr
    between = "is not between 0 and 2147483647"
    assert dict(line.split(": ", 1) for line in proc.stdout.splitlines()) == {
        "add sock_fd INT_MAX": f"{EBADF}: sock_fd 2147483647 is not an open descriptor (Bad file descriptor)",
        "add sock_fd 2^31": f"{NOT_LOCKSTEP}: sock_fd 2147483648 {between}",
        "add sock_fd -1": f"{NOT_LOCKSTEP}: sock_fd -1 {between}",
        "add sock_fd 2^100": f"{NOT_LOCKSTEP}: sock_fd {2**100} {between}",
        "add sock_fd closed": f"{EBADF}: sock_fd 1000 is not an open descriptor (Bad file descriptor)",
        "add file_fd 2^31": f"{NOT_LOCKSTEP}: file_fd 2147483648 {between}",
        "add file_fd -2^31": f"{NOT_LOCKSTEP}: file_fd -2147483648 {between}",
        "add file_fd closed": f"{EBADF}: file_fd 1000 is not an open descriptor (Bad file descriptor)",
        "add blksize 2^32 + 512": f"{NOT_LOCKSTEP}: blksize 4294967808 is not between 8 and 65464",
        "add blksize -1": f"{NOT_LOCKSTEP}: blksize -1 is not between 8 and 65464",
        "add size -1": f"{NOT_LOCKSTEP}: size -1 is not between 0 and {2**63 - 1}",
        "add size 2^64 - 1": f"{NOT_LOCKSTEP}: size {2**64 - 1} is not between 0 and {2**63 - 1}",
        "add size 2^63": f"{NOT_LOCKSTEP}: size {2**63} is not between 0 and {2**63 - 1}",
        "add acked 2^63 - 1": f"{NOT_LOCKSTEP}: acked {2**63 - 1} is not between -1 and {2**63 // 512}",
        "add acked -2^63": f"{NOT_LOCKSTEP}: acked {-(2**63)} is not between -1 and 1",
        "add acked past the end": f"{NOT_LOCKSTEP}: acked 5 is not between -1 and 1",
        "add sent not acked + 1": f"{NOT_LOCKSTEP}: sent 2 is not acked 0 + 1",
        # Any other int names a descriptor never registered: nothing to take.
        **{f"take {fd}": "ok None" for fd in (2**31 - 1, 2**31, -1, -(2**63) - 1, 2**100)},
        "pump epoll_fd 2147483648": f"ValueError: pump: epoll_fd 2147483648 {between}",
        "pump epoll_fd -1": f"ValueError: pump: epoll_fd -1 {between}",
        "pump until nan": "ValueError: pump: until is NaN (a time.monotonic() value, or negative: no limit)",
        "transfer past 2^32": f"ok ({2**24 + 1}, {2**24 + 2})",
        "transfer at the end of off_t": f"ok ({2**60 - 2}, {2**60 - 1})",
    }


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 5000), blksize=st.sampled_from([8, 100, 512, 1468]), oack=st.booleans(),
       spin=st.booleans())
def test_a_whole_transfer_agrees_with_the_session(tmp_path_factory: pytest.TempPathFactory, size: int,
                                                   blksize: int, oack: bool, spin: bool) -> None:
    """A client acknowledging every block: the native loop serves all but the final ACK, and the bytes, the
    block numbers and the session's state after `advanced` are what the session alone gives."""
    if _lockstep is None:
        pytest.fail(f"the native loop is not built: {MISSING}")
    data = os.urandom(size)
    fd = file_of(tmp_path_factory.mktemp("native"), data)
    options = (("blksize", str(blksize)),) if oack else ()
    request = Request(packets.RRQ, "f", "octet", options)
    session = Session(request, FileContent(fd, size), SessionConfig(), now=time.monotonic())
    reference = Session(request, FileContent(os.dup(fd), size), SessionConfig(), now=0.0)
    pair = Pair()
    try:
        first = session.start(time.monotonic())
        expected = reference.start(0.0)
        assert first == expected
        pair.sock.send(first[0])
        state = session.lockstep()
        assert state is not None
        _lockstep.add(pair.sock.fileno(), fd, session.blksize, size, *state)
        received: list[bytes] = []
        while True:
            datagram = pair.peer.recv(70000)
            received.append(datagram)
            packet = packets.parse(datagram)
            block = packet.block if isinstance(packet, packets.Data) else 0
            pair.peer.send(packets.build_ack(block))
            if isinstance(packet, packets.Data) and len(packet.payload) < session.blksize:
                break
            expected += reference.receive(packets.build_ack(block), 0.0)
            assert pair.pump(may_spin=spin, wait=0) == []  # loopback: the ACK is queued already
        handed_back = pair.pump(may_spin=spin, wait=0)
        assert handed_back == [(pair.sock.fileno(), packets.build_ack(block))]
        session.advanced(*_lockstep.take(pair.sock.fileno()))
        assert session.receive(handed_back[0][1], time.monotonic()) == []
        assert received == expected
        payload = b"".join(p.payload for p in map(packets.parse, received) if isinstance(p, packets.Data))
        assert payload == data and session.finished and session.bytes_sent == size
    finally:
        pair.close()
        session.content.close()
        reference.content.close()
