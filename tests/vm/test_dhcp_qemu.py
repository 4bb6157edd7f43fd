"""Real firmware through netboot's own DHCP on a namespace LAN: EDK2's PXE client (OVMF, no option ROM) and
SeaBIOS with QEMU's iPXE ROM in proxy mode beside Debian's dnsmasq; EDK2 then its iPXE in authoritative mode alone,
then restarted (a second machine's exchanges there played by its iPXE's messages)."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import signal
from pathlib import Path

from dhcp_support import ACK, DISCOVER, OFFER, REQUEST, ipxe
from lan_support import boot_vm, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import assert_booted
from test_dhcp_live import asked, listening, probe, start, wait_for

from devtools.lan import Lan
from netboot.dhcp import journal

UEFI_MAC, BIOS_MAC = "52:54:00:00:04:01", "52:54:00:00:04:02"
NO_PXEDHCP = bytes([176, 1, 1])  # option 175's value in an answer to iPXE: sub-option 176 (no-pxedhcp) = 1
RANGE = (ipaddress.IPv4Address("192.0.2.100"), ipaddress.IPv4Address("192.0.2.199"))


def fleet(d: Path, out: Path, reserve: bool = False) -> Path:
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "{out}"
[machines."{UEFI_MAC}"]
hostname = "uefi-node"
{'ip = "192.0.2.42"' if reserve else ''}
""")
    return f


def address_used(server_log: str, mac: str) -> str:
    """The address the machine had when its iPXE fetched its script (the client of that HTTP request)."""
    found = re.findall(rf"^netboot: (\S+) mac={mac} \S+ http /machine/{mac.replace(':', '-')}/boot.ipxe 200",
                       server_log, re.M)
    assert found, server_log
    return found[-1]


def boot_both(lan: Lan) -> tuple:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        uefi = pool.submit(boot_vm, lan, UEFI_MAC, uefi=True, pxe_rom=False)
        bios = pool.submit(boot_vm, lan, BIOS_MAC, uefi=False)
        return uefi.result(), bios.result()


def test_proxy_mode_beside_the_sites_dhcp_server(lan: Lan, outs: dict[str, Path], system: Path,
                                                  closure: list[str], tmp_path: Path) -> None:
    site = lan.host("site", "192.0.2.2/24").dnsmasq(leasefile=tmp_path / "dnsmasq.leases")  # plain leases only
    server = start(lan.host("netboot", "192.0.2.10/24"), "--machines", fleet(tmp_path, outs["squashfs"]),
                   "--dhcp", "proxy")
    uefi, bios = boot_both(lan)
    for result in (uefi, bios):
        assert_booted(result, closure, system)
    # EDK2 booted ipxe.efi from netboot's proxy offer (told to boot the file named, it did not ask on port
    # 4011), then iPXE chained to HTTP.
    assert f"{UEFI_MAC} uefi-x64-pxe OFFER address=- boot=tftp://192.0.2.10/ipxe.efi" in server.log
    assert f"{UEFI_MAC} uefi-x64-pxe ACK" not in server.log
    for mac in (UEFI_MAC, BIOS_MAC):
        assert re.search(rf"{mac} ipxe-\S+ (OFFER|ACK) address=\S+ boot=http://192\.0\.2\.10:8080/boot\.ipxe",
                         server.log), server.log
    # Every address came from the site's server: netboot's answers carry none.
    leased = site.leases()
    for mac in (UEFI_MAC, BIOS_MAC):
        assert RANGE[0] <= ipaddress.IPv4Address(leased[mac]) <= RANGE[1], leased
        assert address_used(server.log, mac) == leased[mac]
    assert "yiaddr" not in server.log and "DHCPOFFER" not in server.log
    assert "DHCPACK" in site.log and "PXEClient" in site.log  # dnsmasq saw and served the PXE clients
    server.stop()


def test_authoritative_mode_alone_with_a_reservation_and_a_restart(lan: Lan, outs: dict[str, Path], system: Path,
                                                                   closure: list[str], tmp_path: Path) -> None:
    host = lan.host("netboot", "192.0.2.10/24")
    args = ("--machines", fleet(tmp_path, outs["squashfs"], reserve=True), "--dhcp", "192.0.2.100-192.0.2.199",
            "--state-dir", tmp_path / "state")
    server = start(host, *args)
    client = lan.host("client", "192.0.2.50/24")
    # A BIOS machine's iPXE ROM takes an address from the range (SeaBIOS's boot itself is the proxy test's).
    (_, offer), = probe(client, ipxe(DISCOVER, mac=BIOS_MAC, arch=0), expect=1)
    other = offer.yiaddr
    assert RANGE[0] <= ipaddress.IPv4Address(other) <= RANGE[1]
    (_, ack), = probe(client, ipxe(REQUEST, mac=BIOS_MAC, arch=0, extra=asked(other)), expect=1)
    assert (ack.type, ack.yiaddr, ack.file) == (ACK, other, "http://192.0.2.10:8080/boot.ipxe")
    assert offer.options[175] == ack.options[175] == NO_PXEDHCP  # iPXE: no ProxyDHCP offers to wait for
    with listening(lan.host("watcher", "192.0.2.60/24")) as heard:  # every answer to the VM is broadcast
        uefi = boot_vm(lan, UEFI_MAC, uefi=True, pxe_rom=False)
    assert_booted(uefi, closure, system)
    # EDK2 got ipxe.efi without option 175; its iPXE, booting on, got the script's URL with no-pxedhcp.
    answers = [(r.type, r.file, r.options.get(175)) for _, r in heard if r.mac == UEFI_MAC]
    assert {(OFFER, "ipxe.efi", None), (ACK, "ipxe.efi", None)} <= set(answers), answers
    assert {(OFFER, "http://192.0.2.10:8080/boot.ipxe", NO_PXEDHCP),
            (ACK, "http://192.0.2.10:8080/boot.ipxe", NO_PXEDHCP)} <= set(answers), answers
    assert all(option == NO_PXEDHCP for _, file, option in answers if file.endswith("/boot.ipxe")), answers
    assert address_used(server.log, UEFI_MAC) == "192.0.2.42"  # its reservation
    assert f"{UEFI_MAC} uefi-x64-pxe ACK address=192.0.2.42 boot=tftp://192.0.2.10/ipxe.efi" in server.log
    leases = journal.read(tmp_path / "state")[0]
    assert {mac: x.ip for mac, x in leases.items()} == {UEFI_MAC: "192.0.2.42", BIOS_MAC: other}
    # A restart (SIGTERM, then a new process): the same machine gets the same address again.
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0
    again = start(host, *args)
    (_, offer), = probe(client, ipxe(DISCOVER, mac=BIOS_MAC, arch=0), expect=1)
    assert (offer.type, offer.yiaddr) == (OFFER, other)
    (_, ack), = probe(client, ipxe(REQUEST, mac=BIOS_MAC, arch=0, extra=asked(other)), expect=1)
    assert (ack.type, ack.yiaddr, ack.file) == (ACK, other, "http://192.0.2.10:8080/boot.ipxe")
    wait_for(again, f"{BIOS_MAC} ipxe-bios ACK address={other} ")
    again.stop()
