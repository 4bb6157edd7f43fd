"""Command-line options of the DHCP server (`netboot serve --dhcp …`)."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address

from netboot.core.errors import NetbootError
from netboot.dhcp import DhcpConfig
from netboot.dhcp.leases import Pool

UEFI_BINARIES = ("ipxe.efi", "snponly.efi")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DHCP")
    g.add_argument("--dhcp", metavar="proxy|START-END",
                   help="answer DHCP too: 'proxy' beside the site's DHCP server (boot information only, ports 67 "
                   "and 4011), or a range such as 192.0.2.100-192.0.2.199 to be the network's DHCP server")
    g.add_argument("--dhcp-interface", action="append", default=[], metavar="NAME",
                   help="answer DHCP on this interface only (repeatable; default: every interface)")
    g.add_argument("--dhcp-relay", action="append", default=[], metavar="ADDR",
                   help="a DHCP relay agent's address as it writes it in giaddr (its address on the machines' "
                   "network): requests relayed with that giaddr are answered there even when the relay sends them "
                   "from another of its addresses, as routers do. A relay that sends from the address it writes "
                   "needs none; a request naming any other giaddr is dropped (repeatable)")
    g.add_argument("--dhcp-router", metavar="ADDR", help="router (option 3) to hand out with addresses")
    g.add_argument("--dhcp-dns", metavar="ADDR[,ADDR…]", help="DNS servers (option 6) to hand out with addresses")
    g.add_argument("--dhcp-domain", metavar="NAME", help="domain name (option 15) to hand out with addresses")
    g.add_argument("--dhcp-lease-time", type=int, metavar="SECONDS",
                   help="lease time of addresses (default 3600)")
    g.add_argument("--dhcp-uefi-binary", choices=UEFI_BINARIES, default="ipxe.efi",
                   help="what UEFI PXE firmware chainloads: ipxe.efi (its own drivers, default) or snponly.efi "
                   "(the firmware's network driver)")


def config_from_args(args: argparse.Namespace) -> DhcpConfig | None:
    leasing = {"--dhcp-router": args.dhcp_router, "--dhcp-dns": args.dhcp_dns, "--dhcp-domain": args.dhcp_domain,
               "--dhcp-lease-time": args.dhcp_lease_time}
    if args.dhcp is None:
        given = [k for k, v in leasing.items() if v is not None] + ["--dhcp-interface"] * bool(args.dhcp_interface)
        given += ["--dhcp-relay"] * bool(args.dhcp_relay)
        if given:
            raise NetbootError(f"{given[0]} needs --dhcp")
        return None
    common = dict(interfaces=tuple(args.dhcp_interface), state_dir=args.state_dir, uefi_binary=args.dhcp_uefi_binary,
                  relays=tuple(_relay(a) for a in args.dhcp_relay), database=args.database, name=args.name)
    if args.dhcp == "proxy":
        given = [k for k, v in leasing.items() if v is not None]
        if given:
            raise NetbootError(f"{given[0]} is for --dhcp START-END: in proxy mode the site's DHCP server says that")
        return DhcpConfig(proxy=True, **common)
    first, last = Pool.parse_range(args.dhcp)
    lease_time = 3600 if args.dhcp_lease_time is None else args.dhcp_lease_time
    if not 60 <= lease_time <= 2**31 - 1:
        raise NetbootError(f"--dhcp-lease-time {lease_time}: expected 60 seconds or more")
    return DhcpConfig(
        proxy=False, range=(first, last), router=_address(args.dhcp_router, "--dhcp-router"),
        dns=tuple(_address(a, "--dhcp-dns") for a in args.dhcp_dns.split(",")) if args.dhcp_dns else (),
        domain=_domain(args.dhcp_domain), lease_time=lease_time, **common,
    )


def _address(text: str | None, what: str) -> IPv4Address | None:
    if text is None:
        return None
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise NetbootError(f"{what} {text!r} is not an IPv4 address") from None


def _relay(text: str) -> IPv4Address:
    address = _address(text, "--dhcp-relay")
    assert address is not None
    if address.is_unspecified or address.is_multicast or address == IPv4Address("255.255.255.255"):
        raise NetbootError(f"--dhcp-relay {text!r}: expected a relay agent's unicast address")
    return address


def _domain(text: str | None) -> str:
    if text is None:
        return ""
    if not text or len(text) > 253 or any(c.isspace() or c == "\0" for c in text):
        raise NetbootError(f"--dhcp-domain {text!r} is not a domain name")
    return text
