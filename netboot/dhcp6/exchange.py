"""What to answer a DHCPv6 message: a pure function of the datagram, where it arrived, the machines and the leases.

Stateful mode (`--dhcp6 START-END`, RFC 8415 §18.3): IA_NA addresses from the range for every client; Solicit →
Advertise (preference 255, so that the client takes it at once, §18.2.1), or Reply when the client asks for
Rapid Commit (§21.14); Request, Renew, Rebind → Reply with the lease; Confirm → whether its addresses are on
this link; Release, Decline → Reply; Information-Request → Reply. Network-boot clients get their boot file in
the same answers.

Stateless mode (`--dhcp6 stateless`): addresses come from SLAAC or the site's DHCPv6 server; netboot answers
network-boot clients only, with boot information only: an Information-Request (iPXE after a router
advertisement with the O flag), a Solicit without IA_NA (then its Request); and EDK2's PXE over IPv6, which
asks the site's server for an address, gets beside its answer a "ProxyBinl" offer (no address, vendor class
PXEClient, option 59), then its boot server discovery on port 4011 a Reply with the boot file. Every other
message about addresses is the site server's business and gets no answer.

Clients are told apart as iPXE does (netboot.dhcp.boot.classify): option 61 the architecture, option 16 (of
enterprise 343) the vendor class PXEClient/HTTPClient, option 15 the user class iPXE. PXE firmware gets option 59
`tftp://[ADDR]/<loader>`, HTTP Boot `http://[ADDR]:PORT/<loader>` with vendor class HTTPClient echoed (UEFI 2.5
§24.7.3), iPXE `http://[ADDR]:PORT/boot.ipxe`; ADDR is our global address on the arrival interface.

A machine is found by its MAC: from a DUID-LLT or DUID-LL of hardware type 1 (RFC 8415 §11.2, §11.4), else from
the modified EUI-64 interface identifier of its link-local address (RFC 4291 appendix A), else from a relay's
option 79 (RFC 6939). A client that reveals none is an unknown machine (the default profile, as an unknown MAC).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network

from netboot.core.machines import Machines
from netboot.dhcp import boot
from netboot.dhcp.exchange import boot_file_of
from netboot.dhcp6 import message
from netboot.dhcp6.leases import Leases6, key_of, to_int, to_text
from netboot.dhcp6.message import MessageType, Reply, Request, Status

SERVER_PORT, CLIENT_PORT, PXE_PORT = 547, 546, 4011
PREFERENCE_MAX = 255
_STATEFUL_ONLY = frozenset({MessageType.CONFIRM, MessageType.RENEW, MessageType.REBIND, MessageType.RELEASE,
                            MessageType.DECLINE})


@dataclass(slots=True)
class Arrival:
    """One datagram and where it came in: its source, the interface, and our addresses there."""

    data: bytes
    source: str  # the sender's address (a client's link-local one, or a relay's)
    ifindex: int
    server: str | None  # our global address on that interface (None: it has none)
    networks: tuple[IPv6Network, ...] = ()  # the prefixes of our addresses on that interface
    port: int = SERVER_PORT  # the local port: 547, or 4011 (EDK2's boot server discovery, stateless mode)
    source_port: int = CLIENT_PORT


@dataclass(slots=True)
class Answer:
    data: bytes
    dest: tuple[str, int, int, int]  # address, port, flow info, scope (the interface, for a link-local address)
    line: str  # the log line
    durable_first: bool = False  # a lease granted: sent only once the store has made it durable
    claims: tuple[tuple[str, str], ...] = ()  # with a shared store, the (key, address) pairs it claims


@dataclass(frozen=True)
class Ignored:
    """A message that gets no answer, and why (logged once per client and reason)."""

    who: str
    reason: str


@dataclass
class Responder:
    offerings: Callable[[], boot.Offerings]
    machines: Callable[[], Machines]
    duid: bytes  # our DUID (option 2)
    leases: Leases6 | None = None  # None: stateless mode
    clock: Callable[[], float] = time.time
    seen: Callable[[str, boot.Client, int], None] | None = None  # (MAC, client, ifindex) of boot clients answered
    _server_id: bytes = field(default=b"", init=False, repr=False)
    _links: dict[tuple[IPv6Network, ...], bool] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._server_id = message.option(message.SERVERID, self.duid)

    def handle(self, arrival: Arrival) -> Answer | Ignored | None:
        """The answer to one datagram; raises message.Malformed for anything that is not a valid message.
        Leases change only once the answer is built (an address advertised is held at once: an offer lapses)."""
        request = message.parse(arrival.data)
        kind = request.type
        client = boot.classify(request)  # type: ignore[arg-type]  # reads arches, vendor_class, user_class
        if request.client_id is None and kind != MessageType.INFORMATION_REQUEST:
            raise message.Malformed(f"{kind.name} without a client identifier (option 1)")
        if arrival.port == PXE_PORT:
            # Boot server discovery: EDK2 copies its Request to the site's server, server identifier and all.
            if self.leases is not None or arrival.server is None:
                return None
            mac = machine_mac(request, arrival.source)
            return self._stateless(request, client, arrival, mac, mac or f"duid:{(request.client_id or b'').hex()}")
        if kind in (MessageType.SOLICIT, MessageType.CONFIRM, MessageType.REBIND) and request.server_id:
            raise message.Malformed(f"{kind.name} with a server identifier (RFC 8415 §16)")
        if request.server_id is not None and request.server_id != self.duid:
            if self.leases is not None and kind == MessageType.REQUEST:
                for ia in request.ias:  # it chose another server's advertisement
                    self.leases.forget_offer(key_of(request.client_id or b"", ia.iaid))
            return None
        if kind in (MessageType.REQUEST, MessageType.RENEW, MessageType.RELEASE, MessageType.DECLINE) and (
                request.server_id is None):
            raise message.Malformed(f"{kind.name} without a server identifier (RFC 8415 §16)")
        mac = machine_mac(request, arrival.source)
        who = mac or f"duid:{(request.client_id or b'').hex()[:40] or '-'}"
        if arrival.server is None:
            return Ignored(who, f"interface {arrival.ifindex} has no global IPv6 address to name in boot URLs")
        if self.leases is None:
            return self._stateless(request, client, arrival, mac, who)
        if not self._on_link(request, arrival):
            return None  # another link's client
        return self._stateful(request, client, arrival, mac, who)

    def _on_link(self, request: Request, arrival: Arrival) -> bool:
        """Is the range on the client's link: the arrival interface's, or the innermost relay's link-address?"""
        assert self.leases is not None
        pool = self.leases.pool
        if request.relays:
            link = IPv6Address(request.relays[-1].link_address)
            return any(link in net and pool.on_link(net) for net in arrival.networks) or (
                link.is_unspecified and any(pool.on_link(net) for net in arrival.networks))
        known = self._links.get(arrival.networks)
        if known is None:
            if len(self._links) >= 256:
                self._links.clear()
            known = self._links[arrival.networks] = any(pool.on_link(net) for net in arrival.networks)
        return known

    # Stateless mode

    def _stateless(self, request: Request, client: boot.Client, arrival: Arrival, mac: str | None,
                   who: str) -> Answer | Ignored | None:
        kind = request.type
        if not client.firmware:
            return None  # not booting from the network: never disturb it
        discovery = arrival.port == PXE_PORT
        # EDK2's PXE over IPv6 asks for an address (IA_NA) and takes the boot file from another server's
        # Advertise that has none, vendor class PXEClient and option 59 (its "ProxyBinl" offer,
        # NetworkPkg/UefiPxeBcDxe/PxeBcDhcp6.c), then asks that server again on port 4011, copying its Solicit's
        # options but the IAs: the IPv6 twin of proxy DHCP. iPXE ignores an Advertise without an address.
        proxy = kind == MessageType.SOLICIT and client.firmware == boot.PXE and bool(request.ias)
        if not discovery and not proxy and (kind in _STATEFUL_ONLY or request.ias or request.other_ias):
            return None  # an address: the site server's business
        found = self._boot_file(client, arrival, mac)
        if isinstance(found, str):
            return Ignored(who, found)
        answered = MessageType.ADVERTISE if kind == MessageType.SOLICIT and not discovery else MessageType.REPLY
        reply = Reply(request, answered)
        self._identify(reply)
        if proxy or discovery:
            reply.options.append(message.vendor_class(343, found.vendor_class.encode()))
        self._boot_options(reply, found)
        return self._answer(reply, client, arrival, mac, who, "-", found)

    # Stateful mode

    def _stateful(self, request: Request, client: boot.Client, arrival: Arrival, mac: str | None,
                  who: str) -> Answer | Ignored | None:
        leases = self.leases
        assert leases is not None
        now = self.clock()
        leases.prune(now)
        kind = request.type
        duid = request.client_id or b""
        t1, t2, lifetime = leases.pool.times
        found = self._boot_file(client, arrival, mac) if client.firmware else None
        ias: list[bytes] = []
        granted: list[tuple[str, str]] = []  # (key, ip) committed once the answer is built
        held: list[tuple[str, str]] = []  # (key, ip) advertised
        released: list[tuple[str, str]] = []
        shown: list[str] = []
        top_status = b""
        if kind in (MessageType.SOLICIT, MessageType.REQUEST):
            commit = kind == MessageType.REQUEST or request.rapid_commit
            for ia in request.ias:
                key = key_of(duid, ia.iaid)
                ip = leases.pick(key, ia.addresses, now)
                if ip is None:
                    ias.append(message.ia_na(ia.iaid, 0, 0, status_code=message.status(
                        Status.NO_ADDRS_AVAIL, "no free address left")))
                    continue
                # Held at once, so that a client's next IA gets another address; a hold is only an offer for a
                # minute, which an answer that cannot be built leaves to lapse.
                leases.hold(key, ip, now)
                (granted if commit else held).append((key, ip))
                ias.append(message.ia_na(ia.iaid, t1, t2, ((ip, lifetime, lifetime),)))
                shown.append(ip)
            if request.ias and not shown and kind == MessageType.SOLICIT:
                # RFC 8415 §18.3.9: an Advertise with only the status NoAddrsAvail (a Rapid Commit Reply keeps
                # its IAs, each with the status).
                full = f" (no free address left in {leases.pool.first}-{leases.pool.last})"
                if not request.rapid_commit:
                    reply = Reply(request, MessageType.ADVERTISE)
                    self._identify(reply)
                    reply.options.append(message.status(Status.NO_ADDRS_AVAIL, "no free address left"))
                    return self._answer(reply, client, arrival, mac, who, "-", None, full)
        elif kind in (MessageType.RENEW, MessageType.REBIND):
            for ia in request.ias:
                key = key_of(duid, ia.iaid)
                lease = leases.lease_of(key, now)
                entries = []
                for ip in ia.addresses:
                    if (lease is not None and lease.ip == ip) or leases.free_for(key, ip, now):
                        granted.append((key, to_text(to_int(ip))))
                        entries.append((ip, lifetime, lifetime))
                        shown.append(ip)
                    else:
                        # §18.3.4, §18.3.5: an address not for this client: lifetimes 0, so that it stops using it.
                        entries.append((ip, 0, 0))
                if not ia.addresses and lease is not None:
                    granted.append((key, lease.ip))
                    entries.append((lease.ip, lifetime, lifetime))
                    shown.append(lease.ip)
                if entries:
                    ias.append(message.ia_na(ia.iaid, t1, t2, tuple(entries)))
                elif kind == MessageType.RENEW:
                    ias.append(message.ia_na(ia.iaid, 0, 0, status_code=message.status(Status.NO_BINDING)))
            if kind == MessageType.REBIND and not ias:
                return None  # §18.3.5: no binding and nothing to say of its addresses
        elif kind == MessageType.CONFIRM:
            addresses = [ip for ia in request.ias for ip in ia.addresses]
            if not addresses:
                return None  # §18.3.3
            ok = all(leases.in_range(ip) for ip in addresses)
            top_status = message.status(Status.SUCCESS if ok else Status.NOT_ON_LINK)
        elif kind in (MessageType.RELEASE, MessageType.DECLINE):
            for ia in request.ias:
                key = key_of(duid, ia.iaid)
                for ip in ia.addresses:
                    if leases.holds(key, ip, now):
                        released.append((key, ip))
                    else:
                        ias.append(message.ia_na(ia.iaid, 0, 0, status_code=message.status(Status.NO_BINDING)))
            top_status = message.status(Status.SUCCESS)
        elif kind == MessageType.INFORMATION_REQUEST:
            pass
        else:
            return None
        committed = bool(granted)
        rapid = kind == MessageType.SOLICIT and request.rapid_commit
        reply = Reply(request, MessageType.ADVERTISE if kind == MessageType.SOLICIT and not rapid
                      else MessageType.REPLY)
        reply.options.extend(ias)
        self._identify(reply)
        if reply.type == MessageType.ADVERTISE:
            reply.options.append(message.option(message.PREFERENCE, bytes((PREFERENCE_MAX,))))
        if rapid:
            reply.options.append(message.option(message.RAPID_COMMIT, b""))
        if top_status:
            reply.options.append(top_status)
        boot_file = found if isinstance(found, boot.BootFile) else None
        if boot_file is not None and kind not in (MessageType.RELEASE, MessageType.DECLINE, MessageType.CONFIRM):
            self._boot_options(reply, boot_file)
        note = f" ({found})" if isinstance(found, str) and "refused" in found else ""
        # With a shared store an advertisement is a claim as well, which another server may win.
        claims = tuple(granted + held) if leases.shared is not None else ()
        durable = committed or bool(claims) or (bool(released) and kind == MessageType.DECLINE)
        answer = self._answer(reply, client, arrival, mac, who, ",".join(shown) or "-", boot_file, note, durable)
        answer.claims = claims
        # Only now that the answer is built: what it tells the client.
        for key, ip in granted:
            leases.commit(key, ip, now)
        for key, ip in released:
            if kind == MessageType.RELEASE:
                leases.release(key, ip, now)
            else:
                leases.decline(key, ip, now)
        return answer

    # Pieces of answers

    def _boot_file(self, client: boot.Client, arrival: Arrival, mac: str | None) -> boot.BootFile | str:
        machines = self.machines()
        machine = machines.machines.get(mac) if mac is not None else None
        return boot_file_of(machines, machine, self.offerings(), client, f"[{arrival.server}]")

    def _identify(self, reply: Reply) -> None:
        reply.options.append(self._server_id)
        if reply.request.client_id is not None:
            reply.options.append(message.option(message.CLIENTID, reply.request.client_id))

    @staticmethod
    def _boot_options(reply: Reply, found: boot.BootFile) -> None:
        if found.vendor_class == boot.HTTP and not any(o[:2] == b"\0\x10" for o in reply.options):
            # UEFI HTTP Boot takes only an answer that says HTTPClient (UEFI 2.5 §24.7.3).
            reply.options.append(message.vendor_class(343, boot.HTTP.encode()))
        reply.options.append(message.option(message.BOOTFILE_URL, boot_url(found).encode()))

    def _answer(self, reply: Reply, client: boot.Client, arrival: Arrival, mac: str | None, who: str,
                address: str, found: boot.BootFile | None, note: str = "", durable_first: bool = False) -> Answer:
        data = reply.encode()  # first: a reply that cannot be built tells nobody it was seen
        if self.seen is not None and client.firmware and mac is not None:
            self.seen(mac, client, arrival.ifindex)
        relayed = bool(reply.request.relays)
        # RFC 8415 §18.3.10, §19: to the client's port 546 at its (link-local) source, or to the relay's port 547;
        # boot server discovery on port 4011: back where it came from.
        port = arrival.source_port if arrival.port == PXE_PORT else SERVER_PORT if relayed else CLIENT_PORT
        dest = (arrival.source, port, 0, arrival.ifindex if _link_local(arrival.source) else 0)
        shown = boot_url(found) if found is not None else "-"
        line = f"{who} {client.kind} {reply.type.name} address={address} boot={shown}{note}"
        return Answer(data, dest, line, durable_first)


def boot_url(found: boot.BootFile) -> str:
    """Option 59: a URL, for TFTP too (RFC 5970 §3.1; an IPv6 literal bracketed, RFC 3986 §3.2.2)."""
    return found.name if "://" in found.name else f"tftp://{found.server}/{found.name}"


def machine_mac(request: Request, source: str) -> str | None:
    """The client's MAC: from its DUID, else its link-local address's EUI-64, else a relay's option 79."""
    duid = request.client_id or b""
    if len(duid) >= 4:
        duid_type, hw_type = struct.unpack_from("!HH", duid)
        ll = duid[8:] if duid_type == 1 else duid[4:] if duid_type == 3 else b""
        if hw_type == 1 and len(ll) == 6 and duid_type in (1, 3):
            return ll.hex(":")
    peer = request.relays[-1].peer_address if request.relays else source
    mac = eui64_mac(peer)
    if mac is not None:
        return mac
    for relay in reversed(request.relays):
        if relay.link_layer[:2] == b"\x00\x01" and len(relay.link_layer) == 8:
            return relay.link_layer[2:].hex(":")
    return None


def _link_local(address: str) -> bool:
    """In fe80::/10 (RFC 4291 §2.5.6)."""
    raw = message.packed(address)
    return raw[0] == 0xFE and raw[1] & 0xC0 == 0x80


def eui64_mac(address: str) -> str | None:
    """fe80::5054:ff:fe12:3456 → 52:54:00:12:34:56 (the U/L bit flipped back, RFC 4291 appendix A)."""
    try:
        ip = IPv6Address(address.partition("%")[0])
    except ValueError:
        return None
    raw = ip.packed
    if not ip.is_link_local or raw[11:13] != b"\xff\xfe":
        return None
    return bytes((raw[8] ^ 0x02, *raw[9:11], *raw[13:16])).hex(":")
