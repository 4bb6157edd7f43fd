"""The address allocation of netboot's first DHCP server, kept as the model the indexed one is checked against.

It scans the whole range for every offer: slow, but plainly the rules netboot.dhcp.leases states. The only
change: leases that expired at the same moment are taken in address order (it compared addresses as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from netboot.dhcp.leases import Pool

OFFER_HOLD = 60.0
DECLINE_HOLD = 3600.0


@dataclass
class Lease:
    mac: str
    ip: str
    expires: float
    hostname: str = ""
    client_id: bytes = b""


class Leases:
    """Allocation over a pool by scanning it, as netboot did before its index."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.by_mac: dict[str, Lease] = {}
        self.by_ip: dict[str, Lease] = {}
        self.offers: dict[str, tuple[str, float, bytes]] = {}  # mac -> (ip, until, client id)
        self.declined: dict[str, float] = {}  # ip -> until

    def _bind(self, lease: Lease) -> None:
        old = self.by_mac.pop(lease.mac, None)
        if old is not None:
            self.by_ip.pop(old.ip, None)
        self.by_mac[lease.mac] = lease
        self.by_ip[lease.ip] = lease

    def _holder(self, ip: str, now: float) -> str | None:
        """The MAC an address belongs to right now: an unexpired lease or a pending offer."""
        lease = self.by_ip.get(ip)
        if lease is not None and lease.expires > now:
            return lease.mac
        for mac, (offered, until, _) in self.offers.items():
            if offered == ip and until > now:
                return mac
        return None

    def free_for(self, mac: str, ip: str, now: float, reserved: dict[str, str]) -> bool:
        """May `mac` have `ip` now? Not if it is reserved for, leased to, offered to or declined by another."""
        owner = next((m for m, r in reserved.items() if r == ip), None)
        if owner is not None:
            return owner == mac and self._holder(ip, now) in (None, mac)
        if not self.pool.usable(IPv4Address(ip)) or self.declined.get(ip, 0) > now:
            return False
        return self._holder(ip, now) in (None, mac)

    def choose(self, mac: str, requested: str | None, now: float, reserved: dict[str, str],
               client_id: bytes = b"") -> str | None:
        """The address to offer `mac`, held for it for OFFER_HOLD seconds; None when the range is exhausted."""
        in_range = range(int(self.pool.first), int(self.pool.last) + 1)
        candidates = [reserved.get(mac), self.offers.get(mac, (None, 0, b""))[0]]
        if mac in self.by_mac:
            candidates.append(self.by_mac[mac].ip)
        if requested is not None and int(IPv4Address(requested)) in in_range:
            candidates.append(requested)
        chosen = next((ip for ip in candidates if ip is not None and self._fits(mac, ip, now, reserved)), None)
        if chosen is None:
            chosen = self._fresh(mac, now, reserved)
        if chosen is not None:
            self.offers[mac] = (chosen, now + OFFER_HOLD, client_id)
        return chosen

    def _fits(self, mac: str, ip: str, now: float, reserved: dict[str, str]) -> bool:
        in_range = self.pool.first <= IPv4Address(ip) <= self.pool.last
        return (in_range or reserved.get(mac) == ip) and self.free_for(mac, ip, now, reserved)

    def _fresh(self, mac: str, now: float, reserved: dict[str, str]) -> str | None:
        taken = set(reserved.values())
        expired: list[tuple[float, str]] = []
        for address in self.pool.addresses():
            ip = str(address)
            if ip in taken or not self.free_for(mac, ip, now, reserved):
                continue
            lease = self.by_ip.get(ip)
            if lease is None:
                return ip  # never leased: first choice, so that expired leases stay with their machines longest
            expired.append((lease.expires, ip))
        return min(expired, key=lambda e: (e[0], IPv4Address(e[1])))[1] if expired else None

    def commit(self, mac: str, ip: str, now: float, hostname: str = "", client_id: bytes = b"") -> Lease:
        """Lease `ip` to `mac` for the pool's lease time; written to disk before returning."""
        lease = Lease(mac, ip, now + self.pool.lease_time, hostname, client_id)
        previous = self.by_ip.get(ip)
        if previous is not None and previous.mac != mac:
            del self.by_mac[previous.mac]  # an expired lease of another machine gives way
        self._bind(lease)
        self.offers.pop(mac, None)
        return lease

    def release(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """RELEASE: the lease ends now, but the address stays this machine's next choice. Only from the client
        holding it: False otherwise."""
        lease = self.by_mac.get(mac)
        if lease is None or lease.ip != ip or lease.expires <= now or not _same(lease.client_id, client_id):
            return False
        lease.expires = now
        return True

    def holds(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """Is `ip` offered or leased to this client (its MAC, and its client identifier when both carry one)?"""
        lease = self.by_mac.get(mac)
        offer = self.offers.get(mac)
        return (lease is not None and lease.ip == ip and lease.expires > now and _same(lease.client_id, client_id)
                ) or (offer is not None and offer[0] == ip and offer[1] > now and _same(offer[2], client_id))

    def decline(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """DECLINE: something else answers on `ip`; set it aside, and forget this machine's claim on it. Only
        from the client holding it (as Kea's DHCP4_DECLINE_LEASE_MISMATCH, ISC dhcpd): False otherwise."""
        if not self.holds(mac, ip, now, client_id):
            return False
        limit = max(1, (int(self.pool.last) - int(self.pool.first) + 1) // 4)
        while len(self.declined) >= limit:  # bounded: the one set aside longest gives way
            del self.declined[min(self.declined, key=self.declined.__getitem__)]
        self.declined[ip] = now + DECLINE_HOLD
        self.offers.pop(mac, None)
        lease = self.by_mac.get(mac)
        if lease is not None and lease.ip == ip:
            del self.by_mac[mac]
            del self.by_ip[ip]
        return True

    def forget_offer(self, mac: str) -> None:
        """The client took another server's offer."""
        self.offers.pop(mac, None)

    def prune(self, now: float) -> None:
        self.offers = {m: o for m, o in self.offers.items() if o[1] > now}
        self.declined = {ip: t for ip, t in self.declined.items() if t > now}



def _same(kept: bytes, sent: bytes) -> bool:
    """Client identifiers agree unless both are given and differ (the MAC is compared by the caller)."""
    return not kept or not sent or kept == sent
