"""This machine's interface addresses (pyroute2), for telling the operator which URLs reach the server."""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute


def interface_addresses(family: int | None = None) -> list[tuple[str, str]]:
    """(interface, address) of every address except loopback and IPv6 link-local ones."""
    found = []
    with IPRoute() as ip:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        for a in ip.get_addr(family=family or 0):
            address = a.get_attr("IFA_ADDRESS")
            if address is None:
                continue
            parsed = ipaddress.ip_address(address)
            if parsed.is_loopback or parsed.is_link_local:
                continue
            found.append((names.get(a["index"], "?"), address))
    return found


def reachable_hosts(bound: str) -> list[str]:
    """The addresses clients can use for a socket bound to `bound`: itself, or every interface's for a wildcard."""
    if bound == "0.0.0.0":
        return [addr for _, addr in interface_addresses(socket.AF_INET)]
    if bound == "::":  # a dual-stack socket
        return [addr for _, addr in interface_addresses()]
    return [bound]


def ipv4_interfaces() -> dict[int, tuple[str, list[ipaddress.IPv4Interface]]]:
    """Every interface's IPv4 addresses with their prefixes, by interface index (loopback included)."""
    found: dict[int, tuple[str, list[ipaddress.IPv4Interface]]] = {}
    with IPRoute() as ip:
        for link in ip.get_links():
            found[link["index"]] = (link.get_attr("IFLA_IFNAME"), [])
        for a in ip.get_addr(family=socket.AF_INET):
            address = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if address is not None and a["index"] in found:
                found[a["index"]][1].append(ipaddress.IPv4Interface(f"{address}/{a['prefixlen']}"))
    return found


def ipv6_interfaces() -> dict[int, tuple[str, list[ipaddress.IPv6Interface]]]:
    """Every interface's IPv6 addresses with their prefixes, by interface index (link-local ones included; DAD's
    tentative ones not: nothing can be sent from them yet)."""
    found: dict[int, tuple[str, list[ipaddress.IPv6Interface]]] = {}
    with IPRoute() as ip:
        for link in ip.get_links():
            found[link["index"]] = (link.get_attr("IFLA_IFNAME"), [])
        for a in ip.get_addr(family=socket.AF_INET6):
            address = a.get_attr("IFA_ADDRESS")
            flags = a.get_attr("IFA_FLAGS") or a["flags"]
            if address is not None and a["index"] in found and not flags & _IFA_F_TENTATIVE:
                found[a["index"]][1].append(ipaddress.IPv6Interface(f"{address}/{a['prefixlen']}"))
    return found


def link_addresses() -> dict[int, bytes]:
    """Every interface's hardware address (a MAC for Ethernet), by interface index; loopback's is all zeros."""
    with IPRoute() as ip:
        return {link["index"]: bytes.fromhex(mac.replace(":", "")) for link in ip.get_links()
                if (mac := link.get_attr("IFLA_ADDRESS"))}


_IFA_F_TENTATIVE = 0x40  # linux/if_addr.h
