"""Templates from ipxe-scripts/, iPXE scripts and GRUB configurations alike, with @name@ placeholders (iPXE and
GRUB own ${...})."""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from pathlib import Path

from netboot.core.artifacts import IMAGE_URL

_PLACEHOLDER = re.compile(r"@([a-z_]+)@")


def template_dir() -> Path:
    installed = Path(str(files("netboot"))) / "ipxe-scripts"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "ipxe-scripts"


@functools.cache
def _template(name: str) -> str:
    return (template_dir() / name).read_text()


def render(name: str, **values: str) -> str:
    text = _template(name)

    def substitute(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template {name} needs a value for @{m.group(1)}@")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(substitute, text)


def fetch_args(url: str) -> str:
    """Kernel parameters for a stage 1 that downloads its image (`netboot build --fetch`): where the image is,
    and what iPXE knew of the network, so that stage 1 needs no DHCP of its own: the interface that booted
    (BOOTIF, as pxelinux's IPAPPEND 2 writes it) and its address, gateway, netmask and DNS server in the
    kernel's `ip=` syntax (Documentation/admin-guide/nfs/nfsroot.rst: client:server:gateway:netmask:hostname:
    device:autoconf:dns0); on IPv6, its address with the prefix length of the router's advertisement and its
    default router and DNS server (iPXE's ip6, len6, gateway6 and dns6 settings, from NDP or DHCPv6), in
    netboot.ip6=, netboot.gateway6= and netboot.dns6=. A setting iPXE does not have expands to nothing, and stage
    1 does without it."""
    return (f"{IMAGE_URL}={url} BOOTIF=01-${{netX/mac:hexhyp}} "
            "ip=${netX/ip}::${netX/gateway}:${netX/netmask}:::none:${dns} "
            "netboot.ip6=${netX/ip6}/${netX/len6} netboot.gateway6=${netX/gateway6} netboot.dns6=${dns6}")
