"""The asyncio side of the DHCP server: sockets on ports 67 (and 4011 in proxy mode), and nothing else.

Every decision is `exchange.Responder`'s. An ACK waits for its lease to be durable: the lease changes of each
burst of datagrams are written as one group by the lease store in a thread of its own (group commit, as
databases do), and the ACKs go out when that write returns; meanwhile the loop goes on answering.

This layer receives with recvmsg() and IP_PKTINFO to learn the interface each datagram came in on, gives the
responder our address there (from a snapshot of the interfaces, refreshed in a thread because pyroute2's calls
must not run on this loop), and sends the answer with sendmsg() and IP_PKTINFO naming the interface and source
address: that is how a broadcast to 255.255.255.255 leaves by the interface the request came in on, on a
machine with several. Malformed datagrams, and any that a bug kept from being answered, are dropped with at most
one log line every 10 seconds however many arrive (never a traceback per datagram); a request that gets no
answer for a reason the operator can fix (an unknown MAC, no free address) is logged once per machine and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from functools import partial
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from netboot.core.addresses import ipv4_interfaces
from netboot.core.logbudget import Dropped, LogBudget, OncePer
from netboot.core.machines import Machines
from netboot.dhcp.commit import GroupCommit, fault
from netboot.dhcp.exchange import Answer, Arrival, Ignored, Responder
from netboot.dhcp.leases import check_reservations
from netboot.dhcp.message import MAX_DATAGRAM, ZERO, Malformed

log = logging.getLogger("netboot.dhcp")

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h; in the socket module only from Python 3.13
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_REFRESH = 10.0  # seconds between looks at the interfaces' addresses
_QUIET = 10.0  # seconds between log lines about dropped datagrams, and per ignored machine and reason: 600
_IGNORED_AGAIN = 600.0

Interfaces = dict[int, tuple[str, list[IPv4Interface]]]
# An answer waiting for the store's write: its socket, the answer, our address, and how to answer its request
# again should its claim be lost.
_Waiting = tuple[socket.socket, Answer, IPv4Interface | None, Callable[[], None] | None]
_CLAIMS_PER_REQUEST = 3  # claims lost to other servers, at most, before a request is left to its client's retry


class DhcpServer:
    def __init__(self, responder: Responder, interfaces: Interfaces, only: Iterable[str] = (),
                 prefer: IPv4Network | None = None, snapshot: Callable[[], Interfaces] = ipv4_interfaces) -> None:
        self.responder = responder
        self.interfaces = interfaces
        self.only = frozenset(only)  # interface names to answer on; empty: all
        self.prefer = prefer  # in authoritative mode, our address in the pool's subnet
        self._snapshot = snapshot
        self._sockets: list[socket.socket] = []
        self._loop = asyncio.get_running_loop()
        self._refreshed = time.monotonic()
        self._refreshing: asyncio.Task | None = None
        self._servers: dict[tuple[int, str], tuple[IPv4Interface | None, str]] = {}  # (ifindex, source): ours
        self._dropped = Dropped(log, "dhcp: ", _QUIET)
        self.answered = 0
        self._answers = LogBudget(self._loop, log, "answers", prefix="dhcp: ")
        # Once per machine and reason; a flood of made-up ones is counted beyond the budget.
        self._not_answered = OncePer(LogBudget(self._loop, log, "requests not answered", prefix="dhcp: "),
                                     _IGNORED_AGAIN)
        self.ports: list[int] = []
        self._closed = False
        leases = responder.leases
        self._shared = leases.shared if leases is not None else None
        self._group: GroupCommit[_Waiting] = GroupCommit(
            self._loop, leases.store if leases is not None else None, self._shared is not None,
            lambda waiting: self._send(*waiting[:3]), self._claimed, log, "dhcp", "ACKs")

    def listen(self, host: str, port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            # A rack powered on at once sends its DISCOVERs together; room for them all (capped by rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._sockets.append(sock)
        self.ports.append(sock.getsockname()[1])
        self._loop.add_reader(sock.fileno(), self._readable, sock, sock.getsockname()[1])

    def _readable(self, sock: socket.socket, port: int) -> None:
        for _ in range(64):  # a burst at a time, then let the loop breathe
            try:
                data, ancdata, _flags, source = sock.recvmsg(MAX_DATAGRAM + 1, socket.CMSG_SPACE(_IN_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # e.g. ICMP errors reported on the socket
                log.debug("dhcp: receive: %s", e)
                continue
            ifindex = 0
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(value) >= _IN_PKTINFO.size:
                    ifindex = _IN_PKTINFO.unpack_from(value)[0]
            self._datagram(sock, port, data, source, ifindex)
        self._group.commit()

    def _datagram(self, sock: socket.socket, port: int, data: bytes, source: tuple[str, int], ifindex: int,
                  tries: int = 0) -> None:
        name, addresses = self.interfaces.get(ifindex, ("", []))
        if not name:
            self._refresh_soon(force=True)  # an interface that appeared since the last look
        elif self.only and name not in self.only:
            return
        self._refresh_soon()
        key = (ifindex, source[0])
        known = self._servers.get(key)
        if known is None:
            if len(self._servers) >= 4096:  # clients' addresses are many: the cache stays bounded
                self._servers.clear()
            chosen = self._server(addresses, source[0])
            known = self._servers[key] = (chosen, str(chosen.ip) if chosen is not None else ZERO)
        server, address = known
        try:
            result = self.responder.handle(Arrival(data, source, port, ifindex, server, address))
        except Malformed as e:
            self._drop(source, str(e))
            return
        except Exception as e:
            # A bug must not stop the server, nor let one unauthenticated datagram buy a traceback in the log:
            # it costs what a malformed one does (the responder changed nothing), and the line says where it was.
            self._drop(source, f"not answered: {fault(e)}")
            return
        if isinstance(result, Ignored):
            self._ignore(result)
        elif isinstance(result, Answer):
            if result.durable_first:
                again = (partial(self._datagram, sock, port, data, source, ifindex, tries + 1)
                         if result.claim is not None and tries < _CLAIMS_PER_REQUEST - 1 else None)
                self._group.waiting.append((sock, result, server, again))
            else:
                self._send(sock, result, server)

    def _claimed(self, answers: list[_Waiting], lost: set[str] | None) -> None:
        """A shared store's write returned: answers whose claims held go out; a claim lost to another server is
        undone, and its request is answered again (the view now knows the winner), up to _CLAIMS_PER_REQUEST
        times; with the database away, not at all (its client asks again). `lost` None: the write failed."""
        leases = self.responder.leases
        assert leases is not None and self._shared is not None
        if lost is None:
            lost = {a.claim[1] for _, a, _, _ in answers if a.claim is not None}
        again = []
        for sock, answer, server, retry in answers:
            if answer.claim is None or answer.claim[1] not in lost:
                self._send(sock, answer, server)
                continue
            leases.lost(*answer.claim)
            if retry is not None and self._shared.reachable:
                again.append(retry)
        for retry in again:
            retry()

    def _server(self, addresses: list[IPv4Interface], source: str) -> IPv4Interface | None:
        """Our address on the interface: the one in the pool's subnet, else the client's, else the first."""
        for a in addresses:
            if self.prefer is not None and a.ip in self.prefer:
                return a
        client = _address(source)
        for a in addresses:
            if client is not None and client in a.network:
                return a
        return addresses[0] if addresses else None

    def _send(self, sock: socket.socket, answer: Answer, server: IPv4Interface | None) -> None:
        ancdata = []
        if answer.ifindex:
            source = server.ip.packed if server else bytes(4)
            ancdata = [(socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(answer.ifindex, source, bytes(4)))]
        try:
            sock.sendmsg([answer.data], ancdata, 0, answer.dest)
        except OSError as e:
            log.warning("dhcp: %s: not sent to %s:%d: %s", answer.line, *answer.dest, e.strerror)
            return
        self.answered += 1
        self._answers.log("dhcp: %s", answer.line)

    def _drop(self, source: tuple[str, int], why: str) -> None:
        self._dropped(f"{source[0]}:{source[1]}", why)

    def _ignore(self, ignored: Ignored) -> None:
        self._not_answered.log(ignored.mac, ignored.reason, "dhcp: %s: not answered: %s", ignored.mac,
                               ignored.reason)

    def _refresh_soon(self, force: bool = False) -> None:
        if self._refreshing is not None or (not force and time.monotonic() - self._refreshed < _REFRESH):
            return
        self._refreshed = time.monotonic()

        async def refresh() -> None:
            try:
                self.interfaces = await asyncio.to_thread(self._snapshot)
                self._servers = {}
            except Exception as e:
                log.warning("dhcp: cannot read the interfaces' addresses: %s", e)
            finally:
                self._refreshing = None

        self._refreshing = self._loop.create_task(refresh())

    def check(self, machines: Machines) -> None:
        """Refuse a machines file whose reservations this server could not honour (raises NetbootError)."""
        if self.responder.leases is not None:
            check_reservations(machines, self.responder.leases.pool)

    def close(self) -> None:
        self._closed = True
        self._group.close()
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        if self._refreshing is not None:
            self._refreshing.cancel()


def _address(host: str) -> IPv4Address | None:
    with contextlib.suppress(ValueError):
        address = IPv4Address(host)
        if not address.is_unspecified:
            return address
    return None
