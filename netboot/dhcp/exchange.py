"""What to answer a DHCP request: a pure function of the datagram, where it arrived, the machines and the leases.

Proxy mode (PXE 2.1 §2.2.5, "proxyDHCP"): a site DHCP server hands out addresses; netboot answers only
network-boot clients it has a profile for, never with an address. On port 67 it answers a DISCOVER with an
OFFER carrying just the boot information (yiaddr 0.0.0.0, option 60 `PXEClient`); a client then may ask again
on port 4011 with a REQUEST (boot server discovery) and gets the same as an ACK. PXE firmware and iPXE get option
43 with PXE_DISCOVERY_CONTROL = 8 (boot the file named, no discovery), as from pixiecore: EDK2 then boots
without the round trip to port 4011 it makes for an offer without option 43 (its "BINL" path), which measured
about a second of its boot. Firmware that asks on port 4011 anyway gets the same answer there.

Authoritative mode (RFC 2131): addresses from a range, reservations from the machines file, every client
answered; network-boot clients get their boot file in the same answer, as from any DHCP server configured for
PXE (no option 60 `PXEClient`, which would send EDK2 to a port 4011 that this mode does not serve).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from typing import Any

from pyroute2.dhcp.enums.dhcp import MessageType

from netboot.core.machines import DEFAULT, Machine, Machines, ipxe_binary
from netboot.dhcp import boot, message
from netboot.dhcp.leases import Leases
from netboot.dhcp.message import ZERO, Malformed, Reply, Request

SERVER_PORT, CLIENT_PORT, PXE_PORT = 67, 68, 4011
BROADCAST = "255.255.255.255"
DISCOVERY_CONTROL_BOOT_FILE = bytes([6, 1, 8, 255])  # PXE option 43: sub-option 6 = 8 (use the boot file), END
IPXE_NO_PXEDHCP = bytes([176, 1, 1])  # in iPXE's option 175: sub-option 176 (no-pxedhcp), 1 byte, = 1
TFTP_SERVER_NAME, BOOTFILE_NAME = 66, 67


@dataclass(slots=True)  # not frozen: made for every datagram, and a frozen dataclass is slow to make
class Arrival:
    """One datagram and where it came in: the local port, the interface, and our address there."""

    data: bytes
    source: tuple[str, int]
    port: int
    ifindex: int
    server: IPv4Interface | None  # our address on that interface (None: the interface has no IPv4 address)
    address: str = ""  # the same as text (the server identifier); made from `server` when not given

    def __post_init__(self) -> None:
        if not self.address:
            self.address = str(self.server.ip) if self.server is not None else ZERO


@dataclass(slots=True)  # not frozen: made for every answer, and a frozen dataclass is slow to make
class Answer:
    data: bytes
    dest: tuple[str, int]
    ifindex: int  # the interface a broadcast leaves by; 0 to route by destination
    line: str  # the log line: MAC, client kind, message, address, boot file
    durable_first: bool = False  # an ACK: sent only once the lease store has made the lease durable
    claim: tuple[str, str] | None = None  # with a shared store, the (MAC, address) an OFFER or ACK claims


@dataclass(frozen=True)
class Ignored:
    """A request that gets no answer, and why (logged once per machine and reason)."""

    mac: str
    reason: str


@dataclass
class Responder:
    offerings: Callable[[], boot.Offerings]
    machines: Callable[[], Machines]
    leases: Leases | None = None  # None: proxy mode
    clock: Callable[[], float] = time.time
    # Told of every network-boot client answered: its MAC, what it is, the interface its request came in on.
    seen: Callable[[str, boot.Client, int], None] | None = None
    relays: frozenset[str] = frozenset()  # giaddr values honoured from any sender (--dhcp-relay)
    _reserved_of: Machines | None = field(default=None, init=False, repr=False)
    _reserved: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def reservations(self) -> dict[str, str]:
        """MAC -> address, from the machines file's `ip = …` (checked against the pool when it is loaded); the
        same dict while the machines file is the same, so that the leases follow a change at once and only then."""
        machines = self.machines()
        if machines is not self._reserved_of:
            self._reserved = {m.mac: m.ip for m in machines.machines.values() if m.ip}
            self._reserved_of = machines
        return self._reserved

    @property
    def proxy(self) -> bool:
        return self.leases is None

    def handle(self, arrival: Arrival) -> Answer | Ignored | None:
        """The answer to one datagram; raises message.Malformed for anything that is not a valid request.

        What a request asks for (an offer held, a lease granted, its client seen) happens only once its answer
        is built: a request that raises, Malformed or by a bug, leaves the leases as they were."""
        request = message.parse(arrival.data)
        client = boot.classify(request)
        if request.giaddr != ZERO and request.giaddr != arrival.source[0] and request.giaddr not in self.relays:
            # Answers go to giaddr, port 67 (RFC 2131 §4.1): a giaddr that is neither its sender's address nor a
            # relay the operator named would aim them at any host. A relay that sends from another of its addresses
            # than the one it writes, as routers do, is one to name (--dhcp-relay).
            raise Malformed(f"giaddr {request.giaddr} is neither the sender's address nor a --dhcp-relay")
        if request.type == MessageType.DISCOVER and request.ciaddr != ZERO:
            # RFC 2131 §4.4.1 (Table 5): ciaddr is 0 in a DISCOVER, the client (INIT state) having no address to
            # be reached at, so a non-zero one names nobody to send to. Answered as if it were 0, by broadcast on
            # the link (or to the relay) with ciaddr 0 in the OFFER (Table 3), rather than dropped: a broadcast
            # reaches the client wherever the field points, and goes nowhere else.
            request.ciaddr = ZERO
        if arrival.server is None:
            return Ignored(request.mac, f"interface {arrival.ifindex} has no IPv4 address to answer from")
        if self.proxy:
            return self._proxy(request, client, arrival)
        if arrival.port != SERVER_PORT:
            return None
        return self._authoritative(request, client, arrival)

    # Proxy mode

    def _proxy(self, request: Request, client: boot.Client, arrival: Arrival) -> Answer | Ignored | None:
        if arrival.port == SERVER_PORT and request.type != MessageType.DISCOVER:
            return None  # the site server's business
        if arrival.port == PXE_PORT and request.type not in (MessageType.REQUEST, MessageType.INFORM):
            return None
        if not client.firmware:
            return None  # not booting from the network: never disturb it
        server = arrival.address
        found = self._boot_file(request, client, server)
        if isinstance(found, Ignored):
            return found
        options: dict[str, Any] = {"server_id": server, "vendor_id": found.vendor_class}
        if request.uuid is not None:
            options["pxe_client_id"] = request.uuid
        if client.firmware in (boot.IPXE, boot.PXE):
            options["vendor_specific_information"] = DISCOVERY_CONTROL_BOOT_FILE
        _boot_options(options, request, found)
        kind = MessageType.OFFER if arrival.port == SERVER_PORT else MessageType.ACK
        reply = Reply(request, kind, siaddr=found.server, sname=found.server if found.over_tftp else "",
                      file=found.name, options=options)
        if arrival.port == PXE_PORT:
            # Back where the request came from (PXE 2.1: the client asks port 4011 from its address), never to
            # its ciaddr, which a datagram can fill with any address.
            dest = arrival.source if arrival.source[0] != ZERO else (BROADCAST, CLIENT_PORT)
            return self._answer(reply, client, dest, arrival.ifindex, request.ciaddr)
        return self._answer(reply, client, _destination(request, kind), arrival.ifindex, "-")

    def _boot_file(self, request: Request, client: boot.Client, server: str) -> boot.BootFile | Ignored:
        machines = self.machines()
        found = boot_file_of(machines, _machine(machines, request), self.offerings(), client, server)
        return Ignored(request.mac, found) if isinstance(found, str) else found

    # Authoritative mode

    def _authoritative(self, request: Request, client: boot.Client, arrival: Arrival) -> Answer | Ignored | None:
        leases = self.leases
        assert leases is not None and arrival.server is not None
        pool = leases.pool
        if not leases.in_subnet(request.giaddr if request.giaddr != ZERO else arrival.address):
            return None  # another subnet's request
        now = self.clock()
        leases.prune(now)
        mac = request.mac
        reserved = self.reservations
        kind = request.type
        if kind == MessageType.DISCOVER:
            ip = leases.pick(mac, request.requested_ip, now, reserved)
            if ip is None:
                return Ignored(mac, f"no free address left in {pool.first}-{pool.last}")
            offer = self._lease_reply(request, client, arrival, MessageType.OFFER, ip, now)
            leases.hold(mac, ip, now, request.client_id)  # only once the OFFER is built
            return offer
        if kind == MessageType.REQUEST:
            if request.server_id is not None and request.server_id != arrival.address:
                leases.forget_offer(mac)  # it chose another server
                return None
            ip = request.requested_ip or (request.ciaddr if request.ciaddr != ZERO else None)
            if ip is None:
                return None
            in_range = leases.in_range(ip) or reserved.get(mac) == ip
            if not (in_range and leases.free_for(mac, ip, now, reserved)):
                # Authoritative for its subnet: a client asking for an address it may not have is told at once
                # rather than left to time out (RFC 2131 §4.3.2, as dnsmasq's dhcp-authoritative).
                return self._nak(request, client, arrival, f"{ip} is not available to it")
            return self._lease_reply(request, client, arrival, MessageType.ACK, ip, now)
        if kind == MessageType.DECLINE:
            if request.server_id != arrival.address or not request.requested_ip:
                return None
            if not leases.decline(mac, request.requested_ip, now, request.client_id):
                return Ignored(mac, f"DECLINE of {request.requested_ip}, which is not its offer or lease: dropped")
            return Ignored(mac, f"declined {request.requested_ip}: in use by another host; set aside")
        if kind == MessageType.RELEASE:
            if request.ciaddr != ZERO and not leases.release(mac, request.ciaddr, now, request.client_id):
                return Ignored(mac, f"RELEASE of {request.ciaddr}, which is not its lease: dropped")
            return None
        if kind == MessageType.INFORM:
            return self._lease_reply(request, client, arrival, MessageType.ACK, None, now)
        return None

    def _lease_reply(self, request: Request, client: boot.Client, arrival: Arrival, kind: MessageType,
                     ip: str | None, now: float) -> Answer:
        """An OFFER or ACK with `ip` (None: an ACK to an INFORM); an ACK of an address commits its lease, once the
        answer is built."""
        leases = self.leases
        assert leases is not None and arrival.server is not None
        pool = leases.pool
        server = arrival.address
        options: dict[str, Any] = {"server_id": server}
        options.update(pool.lease_options if ip is not None else pool.subnet_options)
        machine = _machine(self.machines(), request)
        if machine is not None and machine.hostname:
            options["host_name"] = machine.hostname
        reply = Reply(request, kind, yiaddr=ip or ZERO, options=options)
        note = ""
        if client.firmware:
            found_file = self._boot_file(request, client, server)
            if isinstance(found_file, Ignored) and _REFUSED in found_file.reason:
                note = f" ({found_file.reason.partition(': ')[2]})"  # an address, and why no boot file
            if isinstance(found_file, boot.BootFile):
                reply.siaddr, reply.file = found_file.server, found_file.name
                if found_file.vendor_class == boot.HTTP:
                    options["vendor_id"] = boot.HTTP
                _boot_options(options, request, found_file)
        if client.firmware == boot.IPXE:
            # After an OFFER, iPXE waits for ProxyDHCP offers until DHCP_DISC_PROXY_TIMEOUT_SEC (2 s) have passed,
            # which it notices at its next retransmission (3 s, measured), unless the OFFER says no-pxedhcp (its
            # include/ipxe/dhcp.h: DHCP_EB_NO_PXEDHCP, 175.176). This server hands out the address and the boot
            # file both: there is nothing to wait for. (A proxy cannot say it: iPXE reads it from the offer that
            # gives the address.)
            options["ipxe_encapsulated"] = IPXE_NO_PXEDHCP
        if request.relay_info is not None:
            options["relay_agent_information"] = request.relay_info
        committed = ip is not None and kind == MessageType.ACK
        # RFC 2131 §4.1 unicasts to ciaddr, which any datagram can fill: only an address leased to this client
        # (the one this ACK leases, or its lease when it INFORMs) is sent to; anything else is broadcast on the link.
        ciaddr = request.ciaddr
        unicast = ciaddr != ZERO and (ciaddr == ip if committed else leases.leased_to(request.mac, ciaddr, now))
        # With a shared store an offer is a claim as well, which another server may win (lease_database).
        claimed = ip is not None and leases.shared is not None
        answer = self._answer(reply, client, _destination(request, kind, unicast), arrival.ifindex, ip or "-", note,
                              durable_first=committed or claimed)
        if claimed:
            answer.claim = (request.mac, ip)
        if committed:
            leases.commit(request.mac, ip, now, options.get("host_name", ""), request.client_id)
        return answer

    def _nak(self, request: Request, client: boot.Client, arrival: Arrival, why: str) -> Answer:
        assert arrival.server is not None
        reply = Reply(request, MessageType.NAK, options={"server_id": arrival.address, "message": why})
        return self._answer(reply, client, _destination(request, MessageType.NAK), arrival.ifindex, "-",
                            note=f" ({why})")

    def _answer(self, reply: Reply, client: boot.Client, dest: tuple[str, int], ifindex: int, address: str,
                note: str = "", durable_first: bool = False) -> Answer:
        data = reply.encode()  # first: a reply that cannot be built tells nobody it was seen
        if self.seen is not None and client.firmware:
            self.seen(reply.request.mac, client, ifindex)
        shown = reply.file if not reply.file or "://" in reply.file else f"tftp://{reply.siaddr}/{reply.file}"
        line = (f"{reply.request.mac} {client.kind} {reply.type.name} address={address} "
                f"boot={shown or '-'}{note}")
        return Answer(data, dest, ifindex if dest[0] == BROADCAST else 0, line, durable_first)


def _machine(machines: Machines, request: Request) -> Machine | None:
    """The machine's table: by its MAC, else by the SMBIOS UUID in its option 97."""
    machine = machines.machines.get(request.mac)
    if machine is None and machines.by_uuid:
        machine = next(filter(None, (machines.find(request.mac, u) for u in boot.client_uuids(request.uuid))), None)
    return machine


_REFUSED = "refused"  # a machine whose profile has no build for its architecture


def boot_file_of(machines: Machines, machine: Machine | None, offerings: boot.Offerings, client: boot.Client,
                 server: str) -> boot.BootFile | str:
    """The boot file of `machine` (None: not in the machines file, so the default profile's) for `client`, from
    `server` (our address as the client sees it), or why it gets none. DHCPv6 (netboot.dhcp6) asks here too."""
    found_profile = machines.profiles[machine.profile] if machine is not None else machines.profiles.get(DEFAULT)
    if found_profile is None:
        return "not in the machines file, and there is no default profile"
    profile = machines.for_arch(found_profile, client.machine)
    built = offerings.arches.get(profile.name)
    if client.machine is not None and built is not None and built != client.machine:
        # Never boot a machine into a kernel its CPU cannot run: it would hang where nobody sees why.
        return f"{client.kind}: {_REFUSED}: profile {profile.name} is for {built}, and this machine is {client.machine}"
    found = offerings.boot_file(client, server, profile.loader, ipxe_binary(profile, machine))
    return f"{client.kind}: {found}" if isinstance(found, str) else found


def _boot_options(options: dict[str, Any], request: Request, found: boot.BootFile) -> None:
    """Options 66 and 67 too, for firmware that asks for them rather than reading siaddr and file (as dnsmasq)."""
    if TFTP_SERVER_NAME in request.params and found.over_tftp:
        options["tftp_server_name"] = found.server
    if BOOTFILE_NAME in request.params:
        options["bootfile_name"] = found.name


def _destination(request: Request, kind: MessageType, unicast: bool = False) -> tuple[str, int]:
    """RFC 2131 §4.1: to the relay (a giaddr `handle` let through); a NAK broadcast; to the client at its ciaddr
    when `unicast` (that address is known to be its own); else broadcast on the link."""
    if request.giaddr != ZERO:
        return request.giaddr, SERVER_PORT
    if unicast and kind != MessageType.NAK:
        return request.ciaddr, CLIENT_PORT
    return BROADCAST, CLIENT_PORT
