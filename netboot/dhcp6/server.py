"""The asyncio side of the DHCPv6 server: one socket on UDP port 547, and nothing else.

Every decision is `exchange.Responder`'s. The socket joins All_DHCP_Relay_Agents_and_Servers (ff02::1:2, RFC
8415 §7.1) on every interface with IPv6 (again as interfaces appear), and learns each datagram's interface from
IPV6_PKTINFO (RFC 3542 §6): the interface names our address for the boot URLs, and the scope of a client's
link-local address, which answers go back to. As the IPv4 server (netboot.dhcp.server), a Reply that grants a
lease waits until the lease store has made it durable, the changes of each burst of datagrams written as one
group in a thread of its own; malformed datagrams, and any that a bug kept from being answered, cost at most one
log line every 10 seconds, never a traceback; a message not answered for a reason the operator can fix is logged
once per client and reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv6Address, IPv6Interface, IPv6Network

from netboot.core.addresses import ipv6_interfaces
from netboot.core.logbudget import Dropped, LogBudget, OncePer
from netboot.core.logtext import clip
from netboot.dhcp.commit import GroupCommit, fault
from netboot.dhcp6.exchange import PXE_PORT, SERVER_PORT, Answer, Arrival, Ignored, Responder
from netboot.dhcp6.message import MAX_DATAGRAM, Malformed

log = logging.getLogger("netboot.dhcp6")

ALL_SERVERS = "ff02::1:2"  # All_DHCP_Relay_Agents_and_Servers (RFC 8415 §7.1)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)  # linux/in6.h
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IN6_PKTINFO = struct.Struct("=16sI")  # address, ifindex
_REFRESH = 10.0  # seconds between looks at the interfaces' addresses
_QUIET = 10.0  # seconds between log lines about dropped datagrams
_IGNORED_AGAIN = 600.0  # seconds between log lines per ignored client and reason

Interfaces6 = dict[int, tuple[str, list[IPv6Interface]]]
_Waiting = tuple[Answer]


class Dhcp6Server:
    def __init__(self, responder: Responder, interfaces: Interfaces6, only: Iterable[str] = (),
                 snapshot: Callable[[], Interfaces6] = ipv6_interfaces) -> None:
        self.responder = responder
        self.interfaces = interfaces
        self.only = frozenset(only)  # interface names to answer on; empty: all
        self._snapshot = snapshot
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._discovery: socket.socket | None = None
        self.discovery_port = 0
        self._joined: set[int] = set()
        self._where: dict[int, tuple[str | None, tuple[IPv6Network, ...]]] = {}
        self._refreshed = time.monotonic()
        self._refreshing: asyncio.Task | None = None
        self._dropped = Dropped(log, "dhcp6: ", _QUIET)
        self.answered = 0
        self.port = 0
        self._answers = LogBudget(self._loop, log, "answers", prefix="dhcp6: ")
        # Once per machine and reason; a flood of made-up ones is counted beyond the budget.
        self._not_answered = OncePer(LogBudget(self._loop, log, "messages not answered", prefix="dhcp6: "),
                                     _IGNORED_AGAIN)
        self._closed = False
        leases = responder.leases
        self._store = leases.store if leases is not None else None
        self._group: GroupCommit[Answer] = GroupCommit(
            self._loop, self._store, leases is not None and leases.shared is not None, self._send, self._claimed, log,
            "dhcp6", "Replies")

    def listen(self, host: str = "::", port: int = SERVER_PORT, discovery: int | None = None) -> None:
        """Port 547 (`port`), and in stateless mode port 4011 (`discovery`) for EDK2's boot server discovery."""
        self._sock = self._bind(host, port)
        self.port = self._sock.getsockname()[1]
        self._join()
        self._loop.add_reader(self._sock.fileno(), self._readable, self._sock, self.port)
        if discovery is not None:
            self._discovery = self._bind(host, discovery)
            self.discovery_port = self._discovery.getsockname()[1]
            self._loop.add_reader(self._discovery.fileno(), self._readable, self._discovery, PXE_PORT)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            sock.setblocking(False)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def _join(self) -> None:
        """Join ff02::1:2 on every interface answered on that has IPv6 and is not loopback."""
        if self._sock is None:
            return
        group = IPv6Address(ALL_SERVERS).packed
        for ifindex, (name, addresses) in self.interfaces.items():
            if ifindex in self._joined or not addresses or name == "lo" or (self.only and name not in self.only):
                continue
            try:
                self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group + struct.pack("@I", ifindex))
            except OSError as e:
                log.debug("dhcp6: cannot join %s on %s: %s", ALL_SERVERS, name, e.strerror)
                continue
            self._joined.add(ifindex)

    def _readable(self, sock: socket.socket, port: int) -> None:
        for _ in range(64):  # a burst at a time, then let the loop breathe
            try:
                data, ancdata, _flags, source = sock.recvmsg(MAX_DATAGRAM + 1, socket.CMSG_SPACE(_IN6_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("dhcp6: receive: %s", e)
                continue
            ifindex = source[3]
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(value) >= _IN6_PKTINFO.size:
                    ifindex = _IN6_PKTINFO.unpack_from(value)[1]
            self._datagram(data, source[0].partition("%")[0], ifindex, port, source[1], sock)
        self._group.commit()

    def _datagram(self, data: bytes, source: str, ifindex: int, port: int = SERVER_PORT,
                  source_port: int = 0, sock: socket.socket | None = None) -> None:
        name, addresses = self.interfaces.get(ifindex, ("", []))
        if not name:
            self._refresh_soon(force=True)  # an interface that appeared since the last look
        elif self.only and name not in self.only:
            return
        self._refresh_soon()
        where = self._where.get(ifindex)
        if where is None:  # our address and prefixes there, until the next look at the interfaces
            where = self._where[ifindex] = (_server(addresses, self.responder),
                                            tuple(a.network for a in addresses if not a.is_link_local))
        server, networks = where
        try:
            result = self.responder.handle(Arrival(data, source, ifindex, server, networks, port, source_port))
        except Malformed as e:
            self._drop(source, str(e))
            return
        except Exception as e:
            self._drop(source, f"not answered: {fault(e)}")
            return
        if isinstance(result, Ignored):
            self._ignore(result)
        elif isinstance(result, Answer):
            if result.durable_first and self._store is not None:
                self._group.waiting.append(result)
            else:
                self._send(result, sock)

    def _claimed(self, answers: list[Answer], lost: set[str] | None) -> None:
        """A shared store's write returned: answers whose claims all held go out; a claim lost to another server
        is undone and its answer dropped (the client asks again, and the view now knows the winner). `lost` None:
        the write failed."""
        leases = self.responder.leases
        assert leases is not None
        if lost is None:
            lost = {ip for a in answers for _, ip in a.claims}
        for answer in answers:
            gone = [(key, ip) for key, ip in answer.claims if ip in lost]
            if not gone:
                self._send(answer)
                continue
            for key, ip in gone:
                leases.lost(key, ip)

    def _send(self, answer: Answer, sock: socket.socket | None = None) -> None:
        """By the socket the message came in on (a discovery's answer comes from port 4011)."""
        sock = sock or self._sock
        if sock is None or self._closed:
            return
        try:
            sock.sendto(answer.data, answer.dest)
        except OSError as e:
            log.warning("dhcp6: %s: not sent to [%s]:%d: %s", answer.line, answer.dest[0], answer.dest[1],
                        e.strerror)
            return
        self.answered += 1
        self._answers.log("dhcp6: %s", answer.line)

    def _drop(self, source: str, why: str) -> None:
        self._dropped(f"[{source}]", clip(why, 200))

    def _ignore(self, ignored: Ignored) -> None:
        self._not_answered.log(ignored.who, ignored.reason, "dhcp6: %s: not answered: %s", ignored.who,
                               ignored.reason)

    def _refresh_soon(self, force: bool = False) -> None:
        if self._refreshing is not None or (not force and time.monotonic() - self._refreshed < _REFRESH):
            return
        self._refreshed = time.monotonic()

        async def refresh() -> None:
            try:
                self.interfaces = await asyncio.to_thread(self._snapshot)
                self._where = {}
                self._joined &= self.interfaces.keys()
                self._join()
            except Exception as e:
                log.warning("dhcp6: cannot read the interfaces' addresses: %s", e)
            finally:
                self._refreshing = None

        self._refreshing = self._loop.create_task(refresh())

    def close(self) -> None:
        self._closed = True
        self._group.close()
        for sock in (self._sock, self._discovery):
            if sock is not None:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        self._sock = self._discovery = None
        if self._refreshing is not None:
            self._refreshing.cancel()


def _server(addresses: list[IPv6Interface], responder: Responder) -> str | None:
    """Our address on the interface for boot URLs: global (a link-local one needs a zone the firmware cannot
    write), in the range's prefix when there is one, else the first global one."""
    usable = [a for a in addresses if not a.is_link_local and not a.is_loopback and not a.is_multicast]
    if responder.leases is not None:
        pool = responder.leases.pool
        for a in usable:
            if pool.on_link(a.network):
                return str(a.ip)
    if usable:
        return str(usable[0].ip)
    loopback = [a for a in addresses if a.is_loopback]
    return str(loopback[0].ip) if loopback else None
