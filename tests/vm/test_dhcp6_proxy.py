"""EDK2's "ProxyBinl" path on an IPv6-only LAN: the site's DHCPv6 server (Debian's dnsmasq) hands out the address,
`netboot serve --dhcp6 stateless` the boot file (an Advertise without address, vendor class PXEClient, option 59,
then a Reply on port 4011 to EDK2's boot server discovery), the IPv6 twin of proxy DHCP."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from lan_support import boot_vm, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import assert_booted

from devtools.lan import Lan

SERVER = "2001:db8::10"
SITE_RANGE = (ipaddress.IPv6Address("2001:db8::2000"), ipaddress.IPv6Address("2001:db8::2fff"))
MAC = "52:54:00:00:06:11"


@pytest.mark.slow  # a VM under emulation through firmware, iPXE and a kernel
def test_edk2_takes_its_boot_file_from_the_stateless_server_beside_the_sites(
        lan: Lan, outs: dict[str, Path], system: Path, closure: list[str], tmp_path: Path) -> None:
    lan.host("router", "2001:db8::1/64").radvd(managed=True)
    # The site's server knows nothing of PXE firmware; iPXE (user class iPXE) it sends to netboot's script, as a
    # site configures its server for iPXE (iPXE takes no boot file from an Advertise without an address).
    site = lan.host("dhcp", "2001:db8::2/64")
    site.link_local()
    dnsmasq = site.dnsmasq("--dhcp-userclass=set:ipxe,iPXE",
                           f"--dhcp-option=tag:ipxe,option6:bootfile-url,http://[{SERVER}]:8080/boot.ipxe",
                           leasefile=tmp_path / "site.leases",
                           range=f"{SITE_RANGE[0]},{SITE_RANGE[1]},64,1h")
    host = lan.host("netboot", f"{SERVER}/64")
    host.link_local()
    server = serve_in(host, "--dir", outs["squashfs"], "--http", f"[{SERVER}]:8080", "--tftp", f"[{SERVER}]:69",
                      "--dhcp6", "stateless", "--state-dir", tmp_path / "state")
    result = boot_vm(lan, MAC, uefi=True, pxe_rom=False, ipv6_only=True)
    assert_booted(result, closure, system)
    station = re.search(r"Station IP address is (\S+)", result.console)
    assert station and SITE_RANGE[0] <= ipaddress.IPv6Address(station.group(1)) <= SITE_RANGE[1], \
        result.console[-3000:]
    # netboot's proxy Advertise, then its answer to the discovery on port 4011, then ipxe.efi over TFTP.
    assert re.search(rf"dhcp6: {MAC} uefi-x64-pxe ADVERTISE address=- boot=tftp://\[{SERVER}\]/ipxe\.efi",
                     server.log), server.log
    assert re.search(rf"dhcp6: {MAC} uefi-x64-pxe REPLY address=- boot=tftp://\[{SERVER}\]/ipxe\.efi",
                     server.log), server.log
    assert re.search(r"^netboot: \S+ mac=- profile=- tftp /ipxe\.efi complete", server.log, re.M), server.log
    assert not (tmp_path / "state" / "dhcp6-leases.journal").exists()
    server.stop()
    dnsmasq.stop()
