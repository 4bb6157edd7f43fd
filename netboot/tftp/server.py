"""The asyncio side of the TFTP server: sockets, timers, limits and one log line per transfer.

Everything protocol-shaped happens in `session.Session`; this module only moves datagrams. The listening
socket receives requests with recvmsg() to learn which local address and interface each was sent to;
every transfer then gets its own socket bound to that address with a fresh port (RFC 1350 §4: the server's
TID). Transfer sockets are plain non-blocking sockets under `loop.add_reader` rather than DatagramProtocols,
so that the same `transfer.Transfer` runs here and in the worker processes' epoll loops, without a
transport's layers on the per-packet path. With `workers`, file transfers run in worker processes
(`worker.py`) on the other cores, while requests, limits and logging stay here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from netboot.core.clients import client_of
from netboot.core.logbudget import LogBudget
from netboot.core.logtext import clip
from netboot.tftp import mtu, packets
from netboot.tftp.content import Content, ContentError, FileContent, Peer, Resolver
from netboot.tftp.packets import RRQ, WRQ, ErrorCode, PacketError
from netboot.tftp.session import Session, SessionConfig
from netboot.tftp.transfer import Transfer, TransferStats, format_peer
from netboot.tftp.worker import RemoteTransfer, WorkerPool

log = logging.getLogger("netboot.tftp")

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h; exported by the socket module only from 3.13
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_RECV_SIZE = 65536
_OVERLOAD_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class TftpConfig:
    session: SessionConfig = field(default_factory=SessionConfig)
    # A boot storm on a lossy network has most transfers waiting for a retransmission timer, so the limits
    # are sized for concurrency (dnsmasq's tftp-max is 50), while one address (a NAT, or a spoofed
    # flood) gets a share that bounds what it can make the server send.
    max_transfers: int = 512
    max_per_source: int = 32  # transfers at once from one address
    # Requests beyond those limits wait their turn, in order and round robin between addresses, and start
    # as soon as a transfer ends; at most this many wait, and one not repeated by its client for
    # `wait_timeout` seconds is forgotten (the client has given up).
    max_waiting: int = 1024
    wait_timeout: float = 30.0
    use_mtu: bool = True  # cap blksize to the MTU of the interface a request came in on
    workers: int = 0  # processes that run file transfers on other cores; 0 runs everything in this loop

    def __post_init__(self) -> None:
        if self.max_transfers < 1 or self.max_per_source < 1:
            raise ValueError("transfer limits must be at least 1")
        if self.max_waiting < 0 or self.wait_timeout <= 0:
            raise ValueError("the waiting queue cannot be negative and its timeout must be positive")
        if self.workers < 0:
            raise ValueError("the number of workers cannot be negative")


def _source(peer: Peer) -> str:
    return client_of(peer[0])


class _Waiting:
    """A request over the limits: the arguments of `_request`, and when its client last sent it."""

    __slots__ = ("request", "seen")

    def __init__(self, request: tuple[Any, ...], seen: float) -> None:
        self.request = request
        self.seen = seen


@dataclass
class _OverloadCounts:
    queued: int = 0
    started: int = 0
    dropped: int = 0
    stale: int = 0


class _Resolving:
    """A request whose content the resolver is still making: in the server's transfers (so that the limits count
    it and a retransmitted request is recognised) until it is ready."""

    def __init__(self, peer: Peer, datagram: bytes) -> None:
        self.peer = peer
        self.datagram = datagram
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.pending: tuple[Any, ...] | None = None  # the request that supersedes this one

    def cancel(self, reason: str, *, tell_peer: bool = True) -> None:
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()

    def supersede(self, request: tuple[Any, ...]) -> None:
        self.pending = request
        self.cancel("superseded")


class _LocalTransfer:
    """A transfer on this event loop. Its retransmission timer is lazy: sends only move `session.deadline`,
    and the loop timer re-arms when it fires early, so the per-packet path schedules nothing."""

    def __init__(self, server: TftpServer, transfer: Transfer, datagram: bytes) -> None:
        self.server = server
        self.transfer = transfer
        self.peer = transfer.peer
        self.datagram = datagram
        self.loop = server.loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    def start(self) -> None:
        self.loop.add_reader(self.transfer.sock.fileno(), self._readable)
        self.transfer.start()
        self._after()

    def _readable(self) -> None:
        self.transfer.readable()
        self._after()

    def _expired(self) -> None:
        self._timer = None
        self.transfer.expire()
        self._after()

    def _after(self) -> None:
        session = self.transfer.session
        if session.finished:
            self._close()
        elif session.deadline is not None and (self._timer is None or session.deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = session.deadline
            self._timer = self.loop.call_at(session.deadline, self._expired)

    def supersede(self, request: tuple[Any, ...]) -> None:
        self.transfer.supersede()
        self._after()
        self.server._request(*request)

    def cancel(self, reason: str, *, tell_peer: bool = True) -> None:
        self.transfer.cancel(reason, tell_peer=tell_peer)
        self._after()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self.transfer.sock.fileno())
        stats = self.transfer.stats()
        self.transfer.close()
        self.server._finished(self, stats)


class TftpServer:
    """A read-only TFTP server. Create with `start_tftp_server()`; `close()` ends it and its transfers."""

    def __init__(self, resolver: Resolver, config: TftpConfig | None = None,
                 on_transfer: Callable[[TransferStats], None] | None = None,
                 on_refused: Callable[[Peer, str, int, str], None] | None = None) -> None:
        self.resolver = resolver
        self.config = config or TftpConfig()
        self.on_transfer = on_transfer
        self.on_refused = on_refused  # (peer, filename, error code, message) of a request answered with an ERROR
        self.refused = 0  # requests answered with an ERROR, or dropped from the waiting queue
        self.loop = asyncio.get_running_loop()
        self.addresses: list[Peer] = []
        self._listeners: list[socket.socket] = []
        self._transfers: dict[Peer, _LocalTransfer | RemoteTransfer | _Resolving] = {}
        self._pool = WorkerPool(self.config.workers, self.config.session, self._finished) if (
            self.config.workers) else None
        self._per_source: collections.Counter[str] = collections.Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        # Requests over the limits, per address in arrival order, and the addresses in round-robin order.
        self._waiting: dict[str, dict[Peer, _Waiting]] = {}
        self._turns: collections.deque[str] = collections.deque()
        self._queued = 0
        self._admitting = False
        self._overload = _OverloadCounts()
        self._overload_logged = 0.0
        self._refusals = LogBudget(self.loop, log, "requests refused")
        self._closing = False

    # -- public ------------------------------------------------------------------------------------------

    @property
    def transfers(self) -> int:
        return len(self._transfers)

    @property
    def waiting(self) -> int:
        """Requests waiting for a transfer to end."""
        return self._queued

    def listen(self, host: str, port: int, interface: str | None = None) -> Peer:
        """Bind one more listening socket; returns its address (with the port chosen when `port` was 0).
        `interface` restricts it to requests arriving on that network interface (SO_BINDTODEVICE)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            if family == socket.AF_INET6:
                # "::" serves IPv4 too, as v4-mapped addresses; a specific IPv6 address serves only itself.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._listeners.append(sock)
        self.loop.add_reader(sock.fileno(), self._readable, sock)
        address = sock.getsockname()
        self.addresses.append(address)
        return address

    def close(self) -> None:
        """Stop listening and cancel every transfer (each peer gets an ERROR)."""
        self._closing = True
        for sock in self._listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        self._waiting.clear()
        self._turns.clear()
        self._queued = 0
        for transfer in list(self._transfers.values()):
            transfer.cancel("server shutting down")

    async def wait_closed(self) -> None:
        """Wait until every transfer has ended; after `close()` (which told each), the workers stop too."""
        if self._pool is None or not self._closing:
            await self._idle.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 10)  # the workers report the cancelled transfers
        await self._pool.close()

    async def __aenter__(self) -> TftpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    # -- requests ----------------------------------------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # a bounded batch, so that a flood of requests cannot starve the transfers
            try:
                data, ancillary, _flags, peer = sock.recvmsg(_RECV_SIZE, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            local, ifindex = self._destination(sock, ancillary)
            self._request(data, peer, local, ifindex, sock.family)

    @staticmethod
    def _destination(sock: socket.socket, ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int]:
        """The address the request was sent to and the interface it came in on (IP_PKTINFO)."""
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
                ifindex, _spec_dst, addr = _IN_PKTINFO.unpack_from(data)
                return socket.inet_ntop(socket.AF_INET, addr), ifindex
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO\
                    and len(data) >= _IN6_PKTINFO.size:
                addr, ifindex = _IN6_PKTINFO.unpack_from(data)
                return socket.inet_ntop(socket.AF_INET6, addr), ifindex
        return sock.getsockname()[0], 0

    def _request(self, data: bytes, peer: Peer, local: str, ifindex: int, family: int) -> None:
        if len(data) < 2 or data[0] != 0 or data[1] not in (RRQ, WRQ):
            return  # not a request: nothing on the listening port answers it (no reflection)
        key = peer[:2]
        current = self._transfers.get(key)
        if current is not None:
            if current.datagram != data:
                # The peer has moved on: its transfer ends, then this request is handled afresh (for a
                # worker's transfer, once the worker reports it ended).
                current.supersede((data, peer, local, ifindex, family))
            # Otherwise a retransmitted request, answered by the running transfer's own timer: a second
            # transfer must not start (py3tftp #19). A client that asks for the same file again from the
            # same port right after its final ACK may be taken for one, and retransmits once.
            return
        source = _source(peer)
        queue = self._waiting.get(source)
        if queue is not None and (waiting := queue.get(key)) is not None:
            # Waiting already: the client repeats its request (or has changed it); it keeps its place.
            waiting.request = (data, peer, local, ifindex, family)
            waiting.seen = self.loop.time()
            return
        try:
            request = packets.parse_request(data)
        except PacketError as e:
            self._refuse(family, local, ifindex, peer, ErrorCode.ILLEGAL_OPERATION, f"malformed request: {e}")
            return
        if request.is_write:
            self._refuse(family, local, ifindex, peer, ErrorCode.ACCESS_VIOLATION, "this server is read-only",
                         request.filename)
            return
        if len(self._transfers) >= self.config.max_transfers or (
                self._per_source[source] >= self.config.max_per_source):
            # Queued without an answer, to start when a transfer ends: the client, which retransmits its
            # request meanwhile, gets its file instead of an ERROR or minutes of timeouts, and a flood of
            # spoofed requests gets nothing back.
            self._enqueue(source, key, (data, peer, local, ifindex, family))
            return
        try:
            content = self.resolver(request.filename, peer)
        except ContentError as e:
            self._refuse(family, local, ifindex, peer, e.tftp_code, str(e), request.filename)
            return
        except Exception:
            log.exception("%s '%s': resolving the name failed", format_peer(peer), clip(request.filename))
            self._refuse(family, local, ifindex, peer, ErrorCode.NOT_DEFINED, "internal error",
                         request.filename)
            return
        if inspect.isawaitable(content):
            # Content still to be made (a generated file): the request holds its place under the limits, and
            # its transfer starts when the content is ready; its client's retransmissions meanwhile are ignored.
            resolving = _Resolving(peer, data)
            self._transfers[key] = resolving
            self._per_source[source] += 1
            self._idle.clear()
            resolving.task = self.loop.create_task(self._awaited(content))
            start = (data, request, peer, local, ifindex, family)
            resolving.task.add_done_callback(lambda task: self._resolved(resolving, task, start))
            return
        self._start(content, data, request, peer, local, ifindex, family)

    async def _awaited(self, awaitable: Awaitable[Content]) -> Content:
        async with asyncio.timeout(self.config.wait_timeout):
            return await awaitable

    def _resolved(self, resolving: _Resolving, task: asyncio.Task[Content], start: tuple[Any, ...]) -> None:
        """A request's content is ready (or failed, or was cancelled): start its transfer, or refuse it."""
        data, request, peer, local, ifindex, family = start
        content: Content | None = None
        refusal: tuple[int, str] | None = None
        if task.cancelled():
            pass  # superseded by another request, or the server is closing
        elif isinstance(error := task.exception(), TimeoutError):
            refusal = (ErrorCode.NOT_DEFINED, "the file took too long to prepare")
        elif isinstance(error, ContentError):
            refusal = (error.tftp_code, str(error))
        elif error is not None:
            log.error("%s '%s': resolving the name failed: %r", format_peer(peer), clip(request.filename), error)
            refusal = (ErrorCode.NOT_DEFINED, "internal error")
        else:
            content = task.result()
        self._release(resolving)
        if resolving.cancelled or self._closing:
            if content is not None:
                content.close()
        elif content is not None:
            self._start(content, data, request, peer, local, ifindex, family)
        elif refusal is not None:
            self._refuse(family, local, ifindex, peer, refusal[0], refusal[1], request.filename)
        if resolving.pending is not None and not self._closing:
            self._request(*resolving.pending)
        if self._turns:
            self._admit()

    def _release(self, transfer: _LocalTransfer | RemoteTransfer | _Resolving) -> None:
        """A transfer (or a request waiting for its content) ended: its place under the limits is free."""
        key = transfer.peer[:2]
        if self._transfers.get(key) is transfer:
            del self._transfers[key]
        source = _source(transfer.peer)
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]
        if not self._transfers:
            self._idle.set()

    def _start(self, content: Content, data: bytes, request: packets.Request, peer: Peer, local: str, ifindex: int,
               family: int) -> None:
        key, source = peer[:2], _source(peer)
        try:
            sock = self._transfer_socket(family, local, ifindex, peer)
        except OSError as e:
            content.close()
            log.warning("%s '%s': cannot open a transfer socket: %s", format_peer(peer), clip(request.filename), e)
            return
        limit = None
        if self.config.use_mtu and ifindex:
            ipv6 = family == socket.AF_INET6 and not local.startswith("::ffff:")
            limit = mtu.blksize_limit(mtu.interface_mtu(ifindex), ipv6)
        transfer: _LocalTransfer | RemoteTransfer | None = None
        if self._pool is not None and isinstance(content, FileContent):
            transfer = self._pool.start(data, request, content, sock, peer, limit)
        local = None
        if transfer is None:
            session = Session(request, content, self.config.session, now=self.loop.time(),
                              blksize_limit=limit)
            transfer = local = _LocalTransfer(self, Transfer(session, sock, peer), data)
        self._transfers[key] = transfer
        self._per_source[source] += 1
        self._idle.clear()
        if local is not None:
            local.start()

    def _transfer_socket(self, family: int, local: str, ifindex: int, peer: Peer) -> socket.socket:
        """A socket from the address the request was sent to, on a fresh port, connected to the peer."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_INET6:
                scope = ifindex if ipaddress.ip_address(local).is_link_local else 0
                sock.bind((local, 0, 0, scope))
            else:
                sock.bind((local, 0))
            sock.connect(peer)
        except OSError:
            sock.close()
            raise
        return sock

    def _refuse(self, family: int, local: str, ifindex: int, peer: Peer, code: int, message: str,
                filename: str | None = None) -> None:
        """An ERROR for a request, sent like a transfer's first packet: from a fresh port (RFC 1350 §4), and
        one log line, with what the client sent escaped and cut short (`filename`: None when the request was
        unreadable). `message` is the server's own: any client text in it was escaped where it was put in. A flood
        of requests to refuse, which anyone can send with any source address, is counted beyond a hundred lines a
        second."""
        self.refused += 1
        if filename is None:
            self._refusals.log("%s: refused, %s (ERROR %d)", format_peer(peer), message, code)
        else:
            self._refusals.log("%s '%s': refused, %s (ERROR %d)", format_peer(peer), clip(filename), message, code)
            if self.on_refused is not None:
                self.on_refused(peer, filename, code, message)
        try:
            with self._transfer_socket(family, local, ifindex, peer) as sock:
                sock.sendto(packets.build_error(code, message), peer)
        except OSError:
            pass

    # -- waiting requests ----------------------------------------------------------------------------------

    def _enqueue(self, source: str, key: Peer, request: tuple[Any, ...]) -> None:
        now = self.loop.time()
        counts = self._overload
        counts.queued += 1
        if self._queued >= self.config.max_waiting:
            self._forget_stale(now)
        if self._queued >= self.config.max_waiting:
            # Full: the address with the most requests waiting loses its oldest one, so that a flood from one
            # address (spoofed or not) cannot shut the others out; if that is this address, the new request
            # is the one dropped.
            longest = max(self._waiting, key=lambda s: len(self._waiting[s]), default=None)
            own = len(self._waiting.get(source, ()))
            counts.dropped += 1
            self.refused += 1
            if longest is None or own + 1 > len(self._waiting[longest]):
                self._log_overload(source)
                return
            self._pop_oldest(longest)
        queue = self._waiting.get(source)
        if queue is None:
            queue = self._waiting[source] = {}
            self._turns.append(source)
        queue[key] = _Waiting(request, now)
        self._queued += 1
        self._log_overload(source)

    def _pop_oldest(self, source: str) -> _Waiting:
        queue = self._waiting[source]
        key = next(iter(queue))
        entry = queue.pop(key)
        self._queued -= 1
        if not queue:
            del self._waiting[source]
            self._turns.remove(source)
        return entry

    def _forget_stale(self, now: float) -> None:
        limit = now - self.config.wait_timeout
        for source in list(self._waiting):
            queue = self._waiting[source]
            for key in [k for k, w in queue.items() if w.seen < limit]:
                del queue[key]
                self._queued -= 1
                self._overload.stale += 1
            if not queue:
                del self._waiting[source]
                self._turns.remove(source)

    def _admit(self) -> None:
        """Start waiting requests while there is room: one at a time from each address in turn, skipping
        the addresses at their own limit."""
        if self._admitting or self._closing:
            return  # the loop below is running further up the stack, and goes on after this start
        self._admitting = True
        try:
            turns, config = self._turns, self.config
            skipped = 0
            while turns and skipped < len(turns) and len(self._transfers) < config.max_transfers:
                source = turns[0]
                turns.rotate(-1)
                if self._per_source[source] >= config.max_per_source:
                    skipped += 1
                    continue
                skipped = 0
                entry = self._pop_oldest(source)
                if self.loop.time() - entry.seen > config.wait_timeout:
                    self._overload.stale += 1  # its client stopped asking long ago: it has given up
                    continue
                self._overload.started += 1
                self._request(*entry.request)
        finally:
            self._admitting = False

    def _log_overload(self, source: str) -> None:
        now = time.monotonic()
        if now - self._overload_logged < _OVERLOAD_LOG_INTERVAL:
            return
        counts = self._overload
        log.warning("transfer limits reached (%d in all, %d per address): %d requests waiting now; "
                    "since the last report %d queued, %d started after waiting, %d dropped with the queue "
                    "full, %d given up by their clients; the latest from %s",
                    self.config.max_transfers, self.config.max_per_source, self._queued, counts.queued,
                    counts.started, counts.dropped, counts.stale, source)
        self._overload_logged = now
        self._overload = _OverloadCounts()

    def _finished(self, transfer: _LocalTransfer | RemoteTransfer, stats: TransferStats) -> None:
        self._release(transfer)
        if self.on_transfer is not None:
            self.on_transfer(stats)  # which logs the transfer its own way (netboot serve adds MAC and profile)
        else:
            log.info("%s", stats.line())
        if isinstance(transfer, RemoteTransfer) and transfer.pending is not None:
            self._request(*transfer.pending)  # the request that superseded it
        if self._turns:
            self._admit()


async def start_tftp_server(host: str | Iterable[str], port: int, resolver: Resolver,
                            config: TftpConfig | None = None, *, interface: str | None = None,
                            on_transfer: Callable[[TransferStats], None] | None = None,
                            on_refused: Callable[[Peer, str, int, str], None] | None = None) -> TftpServer:
    """Serve `resolver`'s content over TFTP on `host` (one address or several; "::" is IPv6 and IPv4) and
    `port` (0 picks one: see `server.addresses`), optionally only on network `interface`.
    Returns the running server; `close()` stops it."""
    server = TftpServer(resolver, config, on_transfer, on_refused)
    try:
        if server._pool is not None:
            await server._pool.ready()
        for h in [host] if isinstance(host, str) else host:
            server.listen(h, port, interface)
    except (OSError, TimeoutError):
        server.close()
        await server.wait_closed()
        raise
    return server


