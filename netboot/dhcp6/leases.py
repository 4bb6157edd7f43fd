"""Addresses of `--dhcp6 START-END`: IA_NA leases from a range, kept in a lease store.

A lease belongs to one IA of one client: its key is the client's DUID and the IA's IAID (RFC 8415 §12.1), as
`DUIDHEX-IAID` in the `mac` field of netboot.dhcp.leases.Lease, so that the IPv4 journal's code keeps them, in a
journal of its own (`dhcp6-leases.journal`, netboot.dhcp.journal.Kind). The rules are the IPv4 ones:
- an IA gets its previous address again while it is free (across restarts: the store keeps it);
- otherwise the lowest address never leased, then the address whose lease expired longest ago;
- an advertised address is held for its IA for a minute, so two Solicits never get the same one;
- an address a client declined (RFC 8415 §18.3.8) is set aside for an hour, only when that IA holds it, and at
  most a quarter of the range at once.
Each choice costs O(log n) (a cursor that only moves up, heaps of returned and expired addresses, a heap of
deadlines), never a scan of the range, which may be millions of addresses.

The store is the journal, or any store of DHCPv4's shared interface (netboot.dhcp.leases.SharedLeaseStore): then
advertisements and leases are claims that another server may win (`lost`), and its rows come through `learn`.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from netboot.core.errors import NetbootError
from netboot.dhcp.journal import Kind
from netboot.dhcp.leases import (
    DECLINE_HOLD,
    OFFER_HOLD,
    Allocation,
    Lease,
    LeaseStore,
    at_random,
    bind,
    drop,
)
from netboot.dhcp6.message import packed, text

JOURNAL = "dhcp6-leases.journal"
# Advertisements outstanding at once: each holds an address for OFFER_HOLD seconds, and a Solicit with a made-up
# DUID costs its sender nothing, so they are bounded (a rack booting at once is a few thousand).
MAX_OFFERS = 65_536
_KEY = re.compile(r"[0-9a-f]{6,260}-[0-9a-f]{8}")


def to_int(ip: str) -> int:
    """An address's number (raises ValueError for anything else): socket's parser, a tenth of ipaddress's cost."""
    try:
        return int.from_bytes(packed(ip))
    except OSError:
        raise ValueError(f"not an IPv6 address: {ip[:50]!r}") from None


def to_text(n: int) -> str:
    return text(n.to_bytes(16))


def key_of(duid: bytes, iaid: int) -> str:
    return f"{duid.hex()}-{iaid:08x}"


def _key(text: str) -> str:
    if not _KEY.fullmatch(text):
        raise ValueError(f"not a DUID and an IAID: {text[:40]!r}")
    return text


def _address(text: str) -> IPv6Address:
    return IPv6Address(text)


KIND = Kind(JOURNAL, JOURNAL + ".lock", _key, _address)


@dataclass(frozen=True)
class Pool6:
    first: IPv6Address
    last: IPv6Address
    lease_time: int = 3600

    @staticmethod
    def parse_range(text: str) -> tuple[IPv6Address, IPv6Address]:
        """'2001:db8::1000-2001:db8::1fff'."""
        first, sep, last = text.partition("-")
        try:
            a, b = IPv6Address(first.strip()), IPv6Address(last.strip())
        except ValueError:
            raise NetbootError(f"--dhcp6 {text!r}: expected stateless or a range START-END of IPv6 addresses"
                               ) from None
        if not sep or b < a:
            raise NetbootError(f"--dhcp6 {text!r}: expected stateless or a range START-END with START <= END")
        # (IPv4-mapped and -compatible addresses, in ::/96 and ::ffff:0:0/96, are no hosts' on an IPv6 link.)
        if (a.is_link_local or a.is_multicast or b.is_multicast or int(a) >> 32 in (0, 0xFFFF)
                or a.is_loopback):
            raise NetbootError(f"--dhcp6 {text!r}: expected a range of global (or unique local) unicast addresses")
        return a, b

    @property
    def times(self) -> tuple[int, int, int]:
        """T1, T2 and the lifetime (RFC 8415 §21.4: T1 0.5 and T2 0.8 of the preferred lifetime, as Kea)."""
        t = self.lease_time
        return t // 2, t * 4 // 5, t

    def on_link(self, network: IPv6Network) -> bool:
        return self.first in network and self.last in network


class Leases6(Allocation):
    """Allocation over a pool; every change a client is told of is recorded in the store."""

    _int = staticmethod(to_int)
    _text = staticmethod(to_text)

    def __init__(self, pool: Pool6, store: LeaseStore) -> None:
        self.pool = pool
        self.by_key: dict[str, Lease] = {}
        super().__init__(int(pool.first), int(pool.last), store, self.by_key)
        self._follow_shared()

    def in_range(self, ip: str) -> bool:
        try:
            return self._first <= to_int(ip) <= self._last
        except ValueError:
            return False

    def _holder(self, ip: str, now: float) -> str | None:
        lease = self.by_ip.get(ip)
        if lease is not None and lease.expires > now:
            return lease.mac
        key = self._offered.get(ip)
        if key is not None and self.offers[key][1] > now:
            return key
        return None

    def free_for(self, key: str, ip: str, now: float) -> bool:
        self.prune(now)
        return self.in_range(ip) and self.declined.get(ip, 0) <= now and self._holder(ip, now) in (None, key)

    def lease_of(self, key: str, now: float) -> Lease | None:
        lease = self.by_key.get(key)
        return lease if lease is not None and lease.expires > now else None

    def holds(self, key: str, ip: str, now: float) -> bool:
        lease = self.lease_of(key, now)
        offer = self.offers.get(key)
        return (lease is not None and lease.ip == ip) or (offer is not None and offer[0] == ip and offer[1] > now)

    def pick(self, key: str, hints: tuple[str, ...], now: float) -> str | None:
        """The address to advertise to the IA `key`, not held yet (`hold` does, once the answer is built)."""
        self.prune(now)
        offer = self.offers.get(key)
        lease = self.by_key.get(key)
        full = offer is None and len(self.offers) >= MAX_OFFERS
        for ip in (offer[0] if offer else None, lease.ip if lease else None, *(() if full else hints)):
            if ip is not None and self.free_for(key, ip, now):
                return to_text(to_int(ip))  # as the journal writes it
        if full:
            return None
        if self.shared is not None and self._lost.pop(key, None) is None:
            n = at_random(self._first, self._last, lambda n: self._never_ok(n, now))
            if n is not None:
                return to_text(n)
        return self._never_leased(now) or self._expired_longest(now)

    def hold(self, key: str, ip: str, now: float) -> None:
        self._end_offer(key)
        until = now + OFFER_HOLD
        self._offer(key, ip, until)
        if self.shared is not None:
            self.shared.offer(Lease(key, ip, until))

    def _offer(self, key: str, ip: str, until: float, client_id: bytes = b"") -> None:
        self.offers[key] = (ip, until)
        self._offered[ip] = key
        self._deadline(until, "offer", key)

    def commit(self, key: str, ip: str, now: float, hostname: str = "") -> Lease:
        lease = Lease(key, ip, now + self.pool.lease_time, hostname)
        offered = self.offers.get(key)
        self._end_offer(key, reconsider=offered is not None and offered[0] != ip)
        self._bind(lease)
        return lease

    def release(self, key: str, ip: str, now: float) -> bool:
        lease = self.lease_of(key, now)
        if lease is None or lease.ip != ip:
            return False
        released = lease._replace(expires=now)
        bind(self.by_key, self.by_ip, released)
        heapq.heappush(self._expired, (now, to_int(ip)))
        self.store.record(released)
        return True

    def decline(self, key: str, ip: str, now: float) -> bool:
        if not self.holds(key, ip, now):
            return False
        limit = max(1, (self._last - self._first + 1) // 4)
        self.declined.pop(ip, None)
        while len(self.declined) >= limit:
            oldest = next(iter(self.declined))
            del self.declined[oldest]
            self._reconsider(oldest)
        until = now + DECLINE_HOLD
        self.declined[ip] = until
        self._deadline(until, "decline", ip)
        if self.shared is not None:
            self.shared.decline(Lease(key, ip, until))
        self._end_offer(key, reconsider=False)
        lease = self.by_key.get(key)
        if lease is not None and lease.ip == ip:
            drop(self.by_key, self.by_ip, key)
            self.store.forget(key)
        return True

    # What other servers hold (a shared store)

    # Choosing

