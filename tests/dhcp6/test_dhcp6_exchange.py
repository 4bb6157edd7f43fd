"""Every answer the DHCPv6 server gives, as a pure function: datagram in, datagram out, no sockets."""

from __future__ import annotations

import struct
import zlib
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest
from dhcp6_support import (
    ADVERTISE,
    CONFIRM,
    DECLINE,
    HTTP_VENDOR,
    INFORMATION_REQUEST,
    REBIND,
    RELEASE,
    RENEW,
    REPLY,
    REQUEST,
    SOLICIT,
    duid_uuid,
    edk2,
    ia_na,
    ipxe,
    message,
    opt,
    read,
    relay_forward,
    unwrap,
    vendor_class,
)

from netboot.core.errors import NetbootError
from netboot.core.machines import Machine, Machines, Profile
from netboot.dhcp.boot import Offerings
from netboot.dhcp.journal import Journal
from netboot.dhcp6 import duid, exchange
from netboot.dhcp6 import leases as leases6
from netboot.dhcp6.exchange import Answer, Arrival, Ignored, Responder, eui64_mac
from netboot.dhcp6.leases import KIND, Leases6, Pool6
from netboot.dhcp6.message import Malformed, Status

SERVER = "2001:db8::10"
NET = (IPv6Network("2001:db8::/64"),)
NODE1, NODE2, SECURE, STRANGER = "52:54:00:00:06:01", "52:54:00:00:06:02", "52:54:00:00:06:03", "52:54:00:00:06:09"
LINK_LOCAL = "fe80::5054:ff:fe00:609"  # STRANGER's EUI-64 link-local address
OUR_DUID = b"\0\1\0\1\x2b\x0e\x5f\x00\x02\0\0\0\0\x10"
ALL = frozenset({"undionly.kpxe", "ipxe.efi", "snponly.efi", "shimx64.efi", "grubx64.efi", "mmx64.efi"})


def fleet(default: bool = True) -> Machines:
    profiles = {"squash": Profile("squash", Path("/out/squash")),
                "grub": Profile("grub", Path("/out/grub"), loader="grub")}
    if default:
        profiles["default"] = Profile("default", Path("/out/direct"))
    return Machines(profiles, {NODE1: Machine(NODE1, "squash"), NODE2: Machine(NODE2, "squash"),
                               SECURE: Machine(SECURE, "grub")})


def pool(tmp_path: Path, first: str = "2001:db8::1000", last: str = "2001:db8::1fff") -> Leases6:
    return Leases6(Pool6(IPv6Address(first), IPv6Address(last)), Journal(tmp_path, KIND))


def responder(machines: Machines, leases: Leases6 | None, **offer) -> Responder:
    offerings = Offerings(**{"binaries": ALL, "http_port": 8080, "tftp": True, **offer})
    clock = [1_000_000.0]
    r = Responder(lambda: offerings, lambda: machines, OUR_DUID, leases, clock=lambda: clock[0])
    r.now = clock  # type: ignore[attr-defined]
    return r


def arrive(r: Responder, data: bytes, source: str = "fe80::1", server: str | None = SERVER):
    return r.handle(Arrival(data, source, 3, server, NET))


def answer(r: Responder, data: bytes, **kw):
    result = arrive(r, data, **kw)
    assert isinstance(result, Answer), result
    return read(result.data), result


# Stateful mode

def test_edk2_solicit_request_reply(tmp_path: Path) -> None:
    leases = pool(tmp_path)
    r = responder(fleet(), leases)
    advertise, sent = answer(r, edk2(mac=NODE1))
    assert advertise.type == ADVERTISE and advertise.xid == b"\x12\x34\x56"
    assert advertise.addresses == [(1, "2001:db8::1000", 3600, 3600)]
    assert advertise.one(2) == OUR_DUID and advertise.one(1)[-6:] == bytes.fromhex(NODE1.replace(":", ""))
    assert advertise.one(7) == b"\xff"  # preference 255: taken at once (RFC 8415 §18.2.1)
    assert advertise.one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    assert struct.unpack("!II", advertise.one(3)[4:12]) == (1800, 2880)  # T1, T2
    assert sent.dest == ("fe80::1", 546, 0, 3) and not sent.durable_first
    assert sent.line == f"{NODE1} uefi-x64-pxe ADVERTISE address=2001:db8::1000 boot=tftp://[2001:db8::10]/ipxe.efi"
    assert leases.offers  # held, not leased
    assert not leases.by_key
    # Another client's Solicit meanwhile gets another address.
    other, _ = answer(r, edk2(mac=NODE2))
    assert other.addresses[0][1] == "2001:db8::1001"
    reply, sent = answer(r, edk2(REQUEST, mac=NODE1, server=OUR_DUID, addresses=("2001:db8::1000",)))
    assert reply.type == REPLY and reply.addresses == [(1, "2001:db8::1000", 3600, 3600)]
    assert reply.one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    assert sent.durable_first and 7 not in reply.options
    [lease] = leases.by_key.values()
    assert lease.ip == "2001:db8::1000" and lease.expires == 1_000_000 + 3600


def test_rapid_commit_solicit_gets_a_reply_and_a_lease(tmp_path: Path) -> None:
    leases = pool(tmp_path)
    reply, sent = answer(responder(fleet(), leases), ipxe(mac=NODE1, rapid=True))
    assert reply.type == REPLY and reply.one(14) == b"" and sent.durable_first
    assert reply.one(59) == b"http://[2001:db8::10]:8080/boot.ipxe"
    assert [lease.ip for lease in leases.by_key.values()] == ["2001:db8::1000"]


def test_http_boot_gets_a_url_and_httpclient_echoed(tmp_path: Path) -> None:
    data = message(SOLICIT, opt(1, duid_uuid()), ia_na(1), opt(61, b"\0\x10"), vendor_class(HTTP_VENDOR))
    reply, _ = answer(responder(fleet(), pool(tmp_path)), data, source=LINK_LOCAL)
    assert reply.one(59) == b"http://[2001:db8::10]:8080/ipxe.efi"
    assert reply.one(16) == struct.pack("!IH", 343, 10) + b"HTTPClient"


def test_secure_boot_profile_gets_shim_and_an_http_listener_on_one_address_is_named(tmp_path: Path) -> None:
    reply, _ = answer(responder(fleet(), pool(tmp_path)), edk2(mac=SECURE))
    assert reply.one(59) == b"tftp://[2001:db8::10]/shimx64.efi"
    reply, _ = answer(responder(fleet(), None, http_host="[2001:db8::99]"), ipxe(INFORMATION_REQUEST, NODE1, ia=False))
    assert reply.one(59) == b"http://[2001:db8::99]:8080/boot.ipxe"


def test_arm64_gets_its_loader_or_is_told_why_not(tmp_path: Path) -> None:
    arm = message(SOLICIT, opt(1, duid_uuid()), ia_na(1), opt(61, struct.pack("!H", 11)),
                  vendor_class(b"PXEClient:Arch:00011:UNDI:003016"))
    r = responder(fleet(), pool(tmp_path), binaries=ALL | {"shimaa64.efi", "grubaa64.efi"})
    reply, sent = answer(r, arm, source=LINK_LOCAL)
    assert reply.one(59) == b"tftp://[2001:db8::10]/shimaa64.efi" and "uefi-arm64-pxe" in sent.line
    # Without arm64's loaders: an address, and no boot file.
    reply, sent = answer(responder(fleet(), pool(tmp_path / "b")), arm, source=LINK_LOCAL)
    assert reply.addresses and 59 not in reply.options


@pytest.mark.parametrize(("data", "source", "mac"), [
    (edk2(mac=NODE2), "fe80::1", NODE2),  # DUID-LLT
    (ipxe(mac=NODE2), "fe80::1", NODE2),  # DUID-LL
    (message(SOLICIT, opt(1, duid_uuid()), ia_na(1)), LINK_LOCAL, STRANGER),  # EUI-64 link-local
    (relay_forward(message(SOLICIT, opt(1, duid_uuid()), ia_na(1)), "fe80::1", "2001:db8::1", 0,
                   opt(79, b"\0\1" + bytes.fromhex(NODE2.replace(":", "")))), "2001:db8::1", NODE2),  # option 79
    (message(SOLICIT, opt(1, duid_uuid()), ia_na(1)), "fe80::1", None),  # nothing: unknown
])
def test_machines_are_found_by_mac(data: bytes, source: str, mac: str | None) -> None:
    assert exchange.machine_mac(exchange.message.parse(data), source) == mac


def test_eui64() -> None:
    assert eui64_mac("fe80::5054:ff:fe12:3456") == "52:54:00:12:34:56"
    assert eui64_mac("fe80::1") is None and eui64_mac("2001:db8::5054:ff:fe12:3456") is None


def test_unknown_machines_follow_the_default_profile(tmp_path: Path) -> None:
    seen = []
    r = responder(fleet(default=False), pool(tmp_path))
    r.seen = lambda mac, client, ifindex: seen.append((mac, client.kind, ifindex))
    # No default profile: an address, no boot file (as DHCPv4's authoritative mode), and the machine seen.
    reply, _ = answer(r, edk2(mac=STRANGER))
    assert reply.addresses and 59 not in reply.options
    assert seen == [(STRANGER, "uefi-x64-pxe", 3)]
    r = responder(fleet(), pool(tmp_path / "b"))
    reply, _ = answer(r, edk2(mac=STRANGER))
    assert reply.one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    # Stateless: nothing to give a machine without a profile; logged once why.
    result = arrive(responder(fleet(default=False), None), ipxe(INFORMATION_REQUEST, STRANGER, ia=False))
    assert isinstance(result, Ignored) and "no default profile" in result.reason and result.who == STRANGER


def test_request_for_another_server_forgets_the_advertisement(tmp_path: Path) -> None:
    leases = pool(tmp_path)
    r = responder(fleet(), leases)
    answer(r, edk2(mac=NODE1))
    assert arrive(r, edk2(REQUEST, mac=NODE1, server=b"\0\3\0\1other!", addresses=("2001:db8::1000",))) is None
    assert not leases.offers
    other, _ = answer(r, edk2(mac=NODE2))
    assert other.addresses[0][1] == "2001:db8::1000"


def test_renew_rebind_release_decline_confirm(tmp_path: Path) -> None:
    leases = pool(tmp_path)
    r = responder(fleet(), leases)
    answer(r, ipxe(mac=NODE1, rapid=True))
    r.now[0] += 1000
    reply, sent = answer(r, ipxe(RENEW, NODE1, server=OUR_DUID, addresses=("2001:db8::1000",)))
    assert reply.addresses == [(1, "2001:db8::1000", 3600, 3600)] and sent.durable_first
    assert leases.lease_of(next(iter(leases.by_key)), r.now[0]).expires == r.now[0] + 3600
    # NODE2 renewing NODE1's address: told to stop using it (lifetimes 0).
    reply, _ = answer(r, ipxe(REBIND, NODE2, addresses=("2001:db8::1000",)))
    assert reply.addresses == [(1, "2001:db8::1000", 0, 0)]
    # An address outside the range, on Confirm: not on this link.
    reply, _ = answer(r, ipxe(CONFIRM, NODE1, addresses=("2001:db8:9::1",)))
    assert reply.status == Status.NOT_ON_LINK
    reply, _ = answer(r, ipxe(CONFIRM, NODE1, addresses=("2001:db8::1000",)))
    assert reply.status == Status.SUCCESS
    # Release of someone else's address: NoBinding, and NODE1 keeps it.
    reply, _ = answer(r, ipxe(RELEASE, NODE2, server=OUR_DUID, addresses=("2001:db8::1000",)))
    assert reply.status == Status.SUCCESS and reply.ia_statuses == [Status.NO_BINDING]
    assert leases.by_ip["2001:db8::1000"].expires > r.now[0]
    reply, _ = answer(r, ipxe(RELEASE, NODE1, server=OUR_DUID, addresses=("2001:db8::1000",)))
    assert reply.type == REPLY and reply.status == Status.SUCCESS
    assert leases.by_ip["2001:db8::1000"].expires == r.now[0]
    # NODE1 again: its previous address; then it declines it, and gets another afterwards.
    answer(r, ipxe(mac=NODE1, rapid=True))
    reply, _ = answer(r, ipxe(DECLINE, NODE1, server=OUR_DUID, addresses=("2001:db8::1000",)))
    assert reply.status == Status.SUCCESS
    again, _ = answer(r, ipxe(mac=NODE1))
    assert again.addresses[0][1] != "2001:db8::1000"


def test_no_address_twice_and_exhaustion(tmp_path: Path) -> None:
    leases = pool(tmp_path, "2001:db8::1000", "2001:db8::10ff")  # 256 addresses
    r = responder(fleet(), leases)
    given = []
    for n in range(256):
        reply, _ = answer(r, ipxe(mac=f"52:54:00:01:{n >> 8:02x}:{n & 255:02x}", rapid=n % 2 == 0))
        given.append(reply.addresses[0][1])
    assert len(set(given)) == 256
    advertise, sent = answer(r, edk2(mac=NODE1))
    assert advertise.status == Status.NO_ADDRS_AVAIL and advertise.addresses == []
    assert "no free address left" in sent.line
    # Two IAs of one client: two addresses (once some are free).
    leases2 = pool(tmp_path / "b")
    two, _ = answer(responder(fleet(), leases2), message(SOLICIT, opt(1, duid_uuid()), ia_na(1), ia_na(2)))
    assert len({a[1] for a in two.addresses}) == 2


def test_leases_survive_a_restart(tmp_path: Path) -> None:
    leases = pool(tmp_path)
    answer(responder(fleet(), leases), ipxe(mac=NODE1, rapid=True))
    leases.store.close()
    again = pool(tmp_path)
    reply, _ = answer(responder(fleet(), again), ipxe(mac=NODE1))
    assert reply.addresses[0][1] == "2001:db8::1000"
    again.store.close()


def test_relayed_solicit_is_answered_to_the_relay(tmp_path: Path) -> None:
    data = relay_forward(ipxe(mac=NODE1), "fe80::5054:ff:fe00:601", "2001:db8::1", 0, opt(18, b"ge-0/0/1"))
    result = arrive(responder(fleet(), pool(tmp_path)), data, source="2001:db8::1")
    assert isinstance(result, Answer) and result.dest == ("2001:db8::1", 547, 0, 0)
    [(hops, link, peer, options)], advertise = unwrap(result.data)
    assert (hops, link, peer, options[18]) == (0, "2001:db8::1", "fe80::5054:ff:fe00:601", [b"ge-0/0/1"])
    assert advertise.type == ADVERTISE and advertise.addresses
    # A relay on another link: not this range's client.
    other = relay_forward(ipxe(mac=NODE1), "fe80::1", "2001:db8:5::1")
    assert arrive(responder(fleet(), pool(tmp_path / "b")), other, source="2001:db8:5::1") is None


def test_malformed_per_rfc_8415_section_16(tmp_path: Path) -> None:
    r = responder(fleet(), pool(tmp_path))
    with pytest.raises(Malformed, match="client identifier"):
        arrive(r, message(SOLICIT, ia_na(1)))
    with pytest.raises(Malformed, match="server identifier"):
        arrive(r, edk2(mac=NODE1, server=OUR_DUID))
    with pytest.raises(Malformed, match="server identifier"):
        arrive(r, edk2(REQUEST, mac=NODE1))


def test_an_interface_without_a_global_address_is_said(tmp_path: Path) -> None:
    result = arrive(responder(fleet(), pool(tmp_path)), edk2(mac=NODE1), server=None)
    assert isinstance(result, Ignored) and "no global IPv6 address" in result.reason


# Stateless mode

def test_stateless_answers_boot_clients_with_boot_information_only() -> None:
    r = responder(fleet(), None)
    assert arrive(r, ipxe(mac=NODE1)) is None  # an address: the site's server
    assert arrive(r, message(INFORMATION_REQUEST, opt(1, duid_uuid()))) is None  # not booting
    reply, sent = answer(r, ipxe(INFORMATION_REQUEST, NODE1, ia=False))
    assert reply.type == REPLY and reply.one(59) == b"http://[2001:db8::10]:8080/boot.ipxe"
    assert 3 not in reply.options and "ipxe-uefi-x64 REPLY address=-" in sent.line
    # EDK2 without IA_NA (the ProxyBinl path's first step): Advertise with the boot file, then its Request.
    advertise, _ = answer(r, edk2(mac=NODE1, ia=False))
    assert advertise.type == ADVERTISE and advertise.one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    reply, _ = answer(r, edk2(REQUEST, mac=NODE1, ia=False, server=OUR_DUID))
    assert reply.type == REPLY and 3 not in reply.options
    for kind in (RENEW, REBIND, RELEASE, DECLINE, CONFIRM):
        assert arrive(r, edk2(kind, mac=NODE1, server=OUR_DUID if kind in (RENEW, RELEASE, DECLINE) else None,
                              addresses=("2001:db8::5",))) is None


def test_server_duid_is_made_once_and_kept(tmp_path: Path) -> None:
    first = duid.load(tmp_path, {1: bytes(6), 2: bytes.fromhex("020000000010")})
    assert first[:4] == b"\0\1\0\1" and first[-6:] == bytes.fromhex("020000000010")  # DUID-LLT, Ethernet
    assert duid.load(tmp_path, {2: bytes.fromhex("02000000ffff")}) == first
    assert duid.make({1: bytes(6)})[:2] == b"\0\4"  # no Ethernet interface: DUID-UUID
    (tmp_path / duid.FILE).write_text("zz\n")
    with pytest.raises(Exception, match="not a DUID"):
        duid.load(tmp_path, {})


def test_stateless_proxy_offer_and_boot_server_discovery_for_edk2(tmp_path: Path) -> None:
    """EDK2's ProxyBinl path: its Solicit for an address gets, beside the site server's Advertise, one with no
    address, vendor class PXEClient and option 59; then its Request to the site's server, copied without its IAs,
    comes to port 4011 and is answered there, from there."""
    r = responder(fleet(), None)
    advertise, sent = answer(r, edk2(mac=NODE1))
    assert advertise.type == ADVERTISE and 3 not in advertise.options and 13 not in advertise.options
    assert advertise.one(16) == struct.pack("!IH", 343, 9) + b"PXEClient"
    assert advertise.one(59) == b"tftp://[2001:db8::10]/ipxe.efi" and sent.dest == ("fe80::1", 546, 0, 3)
    site = b"\0\3\0\1\x02\0\0\0\0\x02"
    discover = edk2(REQUEST, mac=NODE1, ia=False, server=site)
    result = r.handle(Arrival(discover, "2001:db8::2000", 3, SERVER, NET, port=exchange.PXE_PORT, source_port=1234))
    assert isinstance(result, Answer) and result.dest == ("2001:db8::2000", 1234, 0, 0)
    reply = read(result.data)
    assert reply.type == REPLY and 3 not in reply.options and reply.one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    assert reply.one(16) == struct.pack("!IH", 343, 9) + b"PXEClient" and reply.one(2) == OUR_DUID
    # A Secure Boot machine's discovery: shim; iPXE on port 547 with an address request: not ours.
    result = r.handle(Arrival(edk2(REQUEST, mac=SECURE, ia=False, server=site), "2001:db8::2001", 3, SERVER, NET,
                              port=exchange.PXE_PORT, source_port=1234))
    assert read(result.data).one(59) == b"tftp://[2001:db8::10]/shimx64.efi"
    # Stateful mode serves no discovery (the address and the boot file come in one answer).
    assert responder(fleet(), pool(tmp_path)).handle(
        Arrival(discover, "2001:db8::2000", 3, SERVER, NET, port=exchange.PXE_PORT, source_port=1234)) is None



def test_outstanding_advertisements_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases6, "MAX_OFFERS", 8)
    leases = pool(tmp_path)
    r = responder(fleet(), leases)
    answer(r, ipxe(mac=NODE1, rapid=True))  # a lease, kept through any flood
    for n in range(8):
        assert answer(r, ipxe(mac=f"52:54:00:02:00:{n:02x}"))[0].addresses
    flooded, _ = answer(r, ipxe(mac="52:54:00:02:01:00", addresses=("2001:db8::1500",)))
    assert flooded.status == Status.NO_ADDRS_AVAIL
    again, _ = answer(r, ipxe(mac=f"52:54:00:02:00:{3:02x}"))  # one advertised already: the same address
    assert again.addresses[0][1] == "2001:db8::1004"
    renewing, _ = answer(r, ipxe(mac=NODE1))
    assert renewing.addresses[0][1] == "2001:db8::1000"
    r.now[0] += 61  # the advertisements lapse
    assert answer(r, ipxe(mac="52:54:00:02:01:00"))[0].addresses


def test_a_corrupt_lease_journal_is_one_line_and_left_alone(tmp_path: Path) -> None:
    leases = pool(tmp_path)
    answer(responder(fleet(), leases), ipxe(mac=NODE1, rapid=True))
    leases.store.close()
    path = tmp_path / KIND.name
    # A record whose key is a MAC (the IPv4 journal's), not a DUID and an IAID: refused, the file kept.
    body = f"lease {NODE1} 2001:db8::1000 2000000.0 - \"\"\n".encode()
    damaged = path.read_bytes() + body + f"commit 1 {zlib.crc32(body):08x}\n".encode() + body
    path.write_bytes(damaged)
    with pytest.raises(NetbootError, match=r"corrupt lease journal .*not a DUID and an IAID") as e:
        pool(tmp_path)
    assert "\n" not in str(e.value) and path.read_bytes() == damaged
