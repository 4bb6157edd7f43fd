"""Addresses of the authoritative mode: a range, reservations, and leases kept in a state file.

Rules, so that no address is ever given to two machines:
- a reserved address (machines file `ip = …`) goes to its machine only;
- a machine gets its previous address again when it is still free (across restarts: the state file keeps it);
- otherwise the lowest address never leased, then the address whose lease expired longest ago;
- an offered address is held for its machine for a minute, so two DISCOVERs never get the same offer;
- an address a client declined (RFC 2131 §4.3.3: in use by something else) is set aside for an hour, and only
  when that client holds it (offered or leased to its MAC, with the same client identifier when both carry one);
  at most a quarter of the range is set aside at once, the oldest returning first.
Every lease is written to the state file (atomically: a new file renamed over the old) before the ACK goes out,
so a crash loses none. A state file that cannot be read stops the server at start and is never overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from netboot.errors import NetbootError
from netboot.serve import mac as macs
from netboot.serve.machines import Machines

log = logging.getLogger("netboot.dhcp")

STATE_FILE = "dhcp-leases.json"
FORMAT = "netboot-dhcp-leases"
VERSION = 1
OFFER_HOLD = 60.0
DECLINE_HOLD = 3600.0


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

    def addresses(self) -> Iterator[IPv4Address]:
        for n in range(int(self.first), int(self.last) + 1):
            ip = IPv4Address(n)
            if ip not in self.excluded and ip not in (self.network.network_address, self.network.broadcast_address):
                yield ip

    def usable(self, ip: IPv4Address) -> bool:
        """An address this server may hand out at all: in its subnet, not a reserved role, not its own."""
        return (ip in self.network and ip not in self.excluded
                and ip not in (self.network.network_address, self.network.broadcast_address))


@dataclass
class Lease:
    mac: str
    ip: str
    expires: float  # seconds since the epoch
    hostname: str = ""
    client_id: bytes = b""  # option 61 of the request it was granted on, if any


class StateFile:
    """The leases on disk: JSON, replaced atomically, locked so that two servers never share it."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(directory / (STATE_FILE + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise NetbootError(f"--state-dir {directory}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise NetbootError(f"--state-dir {directory} is in use by another netboot serve") from None

    def close(self) -> None:
        os.close(self._lock)

    def load(self) -> list[Lease]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            raise NetbootError(f"cannot read the lease state {self.path}: {e}") from None
        try:
            return _decode(text)
        except (ValueError, KeyError, TypeError, macs.BadMac) as e:
            raise NetbootError(
                f"{self.path}: corrupt lease state ({e}); left as it is: repair or remove it to start"
            ) from None

    def save(self, leases: list[Lease]) -> None:
        data = {"format": FORMAT, "version": VERSION,
                "leases": [{k: v for k, v in asdict(lease).items() if k != "client_id"}
                           for lease in sorted(leases, key=lambda x: IPv4Address(x.ip))]}
        fd, tmp = tempfile.mkstemp(prefix=".leases-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)


def _decode(text: str) -> list[Lease]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a netboot lease file")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
    leases, macs_seen, ips_seen = [], set(), set()
    for entry in data["leases"]:
        if not isinstance(entry, dict) or set(entry) - {"mac", "ip", "expires", "hostname"}:
            raise ValueError(f"bad entry {entry!r}")
        lease = Lease(macs.normalize(entry["mac"]), str(IPv4Address(entry["ip"])), float(entry["expires"]),
                      str(entry.get("hostname", "")))
        if lease.mac in macs_seen or lease.ip in ips_seen:
            raise ValueError(f"{lease.mac} / {lease.ip} appears twice")
        macs_seen.add(lease.mac)
        ips_seen.add(lease.ip)
        leases.append(lease)
    return leases


class Leases:
    """Allocation over a pool; every change that a client is told of is on disk first."""

    def __init__(self, pool: Pool, state: StateFile) -> None:
        self.pool = pool
        self.state = state
        self.by_mac: dict[str, Lease] = {}
        self.by_ip: dict[str, Lease] = {}
        for lease in state.load():
            self._bind(lease)
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
        return min(expired)[1] if expired else None

    def commit(self, mac: str, ip: str, now: float, hostname: str = "", client_id: bytes = b"") -> Lease:
        """Lease `ip` to `mac` for the pool's lease time; written to disk before returning."""
        lease = Lease(mac, ip, now + self.pool.lease_time, hostname, client_id)
        previous = self.by_ip.get(ip)
        if previous is not None and previous.mac != mac:
            del self.by_mac[previous.mac]  # an expired lease of another machine gives way
        self._bind(lease)
        self.offers.pop(mac, None)
        self.state.save(list(self.by_mac.values()))
        return lease

    def release(self, mac: str, ip: str, now: float, client_id: bytes = b"") -> bool:
        """RELEASE: the lease ends now, but the address stays this machine's next choice. Only from the client
        holding it: False otherwise."""
        lease = self.by_mac.get(mac)
        if lease is None or lease.ip != ip or lease.expires <= now or not _same(lease.client_id, client_id):
            return False
        lease.expires = now
        self.state.save(list(self.by_mac.values()))
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
            self.state.save(list(self.by_mac.values()))
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
