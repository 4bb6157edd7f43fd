"""Hostile calls into a build of netboot/tftp/_lockstep.c, run in a process of its own (the build may be one
with UBSan, which aborts the process on undefined behaviour).

    python lockstep_hostile.py DIR

Imports `_lockstep` from DIR, makes each call and prints one line per call: "NAME: ok [RESULT]" or
"NAME: EXCEPTION: MESSAGE". Besides the refusals, two transfers run over loopback: one at offsets past 2^32
(a sparse file of 8 GiB), one registered at the end of what off_t holds.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, sys.argv[1])
import _lockstep

INT_MAX, OFF_MAX = 2**31 - 1, 2**63 - 1


def ack(block: int) -> bytes:
    return struct.pack("!HH", 4, block % 65536)


def call(name: str, f: Callable[[], object]) -> None:
    try:
        result = f()
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}", flush=True)
    else:
        print(f"{name}: ok {result!r}", flush=True)


def main() -> None:
    assert _lockstep.__file__.startswith(sys.argv[1]), _lockstep.__file__
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(peer.getsockname())
    sock.setblocking(False)
    peer.connect(sock.getsockname())
    epoll = select.epoll()
    epoll.register(sock.fileno(), select.EPOLLIN)
    s = sock.fileno()

    def pump() -> list[tuple[int, bytes | None]]:
        return _lockstep.pump(epoll.fileno(), time.monotonic() + 0.5, False)

    with tempfile.TemporaryDirectory() as d:
        # Block S + 1 starts at S * 512 = 2^33: past what 32 bits hold, in a sparse file.
        big = 2**33
        f = os.open(os.path.join(d, "sparse"), os.O_RDWR | os.O_CREAT)
        os.ftruncate(f, big + 1000)
        os.pwrite(f, b"A" * 512 + b"B" * 488, big)
        hostile = {
            "sock_fd INT_MAX": (INT_MAX, f, 512, 100, 0, 1),
            "sock_fd 2^31": (INT_MAX + 1, f, 512, 100, 0, 1),
            "sock_fd -1": (-1, f, 512, 100, 0, 1),
            "sock_fd 2^100": (2**100, f, 512, 100, 0, 1),
            "sock_fd closed": (1000, f, 512, 100, 0, 1),
            "file_fd 2^31": (s, INT_MAX + 1, 512, 100, 0, 1),
            "file_fd -2^31": (s, -(2**31), 512, 100, 0, 1),
            "file_fd closed": (s, 1000, 512, 100, 0, 1),
            "blksize 2^32 + 512": (s, f, 2**32 + 512, 100, 0, 1),
            "blksize -1": (s, f, -1, 100, 0, 1),
            "size -1": (s, f, 512, -1, 0, 1),
            "size 2^64 - 1": (s, f, 512, 2**64 - 1, 0, 1),
            "size 2^63": (s, f, 512, 2**63, 0, 1),
            "acked 2^63 - 1": (s, f, 512, OFF_MAX, OFF_MAX, -(2**63)),
            "acked -2^63": (s, f, 512, 100, -(2**63), OFF_MAX),
            "acked past the end": (s, f, 512, 100, 5, 6),
            "sent not acked + 1": (s, f, 512, 100, 0, 2),
        }
        for name, args in hostile.items():
            call(f"add {name}", lambda args=args: _lockstep.add(*args))
        for fd in (INT_MAX, INT_MAX + 1, -1, -(2**63) - 1, 2**100):
            call(f"take {fd}", lambda fd=fd: _lockstep.take(fd))
        for fd in (INT_MAX + 1, -1):
            call(f"pump epoll_fd {fd}", lambda fd=fd: _lockstep.pump(fd, time.monotonic(), False))
        call("pump until nan", lambda: _lockstep.pump(epoll.fileno(), float("nan"), False))

        def beyond_4g() -> object:
            sent = big // 512
            _lockstep.add(s, f, 512, big + 1000, sent - 1, sent)
            peer.send(ack(sent))
            assert pump() == []
            full = peer.recv(2048)
            assert full == b"\0\3\0\1" + b"A" * 512, full[:8]  # block 2^24 + 1, numbered modulo 65536
            peer.send(ack(sent + 1))
            assert pump() == []
            final = peer.recv(2048)
            assert final == b"\0\3\0\2" + b"B" * 488, final[:8]
            peer.send(ack(sent + 2))  # the final ACK: Python's
            assert pump() == [(s, ack(sent + 2))]
            return _lockstep.take(s)[:2]

        call("transfer past 2^32", beyond_4g)

        def end_of_off_t() -> object:
            last = OFF_MAX // 8 + 1
            _lockstep.add(s, f, 8, OFF_MAX, last - 2, last - 1)
            peer.send(ack(last - 1))
            assert pump() == [(s, ack(last - 1))]  # the read past the file's end fails: handed back
            return _lockstep.take(s)[:2]

        call("transfer at the end of off_t", end_of_off_t)
        os.close(f)


if __name__ == "__main__":
    main()
