"""Transfer worker processes: they run file transfers the server has already accepted, on other CPU cores.

The server (one asyncio process, embeddable) still receives every request, applies the limits, resolves
and opens the file, and binds the transfer socket; it then passes both descriptors over a Unix socket
(SCM_RIGHTS) to the least busy worker, which drives the `Transfer` in a plain epoll loop and sends back
its `TransferStats` when it ends. Only the block-moving half runs in the worker, so names, limits and
logging stay in one place, and a worker needs nothing but descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from time import monotonic
from typing import Any

import netboot
from netboot.core.run import dies_with_us
from netboot.tftp.content import FileContent, Peer
from netboot.tftp.packets import ErrorCode, Request, build_error
from netboot.tftp.session import Session, SessionConfig
from netboot.tftp.transfer import Transfer, TransferStats, format_peer

try:  # compiled when the package is installed; without a C compiler, the worker runs in Python alone
    from netboot.tftp import _lockstep  # type: ignore[attr-defined]
except ImportError:
    _lockstep = None
if os.environ.get("NETBOOT_TFTP_PURE_PYTHON"):
    _lockstep = None  # the tests run the worker both ways

log = logging.getLogger("netboot.tftp")

# Messages carry only bounded fields: a request's mode and its options (which the packet parser bounds, see
# packets.MAX_OPTIONS), never its file name, which the worker does not need; stats come back without it too.
# Both ends still check: a message too long for this buffer is never sent, and one received truncated (which
# would otherwise be unpickled half) ends the channel.
_MESSAGE_SIZE = 16384
_REPLACE_INTERVAL = 1.0  # a worker that dies is replaced, but not more often than this (one crashing at start)
# Not `-m netboot.tftp.worker`: the package imports this module first, which runpy warns about.
_WORKER_MAIN = "import sys; from netboot.tftp.worker import main; sys.exit(main(sys.argv[1:]))"


class ChannelError(OSError):
    """A message that does not fit the channel, or came truncated."""


def _send(control: socket.socket, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
    data = pickle.dumps(message)
    if len(data) > _MESSAGE_SIZE:
        raise ChannelError(f"a {message[0]!r} message of {len(data)} bytes does not fit the channel")
    socket.send_fds(control, [data], fds or [])


def _receive(control: socket.socket, max_fds: int = 0) -> tuple[bytes, list[int]]:
    """One message and the descriptors passed with it; b"" at EOF. ChannelError when it came truncated (its
    descriptors are closed)."""
    data, fds, flags, _addr = socket.recv_fds(control, _MESSAGE_SIZE, max_fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ChannelError(f"a message truncated at {len(data)} bytes")
    return data, fds


# -- the server's side -------------------------------------------------------------------------------------

class RemoteTransfer:
    """The server's handle on a transfer running in a worker (same interface as the in-process one)."""

    def __init__(self, worker: Worker, tid: int, peer: Peer, datagram: bytes, filename: str,
                 sock: socket.socket) -> None:
        self.worker = worker
        self.tid = tid
        self.peer = peer
        self.datagram = datagram
        self.filename = filename
        # The server's copy of the transfer's socket: should the worker die, the client is told from its
        # transfer's port at once, instead of retransmitting into the void until it gives up.
        self.sock = sock
        self.pending: tuple[Any, ...] | None = None  # the request that supersedes this transfer

    def interrupted(self) -> TransferStats:
        """Its worker died: tell the client, and what it did."""
        with contextlib.suppress(OSError):
            self.sock.send(build_error(ErrorCode.NOT_DEFINED, "transfer interrupted, ask again"))
        self.sock.close()
        return TransferStats(format_peer(self.peer), self.filename, (), 0, 0, 0.0, 0, "cancelled", "worker exited")

    def cancel(self, reason: str, *, tell_peer: bool = True) -> None:
        self.worker.tell(("cancel", self.tid, reason, tell_peer))

    def supersede(self, request: tuple[Any, ...]) -> None:
        """The worker ends the transfer (`Transfer.supersede`); `request` is handled when it reports so."""
        if self.pending is None:
            self.worker.tell(("supersede", self.tid))
        self.pending = request


class Worker:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        # The worker imports netboot from wherever this process did, installed or not.
        source = os.path.dirname(os.path.dirname(os.path.abspath(netboot.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        try:
            argv = [sys.executable, "-c", _WORKER_MAIN, str(child.fileno())]
            # A worker ends with the server, even one killed by SIGKILL (which closes the control socket too).
            self.process = subprocess.Popen(argv, pass_fds=[child.fileno()], env=env,
                                            stdin=subprocess.DEVNULL, preexec_fn=dies_with_us())
        finally:
            child.close()
        self.control.setblocking(False)
        self.transfers: dict[int, RemoteTransfer] = {}
        self.ready: asyncio.Future[None] = pool.loop.create_future()
        pool.loop.add_reader(self.control.fileno(), self._readable)

    def tell(self, message: tuple[Any, ...], fds: list[int] | None = None) -> bool:
        try:
            _send(self.control, message, fds)
        except ChannelError as e:
            log.error("TFTP worker %d: %s", self.process.pid, e)  # a bug: refused, and the worker goes on
            return False
        except OSError as e:
            log.error("TFTP worker %d is unreachable: %s", self.process.pid, e)
            self.process.kill()
            self._exited()
            return False
        return True

    def start(self, tid: int, datagram: bytes, request: Request, content: FileContent, sock: socket.socket,
              peer: Peer, blksize_limit: int | None) -> RemoteTransfer | None:
        bounded = Request(request.opcode, "", request.mode, request.options)  # see _MESSAGE_SIZE
        message = ("start", tid, bounded, content.size, peer, blksize_limit, self.pool.config)
        if not self.tell(message, [sock.fileno(), content.fd]):
            return None
        transfer = self.transfers[tid] = RemoteTransfer(self, tid, peer, datagram, request.filename, sock)
        return transfer

    def _readable(self) -> None:
        while True:
            try:
                data, _ = _receive(self.control)
            except BlockingIOError:
                return
            except ChannelError as e:
                log.error("TFTP worker %d: %s; replacing it", self.process.pid, e)
                self.process.kill()
                data = b""
            except OSError:
                data = b""
            if not data:
                self._exited()
                return
            kind, tid, stats = pickle.loads(data)
            if kind == "ready":
                if not self.ready.done():
                    self.ready.set_result(None)
                continue
            transfer = self.transfers.pop(tid, None)
            if transfer is not None:
                transfer.sock.close()
                self.pool.on_done(transfer, dataclasses.replace(stats, filename=transfer.filename))

    def _exited(self) -> None:
        status = self.process.poll()
        log.error("TFTP worker %d exited (%s) with %d transfers; they are failed, and a new worker takes its "
                  "place", self.process.pid, "still running" if status is None else f"status {status}",
                  len(self.transfers))
        if not self.ready.done():
            self.ready.set_exception(OSError(f"TFTP worker {self.process.pid} did not start"))
        self.close()
        self.lost()
        self.pool.replace()

    def lost(self) -> None:
        """Fail the transfers this worker will never report on: each client is told at once."""
        for tid, transfer in list(self.transfers.items()):
            del self.transfers[tid]
            self.pool.on_done(transfer, transfer.interrupted())

    def close(self) -> None:
        if self in self.pool.workers:
            self.pool.workers.remove(self)
            self.pool.retired.append(self)
            self.pool.loop.remove_reader(self.control.fileno())
            self.control.close()  # the worker sees EOF, ends what it still runs, and exits


class WorkerPool:
    def __init__(self, count: int, config: SessionConfig,
                 on_done: Callable[[RemoteTransfer, TransferStats], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.on_done = on_done
        self.workers: list[Worker] = []
        self.retired: list[Worker] = []  # closed, and to be waited for
        self._ids = itertools.count(1)
        self.count = count
        self.closing = False
        self._replacing: asyncio.TimerHandle | None = None
        self._replaced = 0.0
        for _ in range(count):
            self.workers.append(Worker(self))

    def replace(self) -> None:
        """Bring the pool back to `count` workers, at most once every _REPLACE_INTERVAL seconds."""
        if self.closing or self._replacing is not None:
            return
        delay = max(0.0, self._replaced + _REPLACE_INTERVAL - self.loop.time())
        self._replacing = self.loop.call_later(delay, self._replace)

    def _replace(self) -> None:
        self._replacing = None
        if self.closing:
            return
        self._replaced = self.loop.time()
        while len(self.workers) < self.count:
            try:
                worker = Worker(self)
            except OSError as e:
                log.error("cannot start a TFTP worker: %s", e)
                self.replace()
                return
            self.workers.append(worker)
            log.info("TFTP worker %d started", worker.process.pid)
        self._reap()

    def _reap(self) -> None:
        """Collect the exit status of retired workers that have exited (no zombies while serving)."""
        self.retired = [w for w in self.retired if w.process.poll() is None]

    async def ready(self, timeout: float = 30) -> None:
        """Wait until every worker runs, so that the first transfers do not wait for Python to start."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(w.ready for w in self.workers))

    def start(self, datagram: bytes, request: Request, content: FileContent, sock: socket.socket, peer: Peer,
              blksize_limit: int | None) -> RemoteTransfer | None:
        """Hand the transfer to the least busy worker; None when no worker is left to take it."""
        for worker in sorted(self.workers, key=lambda w: len(w.transfers)):
            transfer = worker.start(next(self._ids), datagram, request, content, sock, peer, blksize_limit)
            if transfer is not None:
                content.close()  # the worker has its own copy; the socket is kept (RemoteTransfer.sock)
                return transfer
        return None

    async def close(self, timeout: float = 10) -> None:
        """Stop every worker: the ones that do not exit within `timeout` are killed, and the transfers any
        worker still had are reported as cancelled."""
        self.closing = True
        if self._replacing is not None:
            self._replacing.cancel()
            self._replacing = None
        for worker in list(self.workers):
            worker.close()
        workers, self.retired = self.retired, []
        for worker in workers:
            try:
                await asyncio.wait_for(asyncio.to_thread(worker.process.wait), timeout)
            except TimeoutError:
                log.error("TFTP worker %d did not exit; killing it", worker.process.pid)
                worker.process.kill()
                await asyncio.to_thread(worker.process.wait)
            worker.lost()


# -- the worker's side -------------------------------------------------------------------------------------

# Polling for the next ACK of a lock-step transfer, instead of sleeping in epoll until it comes: a client that
# answers within this long (a VM on this host, a client on loopback or a fast LAN) gets its next block without
# the wake-up of a sleeping process, which measured a quarter of a lock-step block's time on a two-core VM.
_POLL_WINDOW = 50e-6
_POLL_STREAK = 256  # blocks in a row before looking at the control socket and the timers again
_POLL_MISSES = 8  # a transfer whose client missed the window this many times in a row is not polled any more


class _Loop:
    """epoll plus a heap of lazy timers: each transfer has at most one live heap entry, at `due[transfer]`.

    When a worker has a single transfer, it polls that transfer's socket for a short window after each
    block before going back to epoll (see `_POLL_WINDOW`); with more transfers there is other work to do
    instead, and a transfer whose client keeps missing the window (a real network's round trip, a client
    short of CPU) stops being polled."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.epoll = select.epoll()
        self.epoll.register(control.fileno(), select.EPOLLIN)
        self.by_fd: dict[int, Transfer] = {}
        self.by_tid: dict[int, Transfer] = {}
        self.tids: dict[Transfer, int] = {}
        self.due: dict[Transfer, float] = {}
        self.timers: list[tuple[float, int, Transfer]] = []
        self._seq = itertools.count()
        self.running = True
        self.misses: dict[Transfer, int] = {}

    def run(self) -> None:
        if _lockstep is not None:
            self._run_native(_lockstep)
            return
        by_fd, timers = self.by_fd, self.timers
        while self.running or self.by_fd:
            timeout = max(0.0, timers[0][0] - monotonic()) if timers else -1
            for fd, _ in self.epoll.poll(timeout):
                transfer = by_fd.get(fd)
                if transfer is not None:
                    transfer.readable()
                    self._after(transfer)
                    if len(by_fd) == 1 and transfer.sock.fileno() in by_fd and (
                            self.misses.get(transfer, 0) < _POLL_MISSES):
                        self._poll(transfer)
                elif fd == self.control.fileno():
                    self._command()
            self._expire_due()

    def _run_native(self, native: Any) -> None:
        """The same loop, with the lock-step exchanges in `_lockstep`: Python sees the rest (requests from
        the server, timers, windows, errors, final ACKs), taking the transfer back from it first."""
        by_fd, timers, control, epfd = self.by_fd, self.timers, self.control.fileno(), self.epoll.fileno()
        while self.running or self.by_fd:
            for fd, data in native.pump(epfd, timers[0][0] if timers else -1.0, len(by_fd) == 1):
                transfer = by_fd.get(fd)
                if transfer is not None:
                    self._take(transfer)
                    if data is None:
                        transfer.readable()
                    else:
                        transfer.received(data)
                    self._after(transfer)
                elif fd == control:
                    self._command()
            self._expire_due()

    def _take(self, transfer: Transfer) -> None:
        """Bring the session up to date with what the native loop did for it, which stops doing it."""
        if _lockstep is not None and (state := _lockstep.take(transfer.sock.fileno())) is not None:
            transfer.session.advanced(*state)

    def _expire_due(self) -> None:
        now = monotonic()
        timers = self.timers
        while timers and timers[0][0] <= now:
            when, _, transfer = heapq.heappop(timers)
            if self.due.get(transfer) != when:
                continue  # superseded by an earlier deadline, or finished
            del self.due[transfer]
            self._take(transfer)
            transfer.expire()
            self._after(transfer)

    def _poll(self, transfer: Transfer) -> None:
        """Read the transfer's next datagrams as they come, while they come within the window."""
        for _ in range(_POLL_STREAK):
            deadline = monotonic() + _POLL_WINDOW
            while not transfer.readable():
                if monotonic() >= deadline:
                    self.misses[transfer] = self.misses.get(transfer, 0) + 1
                    return
            self.misses[transfer] = 0
            self._after(transfer)
            if transfer.sock.fileno() not in self.by_fd:
                return  # it ended

    def _after(self, transfer: Transfer) -> None:
        session = transfer.session
        if session.finished:
            self._end(transfer)
            return
        if _lockstep is not None and (state := session.lockstep()) is not None:
            content = session.content
            assert isinstance(content, FileContent)
            _lockstep.add(transfer.sock.fileno(), content.fd, session.blksize, session.size, *state)
        deadline = session.deadline
        due = self.due.get(transfer)
        # Lazy timers: every send moves the deadline later, and the entry already in the heap, when it comes
        # up early, re-arms at the new deadline (Session.expire sends nothing before it); so only an earlier
        # deadline (after a backoff) needs a new entry, and the per-packet path touches no heap.
        if deadline is not None and (due is None or deadline < due):
            self.due[transfer] = deadline
            heapq.heappush(self.timers, (deadline, next(self._seq), transfer))

    def _command(self) -> None:
        try:
            data, fds = _receive(self.control, 2)
        except BlockingIOError:
            return
        except ChannelError as e:
            # What the server asked is unknown: this worker stops, and the server fails its transfers and
            # starts another.
            print(f"netboot TFTP worker {os.getpid()}: {e}; exiting", file=sys.stderr, flush=True)
            self._shutdown()
            return
        if not data:
            self._shutdown()
            return
        message = pickle.loads(data)
        if message[0] == "start":
            _, tid, request, size, peer, blksize_limit, config = message
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            session = Session(request, FileContent(fds[1], size), config, now=monotonic(),
                              blksize_limit=blksize_limit)
            transfer = Transfer(session, sock, peer)
            self.by_fd[sock.fileno()] = transfer
            self.by_tid[tid] = transfer
            self.tids[transfer] = tid
            self.epoll.register(sock.fileno(), select.EPOLLIN)
            transfer.start()
            self._after(transfer)
            return
        for fd in fds:
            os.close(fd)
        transfer = self.by_tid.get(message[1])
        if transfer is None:
            return  # it ended meanwhile; its stats are on their way
        self._take(transfer)
        if message[0] == "cancel":
            transfer.cancel(message[2], tell_peer=message[3])
        elif message[0] == "supersede":
            transfer.supersede()
        self._after(transfer)

    def _end(self, transfer: Transfer) -> None:
        self._take(transfer)
        self.epoll.unregister(transfer.sock.fileno())
        del self.by_fd[transfer.sock.fileno()]
        tid = self.tids.pop(transfer)
        del self.by_tid[tid]
        self.due.pop(transfer, None)
        self.misses.pop(transfer, None)
        stats = transfer.stats()
        transfer.close()
        self._tell(("done", tid, stats))

    def _tell(self, message: tuple[Any, ...]) -> None:
        if self.running:
            try:
                _send(self.control, message)
            except OSError:
                self._shutdown()

    def _shutdown(self) -> None:
        """The server is gone or closing: end every transfer (each peer gets an ERROR) and exit."""
        if not self.running:
            return
        self.running = False
        self.epoll.unregister(self.control.fileno())
        for transfer in list(self.by_fd.values()):
            self._take(transfer)
            transfer.cancel("server shutting down")
            self._end(transfer)


def main(argv: list[str]) -> int:
    # Ctrl-C, or a service manager's SIGTERM, reaches every process of the group; the server decides when
    # transfers end, and tells the worker by closing its end of the control socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[0]))
    _send(control, ("ready", 0, None))
    control.setblocking(False)
    _Loop(control).run()
    return 0

