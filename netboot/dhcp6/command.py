"""Command-line options of the DHCPv6 server (`netboot serve --dhcp6 …`)."""

from __future__ import annotations

import argparse

from netboot.core.errors import NetbootError
from netboot.dhcp6 import Dhcp6Config
from netboot.dhcp6.leases import Pool6


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DHCPv6")
    g.add_argument("--dhcp6", metavar="stateless|START-END",
                   help="answer DHCPv6 too (UDP 547): a range such as 2001:db8::1000-2001:db8::1fff to hand out "
                   "addresses (IA_NA) with boot information, as EDK2's PXE over IPv6 needs (routers advertising "
                   "the M flag); or 'stateless' to answer network-boot clients with boot information only "
                   "(Information-Request, Solicit without IA_NA; EDK2's PXE as a proxy beside the site's server, "
                   "and on port 4011), beside SLAAC or the site's DHCPv6 server. "
                   "Leases are kept in --state-dir")
    g.add_argument("--dhcp6-interface", action="append", default=[], metavar="NAME",
                   help="answer DHCPv6 on this interface only (repeatable; default: every interface)")
    g.add_argument("--dhcp6-lease-time", type=int, metavar="SECONDS",
                   help="valid and preferred lifetime of DHCPv6 addresses (default 3600)")


def config_from_args(args: argparse.Namespace) -> Dhcp6Config | None:
    if args.dhcp6 is None:
        given = ["--dhcp6-interface"] * bool(args.dhcp6_interface)
        given += ["--dhcp6-lease-time"] * (args.dhcp6_lease_time is not None)
        if given:
            raise NetbootError(f"{given[0]} needs --dhcp6")
        return None
    common = dict(interfaces=tuple(args.dhcp6_interface), state_dir=args.state_dir,
                  uefi_binary=getattr(args, "dhcp_uefi_binary", "ipxe.efi"))
    if args.dhcp6 == "stateless":
        if args.dhcp6_lease_time is not None:
            raise NetbootError("--dhcp6-lease-time is for --dhcp6 START-END: stateless mode hands out no addresses")
        return Dhcp6Config(**common)
    first, last = Pool6.parse_range(args.dhcp6)
    lease_time = 3600 if args.dhcp6_lease_time is None else args.dhcp6_lease_time
    if not 60 <= lease_time <= 2**31 - 1:
        raise NetbootError(f"--dhcp6-lease-time {lease_time}: expected 60 seconds or more")
    return Dhcp6Config(range=(first, last), lease_time=lease_time, database=getattr(args, "database", None),
                       name=getattr(args, "name", ""), **common)
