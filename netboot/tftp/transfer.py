"""One session on its own UDP socket: the bytes-moving half of a transfer, shared by every event loop.

The asyncio server and the worker processes' epoll loops both call `readable()` when the socket has data and
`expire()` when `session.deadline` has passed; this class reads, feeds the session and sends what it returns.
It owns the socket and the content, and closes both in `close()`.

The socket is connected to the peer, as tftpd-hpa's are: the kernel keeps the route and matches the peer's
datagrams to the socket without a lookup, and nothing but the peer's datagrams arrive, which took a sixth of
a worker's time per block. A stranger's datagram to the transfer's port is answered by the kernel with ICMP
port unreachable rather than RFC 1350's ERROR 5; the transfer goes on either way.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from dataclasses import dataclass
from time import monotonic

from netboot.core.logtext import clip
from netboot.tftp.content import Peer
from netboot.tftp.packets import ACK
from netboot.tftp.session import Session

# A peer only ever sends ACKs and ERRORs here; a longer datagram is truncated, which costs nothing.
_RECV_SIZE = 2048
_UDP_SEGMENT = 103  # linux/udp.h: UDP GSO, Linux 4.18
_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
_GSO_MAX_BYTES = 63 * 1024  # the segments travel as one UDP datagram until the kernel splits them


@dataclass(frozen=True)
class TransferStats:
    """What one finished transfer did; logged as one line and handed to `on_transfer`."""

    peer: str
    filename: str
    options: tuple[tuple[str, str], ...]
    size: int
    bytes_sent: int
    duration: float
    retransmissions: int
    outcome: str
    detail: str

    def line(self) -> str:
        options = " ".join(f"{k}={v}" for k, v in self.options) or "no options"
        detail = f" ({self.detail})" if self.detail else ""
        return (f"{self.peer} '{clip(self.filename)}' [{options}]: {self.outcome}{detail}, "
                f"{self.bytes_sent}/{self.size} bytes in {self.duration:.3f}s, "
                f"{self.retransmissions} retransmissions")


def format_peer(peer: Peer) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Transfer:
    __slots__ = ("gso", "peer", "session", "sock")

    def __init__(self, session: Session, sock: socket.socket, peer: Peer) -> None:
        self.session = session
        self.sock = sock
        self.peer = peer
        self.gso = True  # until the kernel refuses UDP GSO

    def start(self) -> None:
        self._send(self.session.start(monotonic()))

    def readable(self) -> bool:
        """One datagram: the loops poll level-triggered, so more waiting means another call, fairly
        interleaved with other transfers, and no failed read per packet in lock-step. False: none was
        waiting."""
        try:
            # The socket is connected to the peer (see the module's docstring): what arrives is from it.
            data = self.sock.recv(_RECV_SIZE)
        except OSError:  # nothing to read after all (EAGAIN), or a queued ICMP error: the timer copes
            return False
        self.received(data)
        return True

    def received(self, data: bytes) -> None:
        """A datagram the peer sent (read from the socket by `readable()`, or by the worker's native loop)."""
        if len(data) == 4 and data[1] == ACK and data[0] == 0:
            datagram = self.session.next_block((data[2] << 8) | data[3], monotonic())
            if datagram is not None:
                try:  # noqa: SIM105  (suppress() would cost more than the rest of this path)
                    self.sock.send(datagram)
                except OSError:
                    pass  # lost like any UDP loss: the retransmission timer resends it
                return
        self._send(self.session.receive(data, monotonic()))

    def expire(self) -> None:
        self._send(self.session.expire(monotonic()))

    def cancel(self, reason: str, *, tell_peer: bool = True) -> None:
        self._send(self.session.cancel(monotonic(), reason, tell_peer=tell_peer))

    def supersede(self) -> None:
        """The peer sent a different request from the same port: it has moved on. What it sent before is
        read first (its final ACK, or EDK2's ERROR 8 after a size probe, may still be queued) so that the
        outcome is right; otherwise the transfer ends quietly, since an ERROR could pass for the answer to
        the new request."""
        for _ in range(64):
            if self.session.finished:
                break
            try:
                data, addr = self.sock.recvfrom(_RECV_SIZE)
            except OSError:
                break
            if addr[:2] == self.peer[:2]:
                self._send(self.session.receive(data, monotonic()))
        self.cancel("superseded by a new request", tell_peer=False)

    def _send(self, datagrams: list[bytes]) -> None:
        if len(datagrams) > 1 and self.gso and self._send_segmented(datagrams):
            return
        for datagram in datagrams:
            try:
                self.sock.sendto(datagram, self.peer)
            except OSError:
                # A full socket buffer (EAGAIN) or an unreachable peer: the rest of the window is lost like
                # any UDP loss, and the retransmission timer resends it.
                return

    def _send_segmented(self, datagrams: list[bytes]) -> bool:
        """A window in as few system calls as UDP GSO allows: the kernel cuts the buffer into datagrams of
        the first one's size (DATA packets of one window are all full blocks but the file's last, which
        is last). Sending each DATA packet by itself cost most of the time of a window. False: not sent."""
        size = len(datagrams[0])
        per_call = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size)
        if per_call < 2:
            return False
        option = [(socket.SOL_UDP, _UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
        for i in range(0, len(datagrams), per_call):
            try:
                self.sock.sendmsg([b"".join(datagrams[i : i + per_call])], option, 0, self.peer)
            except BlockingIOError:
                return True  # lost like any UDP loss; the retransmission timer resends
            except OSError:
                # No UDP GSO here (old kernel, a device without checksum offload, a segment above the MTU):
                # this transfer sends datagram by datagram from now on.
                self.gso = False
                for datagram in datagrams[i:]:
                    self._send_to(datagram, self.peer)
                return True
        return True

    def _send_to(self, datagram: bytes, addr: Peer) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(datagram, addr)

    def close(self) -> None:
        self.sock.close()
        self.session.content.close()

    def stats(self) -> TransferStats:
        session = self.session
        return TransferStats(
            peer=format_peer(self.peer),
            filename=session.request.filename,
            options=session.negotiation.accepted,
            size=session.size,
            bytes_sent=session.bytes_sent,
            duration=(session.ended or monotonic()) - session.started,
            retransmissions=session.retransmissions,
            outcome=str(session.outcome),
            detail=session.detail,
        )
