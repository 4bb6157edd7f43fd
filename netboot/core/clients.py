"""Which client a connection or request counts as, for the per-client limits of TFTP and HTTP."""

from __future__ import annotations

import ipaddress


def client_of(host: str) -> str:
    """The address `host` counts under: IPv4-mapped IPv6 as IPv4, so that a host counts once; other IPv6
    addresses by their /64, since one host may use any address of its /64 (RFC 4941 temporary addresses,
    or a stranger walking through them to get past a per-address limit)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
