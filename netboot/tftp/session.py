"""One read transfer as a state machine, without sockets or clocks.

The caller feeds `start()`, each datagram from the peer (`receive()`) and timer expiries (`expire()`), passing
the current time; each call returns the datagrams to send to the peer, and `deadline` says when `expire()` is
due next (None once `finished`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from netboot.core.logtext import clip
from netboot.tftp import packets
from netboot.tftp.content import Content
from netboot.tftp.packets import ACK, DATA, ERROR, MAX_BLKSIZE, MIN_BLKSIZE, ErrorCode, Request

MAX_WINDOWSIZE = 65535  # RFC 7440
_DATA_HEADER = struct.Struct("!HH")


@dataclass(frozen=True)
class SessionConfig:
    max_blksize: int = MAX_BLKSIZE
    max_windowsize: int = 64  # dnsmasq caps at 32; more than the default socket buffers hold gains nothing
    timeout: float = 1.0  # first retransmission (tftp-hpa: 1 s), unless the client negotiates `timeout`
    max_timeout: float = 8.0  # exponential backoff stops growing here
    retries: int = 5  # retransmissions of one packet before giving up
    idle_timeout: float = 60.0  # a transfer without progress for this long is dropped

    def __post_init__(self) -> None:
        if not MIN_BLKSIZE <= self.max_blksize <= MAX_BLKSIZE:
            raise ValueError(f"max blksize must be {MIN_BLKSIZE}-{MAX_BLKSIZE}")
        if not 1 <= self.max_windowsize <= MAX_WINDOWSIZE:
            raise ValueError(f"max windowsize must be 1-{MAX_WINDOWSIZE}")
        if not (0 < self.timeout <= self.max_timeout and self.retries >= 0 and self.idle_timeout > 0):
            raise ValueError("timeouts must be positive (timeout <= max timeout) and retries >= 0")


class Outcome(StrEnum):
    COMPLETE = "complete"
    SIZE_PROBE = "size probe"  # EDK2 asks for tsize, then refuses the OACK with ERROR 8: a normal event
    CLIENT_ABORT = "aborted by client"
    TIMEOUT = "timed out"
    READ_ERROR = "read error"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Negotiation:
    blksize: int
    windowsize: int
    timeout: float | None
    accepted: tuple[tuple[str, str], ...]  # what the OACK carries, in request order


def _number(value: str, low: int, high: int | None = None) -> int | None:
    if not (value.isascii() and value.isdigit()) or len(value) > 10:
        return None
    n = int(value)
    return n if n >= low and (high is None or n <= high) else None


def negotiate(request: Request, size: int | None, config: SessionConfig, blksize_limit: int | None = None
              ) -> Negotiation:
    """Options the server accepts, clamped to its limits; invalid and unknown ones are ignored (RFC 2347)."""
    blksize, windowsize, timeout = packets.DEFAULT_BLKSIZE, 1, None
    accepted: list[tuple[str, str]] = []
    for name, value in request.options:
        match name:
            case "blksize" if (n := _number(value, MIN_BLKSIZE)) is not None:
                # RFC 2348: the reply may be smaller than asked, never larger; beyond 65464 is clamped.
                blksize = min(n, MAX_BLKSIZE, config.max_blksize, blksize_limit or MAX_BLKSIZE)
                accepted.append((name, str(blksize)))
            case "tsize" if size is not None and request.mode == "octet":
                # RFC 2349: the netascii size is unknown before conversion, so tsize is left out there.
                accepted.append((name, str(size)))
            case "timeout" if (n := _number(value, 1, 255)) is not None:
                timeout = float(n)
                accepted.append((name, str(n)))  # RFC 2349: echoed unchanged
            case "windowsize" if (n := _number(value, 1, MAX_WINDOWSIZE)) is not None:
                windowsize = min(n, config.max_windowsize)
                accepted.append((name, str(windowsize)))
    return Negotiation(blksize, windowsize, timeout, tuple(accepted))


class _ReadFailed(Exception):
    pass


class _Netascii:
    """Netascii blocks, converted on the fly (RFC 764: LF -> CR LF, CR -> CR NUL), kept until acknowledged."""

    _CHUNK = 64 * 1024

    def __init__(self, content: Content, blksize: int) -> None:
        self._content = content
        self._blksize = blksize
        self._offset = 0
        self._buffer = b""
        self._blocks: dict[int, bytes] = {}
        self._produced = 0

    def block(self, n: int) -> bytes:
        if n <= self._produced:
            return self._blocks[n]
        assert n == self._produced + 1, "netascii blocks are produced in order"
        while len(self._buffer) < self._blksize and self._offset < self._content.size:
            raw = self._content.read(self._offset, self._CHUNK)
            if not raw:
                raise _ReadFailed("file shrank while being sent")
            self._offset += len(raw)
            self._buffer += raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
        payload, self._buffer = self._buffer[: self._blksize], self._buffer[self._blksize :]
        self._blocks[n] = payload
        self._produced = n
        return payload

    def forget_through(self, n: int) -> None:
        for k in [k for k in self._blocks if k <= n]:
            del self._blocks[k]


class Session:
    """A read transfer of `content` to one peer: OACK (when options were accepted), then windows of DATA.

    Block numbers are kept absolute and only wrapped to 16 bits on the wire, so files beyond 65535 blocks
    roll over to block 0 (tftp-hpa, dnsmasq and iPXE all expect 0, not 1).
    """

    def __init__(self, request: Request, content: Content, config: SessionConfig, *, now: float,
                 blksize_limit: int | None = None) -> None:
        self.request = request
        self.content = content
        self.config = config
        self.size = content.size
        self.negotiation = negotiate(request, self.size, config, blksize_limit)
        self.blksize = self.negotiation.blksize
        self.windowsize = self.negotiation.windowsize
        self._base_rto = self.negotiation.timeout or config.timeout
        # RFC 2349: a negotiated timeout is the interval between retransmissions, kept as it is; without one,
        # the server's own timeout doubles on each retry. (Under random loss, as in a storm on a lossy
        # network, doubling left the unluckiest client of 200 waiting seconds longer than the interval it
        # asked for.)
        self._max_rto = self._base_rto if self.negotiation.timeout else max(self._base_rto, config.max_timeout)
        self._rto = self._base_rto
        self._netascii = _Netascii(content, self.blksize) if request.mode == "netascii" else None
        self._last: int | None = None if self._netascii else self.size // self.blksize + 1
        self._last_length = 0
        # The OACK counts as block 0: -1 acknowledged means "waiting for ACK 0" (RFC 2347).
        self._acked = 0
        self._sent = 0
        self._retries = 0
        self._progress = now
        self.started = now
        self.ended: float | None = None
        self.deadline: float | None = None
        self.finished = False
        self.outcome: Outcome | None = None
        self.detail = ""
        self.retransmissions = 0
        self.ignored = 0  # duplicate, stale or malformed packets from the peer

    # -- events ------------------------------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        if self.negotiation.accepted:
            self._acked = -1
            self.deadline = now + self._rto
            return [packets.build_oack(self.negotiation.accepted)]
        return self._send(now)

    def receive(self, datagram: bytes, now: float) -> list[bytes]:
        if self.finished:
            return []
        if len(datagram) >= 4 and datagram[0] == 0:
            if datagram[1] == ACK:
                return self._ack((datagram[2] << 8) | datagram[3], now)
            if datagram[1] == ERROR:
                error = packets.parse(datagram)
                assert isinstance(error, packets.Error)
                probe = self._acked == -1 and error.code == ErrorCode.OPTION_REFUSED
                self._finish(now, Outcome.SIZE_PROBE if probe else Outcome.CLIENT_ABORT,
                             f"ERROR {error.code} '{clip(error.message)}'")
                return []
        # Anything else from the peer (a DATA, a repeated request, noise) is ignored: the transfer goes on.
        self.ignored += 1
        return []

    def next_block(self, block: int, now: float) -> bytes | None:
        """The lock-step fast path (windowsize 1, octet): for the ACK of the block just sent, the next DATA; None
        for anything else, which `receive()` then handles. Most of a lock-step transfer's datagrams come
        through here, so it does in a few lines what `_ack` and `_send` do in general."""
        acked = self._acked
        sent = acked + 1
        if self._sent != sent or block != sent & 0xFFFF or self.finished or self._netascii is not None or (
                self.windowsize != 1):
            return None
        last = self._last
        assert last is not None
        if sent >= last:
            return None  # the final ACK: `receive()` finishes the transfer
        self._acked = sent
        self._retries = 0
        self._rto = self._base_rto
        self._progress = now
        blksize = self.blksize
        offset = sent * blksize
        want = blksize if sent + 1 < last else self.size - offset
        try:
            payload = self.content.read(offset, want)
        except OSError as e:
            self._finish(now, Outcome.READ_ERROR, str(e))
            return packets.build_error(ErrorCode.NOT_DEFINED, "read error")
        if len(payload) != want:
            self._finish(now, Outcome.READ_ERROR, "file changed size while being sent")
            return packets.build_error(ErrorCode.NOT_DEFINED, "read error")
        self._sent = sent + 1
        self.deadline = now + self._rto
        return _DATA_HEADER.pack(DATA, (sent + 1) & 0xFFFF) + payload

    def lockstep(self) -> tuple[int, int] | None:
        """(acked, sent) while the next ACK is for `next_block` (the state a native loop may take over,
        see `advanced`); None otherwise."""
        if self.finished or self._netascii is not None or self.windowsize != 1 or self._sent != self._acked + 1:
            return None
        return self._acked, self._sent

    def advanced(self, acked: int, sent: int, progress: float) -> None:
        """What a native loop did meanwhile, exactly as `next_block` would have: blocks up to `sent` went out,
        the last at `progress`."""
        if sent == self._sent:
            return
        self._acked, self._sent = acked, sent
        self._retries = 0
        self._rto = self._base_rto
        self._progress = progress
        self.deadline = progress + self._rto

    def expire(self, now: float) -> list[bytes]:
        """The retransmission timer: due at `deadline`, which only a send moves (RFC 1123 §4.2.3.1)."""
        if self.finished or self.deadline is None or now + 1e-3 < self.deadline:
            return []
        if self._retries >= self.config.retries or now - self._progress >= self.config.idle_timeout:
            self._finish(now, Outcome.TIMEOUT, f"no answer after {self._retries} retransmissions")
            return []
        self._retries += 1
        self._rto = min(self._rto * 2, self._max_rto)
        if self._acked == -1:
            self.retransmissions += 1
            self.deadline = now + self._rto
            return [packets.build_oack(self.negotiation.accepted)]
        return self._send(now)

    def cancel(self, now: float, reason: str, *, tell_peer: bool = True) -> list[bytes]:
        if self.finished:
            return []
        self._finish(now, Outcome.CANCELLED, reason)
        return [packets.build_error(ErrorCode.NOT_DEFINED, reason)] if tell_peer else []

    # -- internals ---------------------------------------------------------------------------------------

    def _ack(self, block: int, now: float) -> list[bytes]:
        delta = (block - self._acked) & 0xFFFF
        if delta == 0 or delta > self._sent - self._acked:
            # RFC 1123 §4.2.3.1 (Sorcerer's Apprentice): a duplicate ACK, or one for a block never sent,
            # triggers nothing and leaves the retransmission timer alone (tftpy #41).
            self.ignored += 1
            return []
        self._acked += delta
        self._retries = 0
        self._rto = self._base_rto
        self._progress = now
        if self._acked == self._last:
            self._finish(now, Outcome.COMPLETE)
            return []
        if self._netascii:
            self._netascii.forget_through(self._acked)
        return self._send(now)

    def _send(self, now: float) -> list[bytes]:
        """DATA from the block after the last acknowledged one, a window's worth (RFC 7440 §4)."""
        first = self._acked + 1
        try:
            payloads = self._payloads(first)
        except (OSError, _ReadFailed) as e:
            self._finish(now, Outcome.READ_ERROR, str(e))
            return [packets.build_error(ErrorCode.NOT_DEFINED, "read error")]
        last_sent = first + len(payloads) - 1
        if self._sent >= first:
            self.retransmissions += min(self._sent, last_sent) - first + 1
        if last_sent > self._sent:
            self._sent = last_sent
        self.deadline = now + self._rto
        build = packets.build_data
        return [build(n, payload) for n, payload in enumerate(payloads, first)]

    def _payloads(self, first: int) -> list[bytes]:
        """Blocks `first`... of the window, up to the last block; one read for all of them."""
        blksize = self.blksize
        if self._netascii:
            out = []
            for n in range(first, first + self.windowsize):
                payload = self._netascii.block(n)
                out.append(payload)
                if len(payload) < blksize:
                    self._last, self._last_length = n, len(payload)
                    break
            return out
        assert self._last is not None
        count = min(self.windowsize, self._last - first + 1)
        offset = (first - 1) * blksize
        data = self.content.read(offset, count * blksize)
        if len(data) != min(count * blksize, self.size - offset):
            raise _ReadFailed("file changed size while being sent")
        if count == 1:
            return [data]
        return [data[i : i + blksize] for i in range(0, count * blksize, blksize)]

    def _finish(self, now: float, outcome: Outcome, detail: str = "") -> None:
        self.finished = True
        self.outcome = outcome
        self.detail = detail
        self.ended = now
        self.deadline = None

    @property
    def bytes_sent(self) -> int:
        """Payload bytes the peer acknowledged."""
        if self._acked <= 0:
            return 0
        if self._acked == self._last:
            last_length = self._last_length if self._netascii else self.size % self.blksize
            return (self._last - 1) * self.blksize + last_length
        return self._acked * self.blksize
