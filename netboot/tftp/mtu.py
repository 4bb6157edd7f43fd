"""The MTU of the interface a request arrived on, which caps blksize (RFC 2348 via the path MTU)."""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFMTU = 0x8921  # linux/sockios.h
_IPV4_OVERHEAD = 20 + 8 + 4  # IP + UDP + TFTP DATA headers
_IPV6_OVERHEAD = 40 + 8 + 4


def interface_mtu(ifindex: int) -> int | None:
    """MTU of the interface with this index, or None when it cannot be told (gone, not Linux)."""
    try:
        name = socket.if_indextoname(ifindex)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = fcntl.ioctl(s.fileno(), _SIOCGIFMTU, struct.pack("16si", name.encode(), 0))
    except OSError:
        return None
    return struct.unpack_from("16si", ifreq)[1]


def blksize_limit(mtu: int | None, ipv6: bool) -> int | None:
    """The largest blksize whose DATA packets fit the MTU unfragmented."""
    if mtu is None:
        return None
    return mtu - (_IPV6_OVERHEAD if ipv6 else _IPV4_OVERHEAD)
