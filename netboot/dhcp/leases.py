"""Addresses of the authoritative mode: a range, reservations, and leases kept in a lease store.

Rules, so that no address is ever given to two machines:
- a reserved address (machines file `ip = …`) goes to its machine only;
- a machine gets its previous address again when it is still free (across restarts: the store keeps it);
- otherwise the lowest address never leased (with a store several servers share, one at random: `at_random`), then
  the address whose lease expired longest ago;
- an offered address is held for its machine for a minute, so two DISCOVERs never get the same offer;
- an address a client declined (RFC 2131 §4.3.3: in use by something else) is set aside for an hour, and only
  when that client holds it (offered or leased to its MAC, with the same client identifier when both carry one);
  at most a quarter of the range is set aside at once, the oldest returning first.

Each choice costs O(log n), never a scan of the range (as Kea's allocators, which keep a cursor or a queue of
free leases): addresses never leased come from a cursor that only moves up and a heap of those that came back
(an offer that lapsed, a lease dropped); expired leases wait in a heap by expiry; offers and declines end
through a heap of deadlines. An address left out for a reason that ends (offered, declined, reserved, leased)
comes back through `_reconsider` when it ends, so entries found unusable are simply dropped.

Every change a client is told of goes to the lease store (`LeaseStore`); the server sends the answer only once
the store has made it durable (group commit, netboot.dhcp.server).
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NamedTuple, Protocol

from netboot.core.errors import NetbootError
from netboot.core.machines import Machines

OFFER_HOLD = 60.0
DECLINE_HOLD = 3600.0  # Kea's decline-probation-period, shorter: a boot network is small and changes fast
_IP = struct.Struct("!I")
_RANDOM_TRIES = 8  # random addresses looked at before the cursor: in a range half full, one in 256 goes to it
_random = random.Random()


def at_random(first: int, last: int, never_leased: Callable[[int], bool]) -> int | None:
    """With a store several servers share: an address never leased, at random from first to last, or None after a
    few tries (the cursor's then). Kea's advice for servers sharing a lease database (its "random" allocator; the
    iterative one "underperforms"): servers choosing at once for different clients rarely choose the same address,
    where a cursor each makes them collide as soon as their views differ, each claim lost sending the next onto
    the other's addresses (bench/ha_perf.py: a quarter of the claims lost, and OFFERs after 260 ms)."""
    span = last - first + 1
    for _ in range(_RANDOM_TRIES):
        n = first + _random.randrange(span)
        if never_leased(n):
            return n
    return None


def note_lost(lost: dict[str, None], key: str) -> None:
    """A client whose claim was lost: its next choice is the cursor's (`at_random` is skipped once), since in a
    range nearly full another random address would likely be lost too. Bounded: a flood forgets."""
    if len(lost) >= 4096:
        lost.clear()
    lost[key] = None


def to_int(ip: str) -> int:
    return _IP.unpack(socket.inet_aton(ip))[0]


def to_text(n: int) -> str:
    return socket.inet_ntoa(_IP.pack(n))


@dataclass(frozen=True)
class Pool:
    """The authoritative mode's addresses: START-END inside one subnet, and what clients are told with them."""

    first: IPv4Address
    last: IPv4Address
    network: IPv4Network
    lease_time: int = 3600
    router: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()
    domain: str = ""
    excluded: frozenset[IPv4Address] = frozenset()  # the server's own addresses, the router

    @staticmethod
    def parse_range(text: str) -> tuple[IPv4Address, IPv4Address]:
        """'192.0.2.100-192.0.2.199'."""
        first, sep, last = text.partition("-")
        try:
            a, b = IPv4Address(first.strip()), IPv4Address(last.strip())
        except ValueError:
            raise NetbootError(f"--dhcp {text!r}: expected proxy or a range START-END of IPv4 addresses") from None
        if not sep or b < a:
            raise NetbootError(f"--dhcp {text!r}: expected proxy or a range START-END with START <= END")
        return a, b

    @functools.cached_property
    def subnet_options(self) -> dict[str, object]:
        """What every answer with the subnet carries (by the names of netboot.dhcp.message.OPTIONS), in order."""
        options: dict[str, object] = {"subnet_mask": str(self.network.netmask),
                                      "broadcast_address": str(self.network.broadcast_address)}
        if self.router is not None:
            options["router"] = (str(self.router),)  # tuples: the codec keeps what it encoded by value
        if self.dns:
            options["name_server"] = tuple(str(d) for d in self.dns)
        if self.domain:
            options["domain_name"] = self.domain
        return options

    @functools.cached_property
    def lease_options(self) -> dict[str, object]:
        """What an answer with an address carries: the lease time, renewal (T1) and rebinding (T2) times at the
        RFC 2131 §4.4.5 defaults, and the subnet's options."""
        t = self.lease_time
        return {"lease_time": t, "renewal_time": t // 2, "rebinding_time": t * 7 // 8, **self.subnet_options}

    def addresses(self) -> Iterator[IPv4Address]:
        for n in range(int(self.first), int(self.last) + 1):
            ip = IPv4Address(n)
            if self.usable(ip):
                yield ip

    def usable(self, ip: IPv4Address) -> bool:
        """An address this server may hand out at all: in its subnet, not a reserved role, not its own."""
        return (ip in self.network and ip not in self.excluded
                and ip not in (self.network.network_address, self.network.broadcast_address))


class Lease(NamedTuple):
    mac: str
    ip: str
    expires: float  # seconds since the epoch
    hostname: str = ""
    client_id: bytes = b""  # option 61 of the request it was granted on, if any


class LeaseStore(Protocol):
    """Where leases are kept: the journal (netboot.dhcp.journal) today; a database could follow (as Kea's
    LeaseMgr backends). Changes are recorded on the event loop; `write` makes them durable in another thread."""

    def load(self) -> list[Lease]:
        """The leases at start (raises NetbootError, leaving what it read as it was, when they cannot be read)."""
        ...

    def record(self, lease: Lease) -> None:
        """A lease granted, renewed or released (its expiry changed); it replaces the MAC's and the address's."""
        ...

    def forget(self, mac: str) -> None:
        """A lease dropped."""
        ...

    def take(self) -> object | None:
        """The changes recorded since the last take, to hand to `write`; None when there are none."""
        ...

    def write(self, batch: object) -> None:
        """Make a batch durable (blocking: called off the event loop, one batch at a time); OSError on failure."""
        ...

    def restore(self, batch: object) -> None:
        """A batch whose write failed goes back before what was recorded since, for the next write."""
        ...

    def close(self) -> None: ...


class SharedLeaseStore(LeaseStore, Protocol):
    """A store that several servers share (netboot.dhcp.lease_database): offers and declines are claims too, a
    claim can be lost to another server, and what the others hold is told to the view (`Leases.learn`)."""

    claims_offers: bool
    learn: Callable[[list[Any]], None] | None

    def held(self) -> list[Any]:
        """The offers and declines at start (rows with `lease` and `state`)."""
        ...

    def offer(self, lease: Lease) -> None:
        """An address offered until `lease.expires`."""
        ...

    def decline(self, lease: Lease) -> None:
        """An address set aside until `lease.expires`."""
        ...

    def release_offer(self, mac: str) -> None:
        """The client took another server's offer: this server's ends."""
        ...

    @property
    def reachable(self) -> bool:
        """Whether claims can be made now (a claim lost while not is not worth making again at once)."""
        ...


def bind(by_mac: dict[str, Lease], by_ip: dict[str, Lease], lease: Lease) -> Lease | None:
    """Apply a lease to the tables: it replaces its MAC's lease, and an expired lease of another machine on its
    address gives way. Returns the MAC's previous lease, if it was on another address."""
    previous = by_ip.get(lease.ip)
    if previous is not None and previous.mac != lease.mac:
        del by_mac[previous.mac]
    old = by_mac.get(lease.mac)
    if old is not None and old.ip != lease.ip:
        del by_ip[old.ip]
    else:
        old = None
    by_mac[lease.mac] = lease
    by_ip[lease.ip] = lease
    return old


def drop(by_mac: dict[str, Lease], by_ip: dict[str, Lease], mac: str) -> Lease | None:
    lease = by_mac.pop(mac, None)
    if lease is not None:
        del by_ip[lease.ip]
    return lease


class Allocation:
    """What DHCPv4's leases (`Leases`, by MAC) and DHCPv6's (netboot.dhcp6.leases, by DUID and IAID) choose from
    and keep alike: a range of addresses as numbers (`_int`, `_text` spell them), the view of leases and offers,
    the cursor and the heaps of returned and expired addresses, the deadlines of offers and declines, and with a
    shared store the claims lost and the rows learned. `clients` is the view's table by client (a lease's `mac`
    field: a MAC, or DHCPv6's key), which the subclass names. DHCPv4 sets aside addresses DHCPv6 has none of
    (`_reserved`, `_unusable`, the subnet `_net`/`_mask`): empty, and a mask of 0, here."""

    _int: Callable[[str], int] = staticmethod(to_int)
    _text: Callable[[int], str] = staticmethod(to_text)

    def __init__(self, first: int, last: int, store: LeaseStore, clients: dict[str, Lease]) -> None:
        self.store = store
        self._first, self._last = first, last
        self._clients = clients
        self.by_ip: dict[str, Lease] = {}
        for lease in store.load():
            bind(clients, self.by_ip, lease)
        # A store several servers share (SharedLeaseStore: netboot.dhcp.lease_database): an offer is a claim too, a
        # claim can be lost to another server (`lost`), and what the others hold comes through `learn`.
        shared = store if getattr(store, "claims_offers", False) else None
        self.shared: SharedLeaseStore | None = shared  # type: ignore[assignment]
        self.offers: dict[str, tuple[Any, ...]] = {}  # client -> (ip, until, ...)
        self._offered: dict[str, str] = {}  # ip -> client
        self.declined: dict[str, float] = {}  # ip -> until, oldest first
        self._deadlines: list[tuple[float, str, str]] = []  # (until, "offer" or "decline", client or ip)
        self._cursor = first  # addresses above it were never looked at: never leased unless in by_ip
        self._returned: list[int] = []  # addresses below the cursor that may be free and never leased again
        self._expired: list[tuple[float, int]] = []  # (expires, ip) of leases in the range
        self._rebuild_expired()
        self._lost: dict[str, None] = {}  # clients whose last claim on a shared store was lost (see lost())
        self._reserved: dict[str, str] = {}  # ip -> client
        self._unusable: set[int] = set()
        self._net = self._mask = 0

    def _follow_shared(self) -> None:
        """With a shared store, what the other servers hold now, and from now on (the subclass's last step)."""
        if self.shared is not None:
            self.shared.learn = self.learn
            self.learn(self.shared.held())

    def _offer(self, key: str, ip: str, until: float, client_id: bytes = b"") -> None:
        raise NotImplementedError

    # Choosing

    def _never_ok(self, n: int, now: float) -> bool:
        """Free for anyone, and never leased: what the cursor and the returned heap offer first."""
        ip = self._text(n)
        return (ip not in self.by_ip and ip not in self._offered and ip not in self._reserved
                and self.declined.get(ip, 0) <= now and n not in self._unusable and n & self._mask == self._net)

    def _never_leased(self, now: float) -> str | None:
        returned = self._returned
        while returned and not self._never_ok(returned[0], now):
            heapq.heappop(returned)  # taken since: it comes back through _reconsider when that ends
        while self._cursor <= self._last and not self._never_ok(self._cursor, now):
            self._cursor += 1
        best = min(returned[0] if returned else self._last + 1, self._cursor)
        return self._text(best) if best <= self._last else None

    def _expired_longest(self, now: float) -> str | None:
        heap = self._expired
        while heap and heap[0][0] <= now:
            expires, n = heap[0]
            ip = self._text(n)
            lease = self.by_ip.get(ip)
            if (lease is not None and lease.expires == expires and ip not in self._offered
                    and ip not in self._reserved and self.declined.get(ip, 0) <= now and n not in self._unusable):
                return ip
            heapq.heappop(heap)  # stale, or taken: it comes back through _reconsider when that ends
        return None

    def _reconsider(self, ip: str) -> None:
        """An address whose hold (offer, decline, reservation, lease) ended: back where it can be chosen."""
        n = self._int(ip)
        if not self._first <= n <= self._last:
            return
        lease = self.by_ip.get(ip)
        if lease is not None:
            heapq.heappush(self._expired, (lease.expires, n))
            if len(self._expired) > 2 * len(self.by_ip) + 1024:
                self._rebuild_expired()
        elif n < self._cursor:
            heapq.heappush(self._returned, n)
            if len(self._returned) > 2 * (self._last - self._first + 1) + 1024:
                self._returned = sorted(set(self._returned))  # a sorted list is a heap

    def _deadline(self, until: float, kind: str, key: str) -> None:
        """When an offer or a decline ends, in the heap of deadlines. Each offer made again (a client repeating
        its DISCOVER) leaves its previous entry behind until that one's time: the heap is rebuilt from the
        tables when stale entries outnumber the live ones, as _expired is."""
        heapq.heappush(self._deadlines, (until, kind, key))
        if len(self._deadlines) > 2 * (len(self.offers) + len(self.declined)) + 1024:
            self._deadlines = [(offer[1], "offer", key) for key, offer in self.offers.items()]
            self._deadlines += [(ends, "decline", ip) for ip, ends in self.declined.items()]
            heapq.heapify(self._deadlines)

    def _rebuild_expired(self) -> None:
        """The heap of expired leases from the table, without the entries that went stale."""
        self._expired = [(lease.expires, n) for lease in self.by_ip.values()
                         if self._first <= (n := self._int(lease.ip)) <= self._last]
        heapq.heapify(self._expired)

    # Changes

    def _end_offer(self, key: str, reconsider: bool = True) -> str | None:
        offer = self.offers.pop(key, None)
        if offer is None:
            return None
        if self._offered.get(offer[0]) == key:
            del self._offered[offer[0]]
            if reconsider:
                self._reconsider(offer[0])
        return offer[0]

    def _bind(self, lease: Lease, record: bool = True) -> None:
        """A lease into the view; recorded in the store unless it comes from there (`learn`)."""
        old = bind(self._clients, self.by_ip, lease)
        n = self._int(lease.ip)
        if self._first <= n <= self._last:
            heapq.heappush(self._expired, (lease.expires, n))
            if len(self._expired) > 2 * len(self.by_ip) + 1024:  # renewals leave stale entries behind
                self._rebuild_expired()
        if old is not None:
            self._reconsider(old.ip)  # no longer leased at all: never leased, as far as choosing goes
        if record:
            self.store.record(lease)

    def forget_offer(self, key: str) -> None:
        """The client took another server's offer."""
        if self._end_offer(key) is not None and self.shared is not None:
            self.shared.release_offer(key)

    # What other servers hold (a shared store)

    def lost(self, key: str, ip: str) -> None:
        """This server's claim on `ip` for `key` did not hold (another server's client has it): undone here; the
        winner's row comes through `learn`."""
        offer = self.offers.get(key)
        if offer is not None and offer[0] == ip:
            self._end_offer(key, reconsider=False)
        note_lost(self._lost, key)
        lease = self._clients.get(key)
        if lease is not None and lease.ip == ip:
            drop(self._clients, self.by_ip, key)

    def learn(self, rows: list[Any]) -> None:
        """Rows of the shared table (`lease`, `state`: 0 leased, 1 offered, 2 declined), as another server wrote
        them: the view holds their addresses for their clients until they expire."""
        for row in rows:
            lease: Lease = row.lease
            if row.state == 0:
                current = self.by_ip.get(lease.ip)
                if current is None or current.mac != lease.mac or current.expires < lease.expires:
                    self._bind(lease, record=False)
            elif row.state == 1:
                if self._offered.get(lease.ip) != lease.mac:
                    self._end_offer(lease.mac)
                    self._offer(lease.mac, lease.ip, lease.expires, lease.client_id)
            elif self.declined.get(lease.ip, 0.0) < lease.expires:
                self.declined.pop(lease.ip, None)
                self.declined[lease.ip] = lease.expires
                self._deadline(lease.expires, "decline", lease.ip)

    def prune(self, now: float) -> None:
        """End the offers and declines whose time is up (each once, from the heap of deadlines)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            until, kind, key = heapq.heappop(deadlines)
            if kind == "offer":
                offer = self.offers.get(key)
                if offer is not None and offer[1] == until:
                    self._end_offer(key)
            elif self.declined.get(key) == until:
                del self.declined[key]
                self._reconsider(key)


class Leases(Allocation):
    """Allocation over a pool; every change a client is told of is recorded in the store."""

    def __init__(self, pool: Pool, store: LeaseStore) -> None:
        self.pool = pool
        self.by_mac: dict[str, Lease] = {}
        super().__init__(int(pool.first), int(pool.last), store, self.by_mac)
        self._unusable = {int(a) for a in pool.excluded} | {int(pool.network.network_address),
                                                            int(pool.network.broadcast_address)}
        self._net, self._mask = int(pool.network.network_address), int(pool.network.netmask)
        self._reserved_from: dict[str, str] | None = None
        self._follow_shared()

    # Reservations

    def _sync(self, reserved: dict[str, str]) -> None:
        """Follow the machines file's reservations (MAC -> address); a dict kept while the file is unchanged."""
        if reserved is self._reserved_from:
            return
        before = self._reserved
        self._reserved = {ip: mac for mac, ip in reserved.items()}
        self._reserved_from = reserved
        for ip in before.keys() - self._reserved.keys():
            self._reconsider(ip)

    # Who holds what

    def _holder(self, ip: str, now: float) -> str | None:
        """The MAC an address belongs to right now: an unexpired lease or a pending offer."""
        lease = self.by_ip.get(ip)
        if lease is not None and lease.expires > now:
            return lease.mac
        mac = self._offered.get(ip)
        if mac is not None and self.offers[mac][1] > now:
            return mac
        return None

    def in_subnet(self, ip: str) -> bool:
        return to_int(ip) & self._mask == self._net

    def in_range(self, ip: str) -> bool:
        return self._first <= to_int(ip) <= self._last

    def _usable(self, ip: str) -> bool:
        n = to_int(ip)
        return n not in self._unusable and n & self._mask == self._net

    def free_for(self, mac: str, ip: str, now: float, reserved: dict[str, str]) -> bool:
        """May `mac` have `ip` now? Not if it is reserved for, leased to, offered to or declined by another."""
        self.prune(now)
        self._sync(reserved)
        owner = self._reserved.get(ip)
        if owner is not None:
            return owner == mac and self._holder(ip, now) in (None, mac)
        if not self._usable(ip) or self.declined.get(ip, 0) > now:
            return False
        return self._holder(ip, now) in (None, mac)

    def holds(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """Is `ip` offered or leased to this client (its MAC, and its client identifier when both carry one)?"""
        lease = self.by_mac.get(mac)
        offer = self.offers.get(mac)
        return (lease is not None and lease.ip == ip and lease.expires > now and _same(lease.client_id, client_id)
                ) or (offer is not None and offer[0] == ip and offer[1] > now and _same(offer[2], client_id))

    def leased_to(self, mac: str, ip: str, now: float) -> bool:
        """Is `ip` leased to `mac` right now (an unexpired lease; an offer is not)?"""
        lease = self.by_mac.get(mac)
        return lease is not None and lease.ip == ip and lease.expires > now

    # Choosing

    def choose(self, mac: str, requested: str | None, now: float, reserved: dict[str, str],
               client_id: bytes = b"") -> str | None:
        """The address to offer `mac`, held for it for OFFER_HOLD seconds; None when the range is exhausted."""
        chosen = self.pick(mac, requested, now, reserved)
        if chosen is not None:
            self.hold(mac, chosen, now, client_id)
        return chosen

    def pick(self, mac: str, requested: str | None, now: float, reserved: dict[str, str]) -> str | None:
        """The address `choose` would offer `mac`, not held yet (`hold` does, once the OFFER is built); None when
        the range is exhausted. What it changes is only catching up: offers and declines whose time is up end,
        the reservations follow the machines file, entries found stale leave the indexes."""
        self.prune(now)
        self._sync(reserved)
        offer = self.offers.get(mac)
        lease = self.by_mac.get(mac)
        candidates = (reserved.get(mac), offer[0] if offer else None, lease.ip if lease else None,
                      requested if requested is not None and self.in_range(requested) else None)
        chosen = next((ip for ip in candidates if ip is not None and self._fits(mac, ip, now, reserved)), None)
        if chosen is None and self.shared is not None and self._lost.pop(mac, None) is None:
            n = at_random(self._first, self._last, lambda n: self._never_ok(n, now))
            chosen = to_text(n) if n is not None else None
        if chosen is None:
            chosen = self._never_leased(now)
            if chosen is None:
                chosen = self._expired_longest(now)
        return chosen

    def hold(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> None:
        """Offer `ip` (from `pick`, at the same `now`) to `mac`: held for it for OFFER_HOLD seconds."""
        self._end_offer(mac)
        until = now + OFFER_HOLD
        self._offer(mac, ip, until, client_id)
        if self.shared is not None:
            self.shared.offer(Lease(mac, ip, until, "", client_id))

    def _offer(self, mac: str, ip: str, until: float, client_id: bytes) -> None:
        self.offers[mac] = (ip, until, client_id)
        self._offered[ip] = mac
        self._deadline(until, "offer", mac)

    def _fits(self, mac: str, ip: str, now: float, reserved: dict[str, str]) -> bool:
        return (self.in_range(ip) or reserved.get(mac) == ip) and self.free_for(mac, ip, now, reserved)

    # Changes

    def commit(self, mac: str, ip: str, now: float, hostname: str = "", client_id: bytes = b"") -> Lease:
        """Lease `ip` to `mac` for the pool's lease time, recorded in the store."""
        lease = Lease(mac, ip, now + self.pool.lease_time, hostname, client_id)
        offered = self.offers.get(mac)
        self._end_offer(mac, reconsider=offered is not None and offered[0] != ip)
        self._bind(lease)
        return lease

    def release(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """RELEASE: the lease ends now, but the address stays this machine's next choice. Only from the client
        holding it: False otherwise."""
        lease = self.by_mac.get(mac)
        if lease is None or lease.ip != ip or lease.expires <= now or not _same(lease.client_id, client_id):
            return False
        self._bind(lease._replace(expires=now))
        return True

    def decline(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """DECLINE: something else answers on `ip`; set it aside, and forget this machine's claim on it. Only
        from the client holding it (as Kea's DHCP4_DECLINE_LEASE_MISMATCH, ISC dhcpd): False otherwise."""
        if not self.holds(mac, ip, now, client_id):
            return False
        limit = max(1, (self._last - self._first + 1) // 4)
        self.declined.pop(ip, None)
        while len(self.declined) >= limit:  # bounded: the one set aside longest gives way
            oldest = next(iter(self.declined))
            del self.declined[oldest]
            self._reconsider(oldest)
        until = now + DECLINE_HOLD
        self.declined[ip] = until
        self._deadline(until, "decline", ip)
        if self.shared is not None:
            self.shared.decline(Lease(mac, ip, until, "", client_id))
        offered = self._end_offer(mac, reconsider=False)
        if offered is not None and offered != ip:
            self._reconsider(offered)
        lease = self.by_mac.get(mac)
        if lease is not None and lease.ip == ip:
            drop(self.by_mac, self.by_ip, mac)
            self.store.forget(mac)
        return True

    # What other servers hold (a shared store)


def _same(kept: bytes, sent: bytes) -> bool:
    """Client identifiers agree unless both are given and differ (the MAC is compared by the caller)."""
    return not kept or not sent or kept == sent


def network_of(first: IPv4Address, last: IPv4Address,
               interfaces: list[ipaddress.IPv4Interface]) -> ipaddress.IPv4Interface | None:
    """The interface address whose subnet holds the whole range."""
    return next((i for i in interfaces if first in i.network and last in i.network), None)


def check_reservations(machines: Machines, pool: Pool) -> None:
    """Every reserved address must be one this server can hand out."""
    for m in machines.machines.values():
        if m.ip and not pool.usable(IPv4Address(m.ip)):
            where = f"{machines.source}: " if machines.source else ""
            raise NetbootError(f"{where}machines.{m.mac!r}: ip {m.ip} is not an address of the DHCP subnet "
                               f"{pool.network} (or is the network's, the broadcast, the router or this server)")
