"""Every answer the DHCP server gives, as a pure function: datagram in, datagram out, no sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from dhcp_support import (
    ACK,
    DECLINE,
    DISCOVER,
    INFORM,
    IPXE_UEFI_VENDOR,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    UUID,
    bios,
    edk2,
    http_boot,
    ip,
    ipxe,
    parse_reply,
    plain,
    request,
)

from netboot.core.machines import Machine, Machines, Profile
from netboot.dhcp import boot, message
from netboot.dhcp.boot import Offerings
from netboot.dhcp.exchange import Answer, Arrival, Ignored, Responder
from netboot.dhcp.journal import Journal
from netboot.dhcp.leases import Leases, Pool
from netboot.dhcp.message import Malformed
from netboot.dhcp.server import DhcpServer

SERVER = IPv4Interface("192.0.2.10/24")
NODE1, NODE2, STRANGER = "52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:09:09"
ALL = frozenset({"undionly.kpxe", "ipxe.efi", "snponly.efi"})


def fleet(default: bool = True, **extra: Machine) -> Machines:
    profiles = {"squash": Profile("squash", Path("/out/squash"))}
    if default:
        profiles["default"] = Profile("default", Path("/out/direct"))
    machines = {NODE1: Machine(NODE1, "squash", ip="192.0.2.42", hostname="node1"),
                NODE2: Machine(NODE2, "squash"), **extra}
    return Machines(profiles, machines)


def responder(machines: Machines, leases: Leases | None = None, relays: frozenset[str] = frozenset(),
              **offer) -> Responder:
    offerings = Offerings(**{"binaries": ALL, "http_port": 8080, "tftp": True, **offer})
    clock = [1_000_000.0]
    r = Responder(lambda: offerings, lambda: machines, leases, clock=lambda: clock[0], relays=relays)
    r.now = clock  # type: ignore[attr-defined]
    return r


def arrive(r: Responder, data: bytes, port: int = 67, source: tuple[str, int] = ("0.0.0.0", 68)):
    return r.handle(Arrival(data, source, port, 7, SERVER))


def answer(r: Responder, data: bytes, **kw):
    result = arrive(r, data, **kw)
    assert isinstance(result, Answer), result
    return parse_reply(result.data), result


# Proxy mode

@pytest.mark.parametrize(("datagram", "file", "vendor", "option43"), [
    (edk2(mac=NODE1), "ipxe.efi", "PXEClient", True),
    (bios(mac=NODE1), "undionly.kpxe", "PXEClient", True),
    (ipxe(mac=NODE1), "http://192.0.2.10:8080/boot.ipxe", "PXEClient", True),
    (ipxe(mac=NODE1, arch=0), "http://192.0.2.10:8080/boot.ipxe", "PXEClient", True),
    (http_boot(mac=NODE1), "http://192.0.2.10:8080/ipxe.efi", "HTTPClient", False),
])
def test_proxy_offer_by_client_kind(datagram: bytes, file: str, vendor: str, option43: bool) -> None:
    reply, sent = answer(responder(fleet()), datagram)
    assert reply.type == OFFER and reply.yiaddr == "0.0.0.0"  # never an address
    assert reply.file == file and reply.siaddr == "192.0.2.10"
    assert reply.address(54) == "192.0.2.10" and reply.text(60) == vendor
    assert (43 in reply.options) == option43
    if option43:
        assert reply.options[43] == bytes([6, 1, 8, 255])
    assert sent.dest == ("255.255.255.255", 68) and sent.ifindex == 7
    assert NODE1 in sent.line and "OFFER" in sent.line and file.rsplit("/", 1)[-1] in sent.line


def test_proxy_echoes_the_guid_and_answers_options_66_67_when_asked() -> None:
    reply, _ = answer(responder(fleet()), edk2(mac=NODE2))
    assert reply.options[97] == UUID
    assert reply.text(66) == "192.0.2.10" and reply.text(67) == "ipxe.efi"
    assert 51 not in reply.options and 1 not in reply.options  # nothing of a lease


def test_proxy_never_disturbs_other_clients() -> None:
    r = responder(fleet())
    assert arrive(r, plain(mac=NODE1)) is None
    for kind in (REQUEST, DECLINE, RELEASE, INFORM):
        assert arrive(r, edk2(kind, mac=NODE1)) is None  # the site server's business


def test_proxy_answers_boot_server_discovery_on_4011_to_the_client() -> None:
    r = responder(fleet())
    reply, sent = answer(r, edk2(REQUEST, mac=NODE1, ciaddr="192.0.2.150", flags=0), port=4011,
                         source=("192.0.2.150", 68))
    assert reply.type == ACK and reply.file == "ipxe.efi" and reply.siaddr == "192.0.2.10"
    assert reply.yiaddr == "0.0.0.0" and reply.ciaddr == "192.0.2.150"
    assert reply.text(60) == "PXEClient" and reply.options[97] == UUID
    assert sent.dest == ("192.0.2.150", 68) and sent.ifindex == 0
    assert "address=192.0.2.150" in sent.line
    assert arrive(r, edk2(DISCOVER, mac=NODE1), port=4011) is None


def test_proxy_ignores_machines_it_would_not_boot() -> None:
    r = responder(fleet(default=False))
    result = arrive(r, edk2(mac=STRANGER))
    assert isinstance(result, Ignored) and "machines file" in result.reason
    assert isinstance(answer(r, edk2(mac=NODE2))[1], Answer)
    assert isinstance(answer(responder(fleet()), edk2(mac=STRANGER))[1], Answer)  # the default profile


@pytest.mark.parametrize(("datagram", "offer", "why"), [
    (bios(), {"tftp": False}, "TFTP on port 69"),
    (edk2(), {"binaries": frozenset({"undionly.kpxe"})}, "ipxe.efi is not installed"),
    (http_boot(), {"binaries": frozenset()}, "ipxe.efi is not installed"),
])
def test_a_client_that_cannot_be_booted_is_not_answered(datagram: bytes, offer: dict, why: str) -> None:
    result = arrive(responder(fleet(), **offer), datagram)
    assert isinstance(result, Ignored) and why in result.reason


def test_unknown_architecture_is_not_answered() -> None:
    from dhcp_support import request
    arm = request(DISCOVER, options=[(93, b"\x00\x0b"), (60, b"PXEClient:Arch:00011:UNDI:003000")])
    result = arrive(responder(fleet()), arm)
    assert isinstance(result, Ignored) and "uefi-arm64-pxe" in result.reason


def test_snponly_and_fixed_addresses() -> None:
    r = responder(fleet(), uefi_binary="snponly.efi", http_host="198.51.100.1", tftp_host="198.51.100.2")
    assert answer(r, edk2())[0].file == "snponly.efi"
    assert answer(r, edk2())[0].siaddr == "198.51.100.2"
    assert answer(r, ipxe())[0].file == "http://198.51.100.1:8080/boot.ipxe"


def test_relayed_request_goes_back_to_the_relay() -> None:
    reply, sent = answer(responder(fleet()), edk2(mac=NODE1, giaddr="192.0.2.1"), source=("192.0.2.1", 67))
    assert sent.dest == ("192.0.2.1", 67) and reply.giaddr == "192.0.2.1"


def test_no_ipv4_address_on_the_interface() -> None:
    result = responder(fleet()).handle(Arrival(edk2(), ("0.0.0.0", 68), 67, 3, None))
    assert isinstance(result, Ignored)


# Authoritative mode

@pytest.fixture
def leases(tmp_path: Path):
    pool = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.103"), IPv4Network("192.0.2.0/24"),
                lease_time=600, router=IPv4Address("192.0.2.1"), dns=(IPv4Address("192.0.2.1"),),
                domain="lab.example", excluded=frozenset({IPv4Address("192.0.2.10"), IPv4Address("192.0.2.1")}))
    state = Journal(tmp_path)
    yield Leases(pool, state)
    state.close()


def dora(r: Responder, datagram, mac: str) -> tuple[str, object]:
    """DISCOVER, OFFER, REQUEST, ACK; returns the address and the ACK."""
    offer, _ = answer(r, datagram(DISCOVER, mac=mac))
    assert offer.type == OFFER, offer
    ack, _sent = answer(r, datagram(REQUEST, mac=mac, extra=[(50, ip(offer.yiaddr)), (54, ip("192.0.2.10"))]))
    assert ack.type == ACK and ack.yiaddr == offer.yiaddr
    return ack.yiaddr, ack


def test_authoritative_reserved_machine_and_range(leases: Leases) -> None:
    r = responder(fleet(), leases)
    address, ack = dora(r, edk2, NODE1)
    assert address == "192.0.2.42"  # its reservation, outside the range
    assert ack.text(12) == "node1" and ack.file == "ipxe.efi" and ack.siaddr == "192.0.2.10"
    assert 60 not in ack.options  # PXEClient would send EDK2 to port 4011
    assert ack.number(51) == 600 and ack.number(58) == 300 and ack.number(59) == 525
    assert ack.address(1) == "255.255.255.0" and ack.address(3) == "192.0.2.1" and ack.address(6) == "192.0.2.1"
    assert ack.text(15) == "lab.example" and ack.address(54) == "192.0.2.10"
    other, ack2 = dora(r, ipxe, NODE2)
    assert other == "192.0.2.100" and ack2.file == "http://192.0.2.10:8080/boot.ipxe"


def test_authoritative_gives_everyone_an_address_but_boot_files_only_to_machines_it_boots(leases: Leases) -> None:
    r = responder(fleet(default=False), leases)
    address, ack = dora(r, plain, STRANGER)
    assert address == "192.0.2.100" and ack.file == "" and 12 not in ack.options
    address, ack = dora(r, edk2, "52:54:00:00:09:0a")
    assert address == "192.0.2.101" and ack.file == ""


def test_http_boot_client_is_answered_as_httpclient(leases: Leases) -> None:
    _, ack = dora(responder(fleet(), leases), http_boot, NODE2)
    assert ack.text(60) == "HTTPClient" and ack.file == "http://192.0.2.10:8080/ipxe.efi"


def test_no_address_is_given_twice_and_the_range_runs_out(leases: Leases) -> None:
    r = responder(fleet(), leases)
    macs = [f"52:54:00:00:02:{i:02x}" for i in range(5)]
    offers = [arrive(r, plain(DISCOVER, mac=m)) for m in macs]
    got = [parse_reply(o.data).yiaddr for o in offers[:4]]
    assert got == ["192.0.2.100", "192.0.2.101", "192.0.2.102", "192.0.2.103"]  # offers are held
    assert isinstance(offers[4], Ignored) and "no free address" in offers[4].reason
    # Another machine asking for an address that is offered to someone else is refused.
    nak, _ = answer(r, plain(REQUEST, mac=macs[4], extra=[(50, ip("192.0.2.100"))]))
    assert nak.type == NAK and nak.yiaddr == "0.0.0.0"


def test_offer_expires_and_address_comes_back(leases: Leases) -> None:
    r = responder(fleet(), leases)
    first = parse_reply(arrive(r, plain(mac="52:54:00:00:02:01")).data).yiaddr
    r.now[0] += 61  # type: ignore[attr-defined]
    again = parse_reply(arrive(r, plain(mac="52:54:00:00:02:02")).data).yiaddr
    assert again == first


def test_same_address_again_and_renewal(leases: Leases) -> None:
    r = responder(fleet(), leases)
    address, _ = dora(r, plain, STRANGER)
    r.now[0] += 10_000  # type: ignore[attr-defined]  (long expired, but never given to anyone else)
    assert dora(r, plain, STRANGER)[0] == address
    renew, sent = answer(r, plain(REQUEST, mac=STRANGER, ciaddr=address, flags=0))
    assert renew.type == ACK and renew.yiaddr == address and sent.dest == (address, 68)
    inform, sent = answer(r, plain(INFORM, mac=STRANGER, ciaddr=address, flags=0))
    assert inform.type == ACK and inform.yiaddr == "0.0.0.0" and 51 not in inform.options


def test_request_for_another_servers_offer_is_left_alone(leases: Leases) -> None:
    r = responder(fleet(), leases)
    offer, _ = answer(r, plain(mac=STRANGER))
    assert arrive(r, plain(REQUEST, mac=STRANGER, extra=[(50, ip(offer.yiaddr)), (54, ip("192.0.2.99"))])) is None
    assert STRANGER not in leases.offers


@pytest.mark.parametrize("wanted", ["198.51.100.7", "192.0.2.42", "192.0.2.10", "192.0.2.150"])
def test_init_reboot_for_an_address_it_may_not_have_is_nakked(leases: Leases, wanted: str) -> None:
    reply, _ = answer(responder(fleet(), leases), plain(REQUEST, mac=STRANGER, extra=[(50, ip(wanted))]))
    assert reply.type == NAK and reply.address(54) == "192.0.2.10"


def test_decline_sets_the_address_aside_and_release_keeps_it_for_its_machine(leases: Leases) -> None:
    r = responder(fleet(), leases)
    address, _ = dora(r, plain, STRANGER)
    declined = arrive(r, plain(DECLINE, mac=STRANGER, extra=[(50, ip(address)), (54, ip("192.0.2.10"))]))
    assert isinstance(declined, Ignored) and "declined" in declined.reason
    assert dora(r, plain, STRANGER)[0] != address
    second, _ = dora(r, plain, NODE2)
    arrive(r, plain(RELEASE, mac=NODE2, ciaddr=second, flags=0, extra=[(54, ip("192.0.2.10"))]))
    assert leases.by_mac[NODE2].expires <= r.now[0]  # type: ignore[attr-defined]
    assert dora(r, plain, NODE2)[0] == second


def test_a_busy_reserved_address_is_not_taken_from_its_holder(leases: Leases) -> None:
    r = responder(fleet(), leases)
    held, _ = dora(r, plain, STRANGER)
    # The machines file now reserves that address for NODE2: NODE2 waits, the holder is told on renewal.
    r.machines = lambda: fleet(**{NODE2: Machine(NODE2, "squash", ip=held)})
    assert parse_reply(arrive(r, plain(mac=NODE2)).data).yiaddr != held
    nak, _ = answer(r, plain(REQUEST, mac=STRANGER, ciaddr=held, flags=0))
    assert nak.type == NAK


def test_requests_from_other_subnets_are_not_answered(leases: Leases) -> None:
    r = responder(fleet(), leases)
    assert r.handle(Arrival(plain(), ("0.0.0.0", 68), 67, 7, IPv4Interface("198.51.100.1/24"))) is None
    relayed, sent = answer(r, plain(mac=STRANGER, giaddr="192.0.2.1"), source=("192.0.2.1", 67))
    assert sent.dest == ("192.0.2.1", 67) and relayed.yiaddr == "192.0.2.100"
    assert arrive(r, plain(mac=STRANGER, giaddr="198.51.100.1"), source=("198.51.100.1", 67)) is None


def test_a_strangers_decline_and_release_change_nothing(tmp_path: Path) -> None:
    """Another MAC declining a machine's address and every other address of a 16-address range, and releasing
    the machine's lease: dropped (Kea's DHCP4_DECLINE_LEASE_MISMATCH). The machine renews, a new client is offered."""
    pool = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.115"), IPv4Network("192.0.2.0/24"))
    state = Journal(tmp_path)
    r = responder(fleet(), Leases(pool, state))
    address, _ = dora(r, plain, NODE2)
    server = (54, ip("192.0.2.10"))
    for n in range(100, 116):
        dropped = arrive(r, plain(DECLINE, mac=STRANGER, extra=[(50, ip(f"192.0.2.{n}")), server]))
        assert isinstance(dropped, Ignored) and "not its offer or lease: dropped" in dropped.reason
    dropped = arrive(r, plain(RELEASE, mac=STRANGER, ciaddr=address, flags=0, extra=[server]))
    assert isinstance(dropped, Ignored) and "not its lease" in dropped.reason
    renew, _ = answer(r, plain(REQUEST, mac=NODE2, ciaddr=address, flags=0))
    assert renew.type == ACK and renew.yiaddr == address
    assert dora(r, plain, "52:54:00:00:09:0b")[0] == "192.0.2.101"
    state.close()


def test_decline_and_release_with_another_client_identifier_are_dropped(leases: Leases) -> None:
    r = responder(fleet(), leases)
    cid = (61, b"\x01" + bytes.fromhex("525400000102"))
    offer, _ = answer(r, plain(DISCOVER, mac=NODE2, extra=[cid]))
    ack, _ = answer(r, plain(REQUEST, mac=NODE2, extra=[(50, ip(offer.yiaddr)), (54, ip("192.0.2.10")), cid]))
    assert ack.type == ACK
    spoofed = (61, b"\x00other")
    server = (54, ip("192.0.2.10"))
    assert "dropped" in arrive(r, plain(DECLINE, mac=NODE2, extra=[(50, ip(ack.yiaddr)), server, spoofed])).reason
    assert "dropped" in arrive(r, plain(RELEASE, mac=NODE2, ciaddr=ack.yiaddr, flags=0, extra=[server, spoofed])).reason
    assert leases.by_mac[NODE2].expires > r.now[0]  # type: ignore[attr-defined]
    assert arrive(r, plain(RELEASE, mac=NODE2, ciaddr=ack.yiaddr, flags=0, extra=[server, cid])) is None
    assert leases.by_mac[NODE2].expires <= r.now[0]  # type: ignore[attr-defined]


def test_declined_addresses_are_bounded_and_come_back_after_probation(tmp_path: Path) -> None:
    """Each client may decline what it was offered, but at most a quarter of the range is set aside at once (the
    oldest gives way), and a declined address returns after its hour of probation."""
    pool = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.115"), IPv4Network("192.0.2.0/24"))
    state = Journal(tmp_path)
    r = responder(fleet(), Leases(pool, state))
    server = (54, ip("192.0.2.10"))
    for i in range(12):  # a flood of made-up MACs, each declining what it is offered
        mac = f"52:54:00:00:0a:{i:02x}"
        offer, _ = answer(r, plain(DISCOVER, mac=mac))
        declined = arrive(r, plain(DECLINE, mac=mac, extra=[(50, ip(offer.yiaddr)), server]))
        assert isinstance(declined, Ignored) and "set aside" in declined.reason
        r.now[0] += 1  # type: ignore[attr-defined]
    r.now[0] += 61  # type: ignore[attr-defined]  (the offers are over)
    got = {dora(r, plain, f"52:54:00:00:0b:{i:02x}")[0] for i in range(12)}
    assert len(got) == 12  # 16 addresses, 4 set aside at most
    r.now[0] += 3600  # type: ignore[attr-defined]
    assert len({dora(r, plain, f"52:54:00:00:0c:{i:02x}")[0] for i in range(4)}) == 4  # probation over
    state.close()


async def test_answers_beyond_a_hundred_a_second_are_counted_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Logging costs about what answering does: under a flood, one line a second counts what was not logged."""
    server = DhcpServer(responder(fleet()), {})
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caplog.set_level(logging.INFO, logger="netboot.dhcp")
    try:
        for i in range(150):
            server._send(sender, Answer(b"x", receiver.getsockname(), 0, f"answer {i}"), None)
        await asyncio.sleep(1.2)
    finally:
        server.close()
        sender.close()
        receiver.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:100] == [f"dhcp: answer {i}" for i in range(100)]
    assert lines[100:] == ["dhcp: and 50 more answers in the last second, not logged one by one"]
    assert server.answered == 150


# A machine's own iPXE binary, and machines found by the UUID of option 97

EDK2_UUID = "01020304-0506-0708-090a-0b0c0d0e0f10"  # dhcp_support.UUID read in network order
EDK2_UUID_LE = "04030201-0605-0807-090a-0b0c0d0e0f10"  # the same bytes read as SMBIOS stores them


def chosen(binary: str = "", profile_binary: str = "", key: str = "") -> Machines:
    """NODE1 (or, with `key`, a table keyed by it) choosing `binary`, in a profile choosing `profile_binary`."""
    profiles = {"squash": Profile("squash", Path("/out/squash"), ipxe_binary=profile_binary)}
    if key:
        machine = Machine("", "squash", ipxe_binary=binary, key=f"uuid:{key}")
        return Machines(profiles, {}, by_uuid={key: machine})
    return Machines(profiles, {NODE1: Machine(NODE1, "squash", ipxe_binary=binary, key=NODE1)})


@pytest.mark.parametrize(("machines", "datagram", "file"), [
    (chosen("snponly.efi"), edk2(mac=NODE1), "snponly.efi"),
    (chosen(profile_binary="snponly.efi"), edk2(mac=NODE1), "snponly.efi"),
    (chosen("ipxe.efi", profile_binary="snponly.efi"), edk2(mac=NODE1), "ipxe.efi"),  # the machine's own wins
    (chosen("snponly.efi"), http_boot(mac=NODE1), "http://192.0.2.10:8080/snponly.efi"),
    # A choice that does not fit the firmware: the server's default for it.
    (chosen("snponly.efi"), bios(mac=NODE1), "undionly.kpxe"),
    (chosen("undionly.kpxe"), edk2(mac=NODE1), "ipxe.efi"),
    (chosen("undionly.kpxe"), bios(mac=NODE1), "undionly.kpxe"),
    # iPXE gets its script: the script chains the binary (server/namespace.py), never DHCP.
    (chosen("snponly.efi"), ipxe(mac=NODE1), "http://192.0.2.10:8080/boot.ipxe"),
])
def test_a_machine_or_its_profile_chooses_its_ipxe_binary(machines: Machines, datagram: bytes, file: str) -> None:
    reply, _ = answer(responder(machines), datagram)
    assert reply.file == file


@pytest.mark.parametrize("listed", [EDK2_UUID, EDK2_UUID_LE])
def test_a_machine_listed_by_uuid_is_answered_by_its_option_97(listed: str) -> None:
    """An unknown MAC, no default profile: answered only because its option 97 names a listed UUID, in either of
    the byte orders firmware uses."""
    r = responder(chosen("snponly.efi", key=listed))
    reply, _ = answer(r, edk2(mac=STRANGER))
    assert reply.file == "snponly.efi"
    assert arrive(r, edk2(mac=STRANGER, extra=[(97, bytes(17))])) == Ignored(
        STRANGER, "not in the machines file, and there is no default profile")  # (a later 97 replaces it)


def test_what_dhcp_saw_is_told() -> None:
    r = responder(fleet())
    seen: list[tuple[str, str, int | None, int]] = []
    r.seen = lambda mac, client, ifindex: seen.append((mac, client.kind, client.arch, ifindex))
    answer(r, edk2(mac=NODE1))
    answer(r, bios(mac=NODE2))
    assert arrive(r, plain(mac=STRANGER)) is None
    assert seen == [(NODE1, "uefi-x64-pxe", 7, 7), (NODE2, "bios-pxe", 0, 7)]


# Secure Boot: machines whose profile boots through shim and GRUB

SHIMS = ALL | {"shimx64.efi", "grubx64.efi", "mmx64.efi"}
SECURE, SEALED = "52:54:00:00:01:21", "52:54:00:00:01:22"


def pxe(mac: str, arch: int) -> bytes:
    """A UEFI PXE client of another architecture number than EDK2's 7."""
    return request(DISCOVER, mac, options=[(93, arch.to_bytes(2, "big")),
                                           (60, f"PXEClient:Arch:{arch:05d}:UNDI:003000".encode())])


def secure_fleet() -> Machines:
    """NODE1, NODE2 on an iPXE profile; SECURE on a grub profile; SEALED on a uki profile."""
    base = fleet()
    profiles = {**base.profiles, "grub": Profile("grub", Path("/out/grub"), loader="grub"),
                "uki": Profile("uki", Path("/out/uki"), loader="uki")}
    machines = {**base.machines, SECURE: Machine(SECURE, "grub"), SEALED: Machine(SEALED, "uki")}
    return Machines(profiles, machines)


@pytest.mark.parametrize(("datagram", "file", "vendor"), [
    # UEFI PXE: shim over TFTP, which then fetches grubx64.efi beside itself; EDK2 sends arch 7, others 9.
    (edk2(mac=SECURE), "shimx64.efi", "PXEClient"),
    (edk2(mac=SEALED), "shimx64.efi", "PXEClient"),
    (pxe(SECURE, 9), "shimx64.efi", "PXEClient"),
    # UEFI HTTP Boot: shim's URL, answered as HTTPClient.
    (http_boot(mac=SECURE), "http://192.0.2.10:8080/shimx64.efi", "HTTPClient"),
    # iPXE and BIOS run without Secure Boot: they keep the iPXE path.
    (ipxe(mac=SECURE), "http://192.0.2.10:8080/boot.ipxe", "PXEClient"),
    (bios(mac=SECURE), "undionly.kpxe", "PXEClient"),
    # A machine of an iPXE profile beside them still gets iPXE.
    (edk2(mac=NODE1), "ipxe.efi", "PXEClient"),
])
def test_proxy_hands_shim_to_grub_and_uki_profiles(datagram: bytes, file: str, vendor: str) -> None:
    reply, sent = answer(responder(secure_fleet(), binaries=SHIMS), datagram)
    assert (reply.type, reply.yiaddr, reply.file, reply.siaddr, reply.text(60)) == (
        OFFER, "0.0.0.0", file, "192.0.2.10", vendor)
    shown = file if "://" in file else f"tftp://192.0.2.10/{file}"
    assert sent.line.endswith(f"OFFER address=- boot={shown}")


def test_authoritative_hands_shim_to_grub_and_uki_profiles(leases: Leases) -> None:
    r = responder(secure_fleet(), leases, binaries=SHIMS)
    _, ack = dora(r, edk2, SECURE)
    # GRUB 2.06 takes its server from the acknowledgement (siaddr): TFTP from there, its prefix (tftp,SERVER)/grub.
    assert (ack.file, ack.siaddr, ack.text(67)) == ("shimx64.efi", "192.0.2.10", "shimx64.efi")
    assert 60 not in ack.options
    _, ack = dora(r, http_boot, SEALED)
    assert (ack.file, ack.text(60)) == ("http://192.0.2.10:8080/shimx64.efi", "HTTPClient")
    _, ack = dora(r, edk2, NODE2)
    assert ack.file == "ipxe.efi"


@pytest.mark.parametrize(("datagram", "offer", "why"), [
    (edk2(mac=SECURE), {}, "uefi-x64-pxe: shimx64.efi is not served (Debian's shim-signed, or --loaders x86_64=DIR)"),
    (edk2(mac=SECURE), {"binaries": SHIMS, "tftp": False}, "PXE ROMs need TFTP on port 69"),
    # An arm64 machine on a grub profile: arm64's shim, which is not served here.
    (pxe(SECURE, 11), {"binaries": SHIMS}, "shimaa64.efi is not served"),
])
def test_a_secure_boot_machine_without_its_shim_is_not_answered(datagram: bytes, offer: dict, why: str) -> None:
    result = arrive(responder(secure_fleet(), **offer), datagram)
    assert isinstance(result, Ignored) and result.mac == SECURE and why in result.reason, result


async def test_requests_not_answered_beyond_a_hundred_a_second_are_counted_not_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request not answered is logged once per machine and reason, and a flood of made-up MACs is many machines:
    past a hundred a second, one line a second counts them, as for answers."""
    r = responder(fleet(default=False))
    server = DhcpServer(r, {})
    caplog.set_level(logging.INFO, logger="netboot.dhcp")
    try:
        for i in range(150):
            ignored = arrive(r, edk2(mac=f"52:54:00:00:0e:{i:02x}"))
            assert isinstance(ignored, Ignored)
            server._ignore(ignored)
        await asyncio.sleep(1.2)
    finally:
        server.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:100] == [f"dhcp: 52:54:00:00:0e:{i:02x}: not answered: not in the machines file, and there is no "
                           "default profile" for i in range(100)]
    assert lines[100:] == ["dhcp: and 50 more requests not answered in the last second, not logged one by one"]


# arm64 machines: their architecture from option 93, their profile's build for it

ARM1, ARM2, MIXED = "52:54:00:00:01:31", "52:54:00:00:01:32", "52:54:00:00:01:33"
ARM_LOADERS = ALL | {"shimaa64.efi", "grubaa64.efi", "mmaa64.efi"}


def arm_fleet() -> Machines:
    """ARM1 on an arm64 profile, ARM2 on an x86_64 one, MIXED on a profile with a build for each."""
    variants = {"x86_64": "mixed", "arm64": "mixed@arm64"}
    profiles = {"arm": Profile("arm", Path("/out/arm")), "x86": Profile("x86", Path("/out/x86")),
                "mixed": Profile("mixed", Path("/out/x86"), variants=variants, arch="x86_64"),
                "mixed@arm64": Profile("mixed@arm64", Path("/out/arm"), variants=variants, arch="arm64")}
    machines = {ARM1: Machine(ARM1, "arm"), ARM2: Machine(ARM2, "x86"), MIXED: Machine(MIXED, "mixed")}
    return Machines(profiles, machines)


ARCHES = {"arm": "arm64", "x86": "x86_64", "mixed": "x86_64", "mixed@arm64": "arm64"}


def arm_http_boot(mac: str) -> bytes:
    return request(DISCOVER, mac, options=[(93, (19).to_bytes(2, "big")), (60, b"HTTPClient:Arch:00019:UNDI:003000")])


@pytest.mark.parametrize(("datagram", "binaries", "file", "vendor"), [
    # EDK2 on arm64 (AAVMF): arm64's shim over TFTP, which chains grubaa64.efi; Debian has no arm64 iPXE.
    (pxe(ARM1, 11), ARM_LOADERS, "shimaa64.efi", "PXEClient"),
    (arm_http_boot(ARM1), ARM_LOADERS, "http://192.0.2.10:8080/shimaa64.efi", "HTTPClient"),
    # The operator's arm64 iPXE (--loaders arm64=DIR with ipxe.efi), for a profile of loader = "ipxe".
    (pxe(ARM1, 11), ARM_LOADERS | {"arm64/ipxe.efi"}, "arm64/ipxe.efi", "PXEClient"),
    (arm_http_boot(ARM1), ARM_LOADERS | {"arm64/ipxe.efi"}, "http://192.0.2.10:8080/arm64/ipxe.efi", "HTTPClient"),
    # A profile with a build per architecture: each machine boots its own.
    (pxe(MIXED, 11), ARM_LOADERS, "shimaa64.efi", "PXEClient"),
    (edk2(mac=MIXED), ARM_LOADERS, "ipxe.efi", "PXEClient"),
])
def test_arm64_machines_get_arm64_loaders(datagram: bytes, binaries: frozenset, file: str, vendor: str) -> None:
    reply, sent = answer(responder(arm_fleet(), binaries=binaries, arches=ARCHES), datagram)
    assert (reply.type, reply.file, reply.siaddr, reply.text(60)) == (OFFER, file, "192.0.2.10", vendor)
    assert " uefi-arm64-" in sent.line or file == "ipxe.efi", sent.line


@pytest.mark.parametrize(("datagram", "mac", "why"), [
    (pxe(ARM2, 11), ARM2, "uefi-arm64-pxe: refused: profile x86 is for x86_64, and this machine is arm64"),
    (arm_http_boot(ARM2), ARM2, "uefi-arm64-http: refused: profile x86 is for x86_64, and this machine is arm64"),
    (edk2(mac=ARM1), ARM1, "uefi-x64-pxe: refused: profile arm is for arm64, and this machine is x86_64"),
    (bios(mac=ARM1), ARM1, "bios-pxe: refused: profile arm is for arm64, and this machine is x86_64"),
    (ipxe(mac=ARM1), ARM1, "ipxe-uefi-x64: refused: profile arm is for arm64, and this machine is x86_64"),
])
def test_a_machine_of_another_architecture_than_its_profile_is_refused(datagram: bytes, mac: str, why: str,
                                                                       leases: Leases) -> None:
    """Not booted into a kernel it cannot run: proxy mode does not answer (the line logged says why); the
    authoritative mode gives it an address without a boot file, and its line says why."""
    result = arrive(responder(arm_fleet(), binaries=ARM_LOADERS, arches=ARCHES), datagram)
    assert isinstance(result, Ignored) and (result.mac, result.reason) == (mac, why), result
    reply, sent = answer(responder(arm_fleet(), leases, binaries=ARM_LOADERS, arches=ARCHES), datagram)
    assert (reply.type, reply.file, reply.yiaddr != "0.0.0.0") == (OFFER, "", True)
    assert sent.line.endswith(f" boot=- ({why.partition(': ')[2]})"), sent.line


def test_arm64_machine_without_an_arm64_loader_is_not_answered() -> None:
    result = arrive(responder(arm_fleet(), arches=ARCHES), pxe(ARM1, 11))
    assert isinstance(result, Ignored) and result.reason == (
        "uefi-arm64-pxe: shimaa64.efi is not served (Debian's shim-signed, or --loaders arm64=DIR (or ipxe.efi in "
        "DIR))"), result


# Hostile requests and bugs: nothing held, nothing granted, one log line at most every 10 seconds

def vendor(text: str, mac: str = STRANGER, kind: int = DISCOVER) -> bytes:
    """A request whose only clue is its option 60 (no option 93): the architecture comes from `text`."""
    return request(kind, mac, options=[(60, text.encode())])


@pytest.mark.parametrize(("text", "arch"), [
    ("PXEClient:Arch:00007:UNDI:003000", 7), ("PXEClient:Arch:7", 7), ("HTTPClient:Arch:00016:UNDI:003000", 16),
    ("PXEClient", None), ("MSFT 5.0", None), ("Vendor:Arch:²", None),  # not PXE's class identifier: no Arch read
])
def test_the_architecture_of_a_client_without_option_93_is_read_from_option_60(text: str, arch: int | None) -> None:
    assert boot.classify(message.parse(vendor(text))).arch == arch


@pytest.mark.parametrize("text", ["PXEClient:Arch:²", "PXEClient:Arch:٣:UNDI:003000", "PXEClient:Arch:00007x",
                                  "HTTPClient:Arch:-16", "PXEClient:Arch:", "PXEClient:Arch:000007"])
def test_an_architecture_that_is_not_ascii_digits_is_malformed_and_holds_nothing(text: str, leases: Leases) -> None:
    """`²` passes str.isdigit() and fails int(): once a traceback per datagram and, in authoritative mode, an
    address held for a minute with no OFFER sent. Now a malformed request, in both modes, before anything."""
    for r in (responder(fleet()), responder(fleet(), leases)):
        with pytest.raises(Malformed, match="Arch field is not a number"):
            arrive(r, vendor(text))
    assert leases.offers == {} and leases.store.take() is None


def test_a_reply_that_cannot_be_built_changes_nothing(leases: Leases) -> None:
    """Whatever raises while an answer is built (here option 12 too long to encode, which the machines file would
    have refused): the OFFER's address is not held, the ACK's lease not granted, nothing goes to the journal and
    the client is not reported seen; the next machine gets the first address."""
    r = responder(fleet(**{STRANGER: Machine(STRANGER, "squash", hostname="h" * 300)}), leases)
    seen: list[str] = []
    r.seen = lambda mac, client, ifindex: seen.append(mac)
    with pytest.raises(ValueError, match="does not fit"):
        arrive(r, edk2(DISCOVER, mac=STRANGER))
    with pytest.raises(ValueError, match="does not fit"):
        arrive(r, edk2(REQUEST, mac=STRANGER, extra=[(50, ip("192.0.2.100")), (54, ip("192.0.2.10"))]))
    assert (leases.offers, leases.by_mac, leases.store.take(), seen) == ({}, {}, None, [])
    assert dora(r, edk2, NODE2)[0] == "192.0.2.100"


async def test_a_bug_costs_what_a_malformed_datagram_does(caplog: pytest.LogCaptureFixture) -> None:
    """An exception the responder did not expect: one drop line naming it and where it was raised, then quiet for
    10 seconds however many datagrams follow (a flood of them once wrote a traceback each), and no traceback."""
    def broken() -> Offerings:
        raise RuntimeError("a bug")

    r = responder(fleet())
    r.offerings = broken
    interfaces = {7: ("eth0", [SERVER])}
    server = DhcpServer(r, interfaces, snapshot=lambda: interfaces)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caplog.set_level(logging.DEBUG, logger="netboot.dhcp")
    try:
        for i in range(50):
            server._datagram(sock, 67, edk2(mac=f"52:54:00:00:0f:{i:02x}"), ("192.0.2.50", 68), 7)
            server._datagram(sock, 67, b"garbage", ("192.0.2.50", 68), 7)
    finally:
        server.close()
        sock.close()
    assert [(x.levelname, x.getMessage(), x.exc_info) for x in caplog.records] == [
        ("WARNING", "dhcp: dropped a datagram from 192.0.2.50:68: not answered: RuntimeError: 'a bug' at "
                    "test_dhcp_exchange.py:" f"{broken.__code__.co_firstlineno + 1} in broken", None)]


# Where answers go: to a relay that sent the request or that the operator named, to the client's own address, or
# by broadcast on the link; never to an address a datagram merely names

@pytest.mark.parametrize("mode", ["proxy", "authoritative"])
@pytest.mark.parametrize(("giaddr", "source"), [
    ("203.0.113.5", ("127.0.0.1", 68)),  # the report: from loopback, naming a host elsewhere
    ("192.0.2.1", ("192.0.2.50", 67)),  # a neighbour naming the router of the subnet
    ("192.0.2.1", ("0.0.0.0", 68)),
])
def test_a_giaddr_that_is_neither_the_sender_nor_a_named_relay_is_dropped(mode: str, giaddr: str, source: tuple,
                                                                          leases: Leases) -> None:
    r = responder(fleet(), leases if mode == "authoritative" else None)
    with pytest.raises(Malformed, match=f"giaddr {giaddr} is neither the sender's address nor a --dhcp-relay"):
        arrive(r, edk2(mac=NODE1, giaddr=giaddr), source=source)
    assert leases.offers == {}


@pytest.mark.parametrize("mode", ["proxy", "authoritative"])
def test_a_named_relay_is_answered_whichever_of_its_addresses_it_sends_from(mode: str, leases: Leases) -> None:
    """A router relays from its address toward the server and writes its address on the machines' network in
    giaddr: answered at giaddr, port 67, once --dhcp-relay names it (RFC 2131 §4.1, RFC 3046)."""
    r = responder(fleet(), leases if mode == "authoritative" else None, relays=frozenset({"192.0.2.1"}))
    reply, sent = answer(r, edk2(mac=NODE1, giaddr="192.0.2.1"), source=("198.51.100.1", 67))
    assert (reply.type, reply.giaddr, sent.dest, sent.ifindex) == (OFFER, "192.0.2.1", ("192.0.2.1", 67), 0)
    with pytest.raises(Malformed):
        arrive(r, edk2(mac=NODE1, giaddr="192.0.2.2"), source=("198.51.100.1", 67))


@pytest.mark.parametrize("mode", ["proxy", "authoritative"])
def test_a_discover_naming_a_ciaddr_is_answered_by_broadcast(mode: str, leases: Leases) -> None:
    """RFC 2131 Table 5: a DISCOVER's ciaddr is 0. One that names an address gets its OFFER by broadcast on the
    link it came from, with ciaddr 0 (Table 3), never at the address named."""
    r = responder(fleet(), leases if mode == "authoritative" else None)
    reply, sent = answer(r, edk2(mac=NODE1, ciaddr="198.51.100.9", flags=0), source=("127.0.0.1", 68))
    assert (reply.type, reply.ciaddr, sent.dest, sent.ifindex) == (OFFER, "0.0.0.0", ("255.255.255.255", 68), 7)


def test_an_ack_goes_to_ciaddr_only_when_that_is_the_clients_lease(leases: Leases) -> None:
    r = responder(fleet(), leases)
    address, _ = dora(r, plain, STRANGER)
    other, _ = dora(r, plain, NODE2)
    # RENEWING (RFC 2131 §4.3.2): ciaddr is its lease, unicast there.
    renew, sent = answer(r, plain(REQUEST, mac=STRANGER, ciaddr=address, flags=0), source=(address, 68))
    assert (renew.type, renew.yiaddr, sent.dest) == (ACK, address, (address, 68))
    # Option 50 and a ciaddr elsewhere (RFC 2131 §4.3.2 allows neither together): the ACK is broadcast.
    forged, sent = answer(r, plain(REQUEST, mac=STRANGER, ciaddr="198.51.100.9", flags=0,
                                   extra=[(50, ip(address)), (54, ip("192.0.2.10"))]), source=("127.0.0.1", 68))
    assert (forged.type, sent.dest, sent.ifindex) == (ACK, ("255.255.255.255", 68), 7)
    # INFORM: to its lease; from an address that is not its lease (another's, or none of ours), by broadcast.
    for ciaddr, dest in ((address, (address, 68)), (other, ("255.255.255.255", 68)),
                         ("198.51.100.9", ("255.255.255.255", 68))):
        inform, sent = answer(r, plain(INFORM, mac=STRANGER, ciaddr=ciaddr, flags=0), source=(ciaddr, 68))
        assert (inform.type, sent.dest) == (ACK, dest), ciaddr
    # A NAK is broadcast whatever it says (RFC 2131 §4.1).
    nak, sent = answer(r, plain(REQUEST, mac=STRANGER, ciaddr="198.51.100.9", flags=0), source=("127.0.0.1", 68))
    assert (nak.type, sent.dest) == (NAK, ("255.255.255.255", 68))


def test_boot_server_discovery_is_answered_where_it_came_from_not_at_its_ciaddr() -> None:
    reply, sent = answer(responder(fleet()), edk2(REQUEST, mac=NODE1, ciaddr="198.51.100.9", flags=0), port=4011,
                         source=("192.0.2.150", 68))
    assert (reply.type, sent.dest) == (ACK, ("192.0.2.150", 68))


# iPXE told not to wait for ProxyDHCP offers

NO_PXEDHCP = bytes([175, 3, 176, 1, 1])  # option 175 holding sub-option 176 (no-pxedhcp) = 1


def ipxe_175_only(kind: int = DISCOVER, mac: str = STRANGER, extra=(), **kw) -> bytes:
    """iPXE known by its option 175 alone (no user class)."""
    return request(kind, mac, options=[(60, IPXE_UEFI_VENDOR), (93, b"\x00\x07"),
                                       (175, b"\xb1\x05\x01\x80\x86\x10\x0e"), *extra], **kw)


@pytest.mark.parametrize(("datagram", "mac", "file"), [
    (ipxe, NODE1, "http://192.0.2.10:8080/boot.ipxe"),
    (lambda kind, mac, **kw: ipxe(kind, mac, arch=0, **kw), NODE2, "http://192.0.2.10:8080/boot.ipxe"),
    (ipxe_175_only, STRANGER, ""),  # no default profile: an address without a boot file, and still 175
])
def test_authoritative_offers_and_acks_tell_ipxe_not_to_wait_for_proxydhcp(datagram, mac: str, file: str,
                                                                           leases: Leases) -> None:
    """iPXE waits up to 2 s after an OFFER for ProxyDHCP offers unless the OFFER carries 175.176 = 1: every OFFER
    and ACK to iPXE carries it, beside everything else they say."""
    r = responder(fleet(default=False), leases)
    offer, sent = answer(r, datagram(DISCOVER, mac))
    assert (offer.type, offer.options[175], offer.file) == (OFFER, NO_PXEDHCP[2:], file)
    assert NO_PXEDHCP in sent.data
    ack, sent = answer(r, datagram(REQUEST, mac, extra=[(50, ip(offer.yiaddr)), (54, ip("192.0.2.10"))]))
    assert (ack.type, ack.yiaddr, ack.options[175], ack.file, ack.number(51)) == (
        ACK, offer.yiaddr, NO_PXEDHCP[2:], file, 600)
    assert NO_PXEDHCP in sent.data


@pytest.mark.parametrize("datagram", [edk2, bios, http_boot, plain])
def test_only_ipxe_is_told_about_proxydhcp(datagram, leases: Leases) -> None:
    _, ack = dora(responder(fleet(), leases), datagram, NODE2)
    assert 175 not in ack.options


def test_proxy_offers_to_ipxe_carry_no_option_175() -> None:
    """iPXE reads no-pxedhcp only from the offer that gives the address: a proxy's would tell it nothing."""
    reply, _ = answer(responder(fleet()), ipxe(mac=NODE1))
    assert 175 not in reply.options and reply.file == "http://192.0.2.10:8080/boot.ipxe"
