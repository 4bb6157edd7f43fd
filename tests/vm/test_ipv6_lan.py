"""An IPv6-only namespace LAN: no IPv4 address anywhere, Debian's radvd as the site's router. With the M flag, two
OVMF VMs go through EDK2's own PXE over IPv6 (DHCPv6 with IA_NA and option 59 from `netboot serve --dhcp6 RANGE`,
ipxe.efi over TFTP, iPXE's own DHCPv6, boot.ipxe, kernel and initrd over HTTP) to their systems' init, one of them
a --fetch system whose stage 1 downloads and checks its image over IPv6."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import re
import subprocess
from pathlib import Path

import pytest
from lan_support import boot_vm, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import assert_booted, built

from devtools.lan import Host, Lan

SERVER = "2001:db8::10"
RANGE = (ipaddress.IPv6Address("2001:db8::1000"), ipaddress.IPv6Address("2001:db8::1fff"))
PLAIN, FETCHER = "52:54:00:00:06:01", "52:54:00:00:06:02"
SERVED = ("--http", f"[{SERVER}]:8080", "--tftp", f"[{SERVER}]:69")
# The steps of a boot whose times the tests print (docs/ipv6.md, "Measured"): EDK2's PXE, iPXE's start, its
# network configured (its DHCPv4 timed out beside DHCPv6), the script's URL, stage 1's download, init.
MARKS = ("Start PXE over IPv6", "iPXE initialising", "Configuring (net0", "Filename: http", "netboot stage 1: fetched",
         "NETBOOT-TEST-OK")


def fleet(d: Path, plain: Path, fetch: Path) -> Path:
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "{plain}"
[profiles.fetch]
dir = "{fetch}"
[machines."{PLAIN}"]
hostname = "plain"
[machines."{FETCHER}"]
profile = "fetch"
""")
    return f


def ipv4_anywhere(lan: Lan) -> list[str]:
    """Every IPv4 address of the LAN's namespaces but loopback's."""
    found = []
    for netns in [lan.switch, *(h.netns for h in lan.hosts.values())]:
        out = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show"], capture_output=True, text=True,
                             check=True).stdout
        found += [f"{netns}: {line}" for line in out.splitlines() if " lo " not in line]
    return found


def status_of(host: Host, port: int, mac: str) -> dict:
    """The status listener's record of a machine (GET /api/machines/MAC over IPv6 loopback)."""
    out = host.run(["curl", "-sS", "-g", f"http://[::1]:{port}/api/machines/{mac}"], capture_output=True,
                   text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow  # two VMs under emulation, through firmware, iPXE and a kernel each
def test_two_ovmf_vms_boot_through_pxe_over_ipv6(lan: Lan, outs: dict[str, Path], system: Path,
                                                 closure: list[str], tmp_path: Path) -> None:
    fetch_out = built(system, "--format", "squashfs", "--fetch")
    lan.host("router", "2001:db8::1/64").radvd(managed=True)
    host = lan.host("netboot", f"{SERVER}/64")
    server = serve_in(host, "--machines", fleet(tmp_path, outs["squashfs"], fetch_out), *SERVED,
                      "--dhcp6", f"{RANGE[0]}-{RANGE[1]}", "--state-dir", tmp_path / "state",
                      "--status", "[::1]:0")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # ipv6_only: EDK2 makes no PXE over IPv4 boot option, whose unanswered DHCPv4 would cost its timeout.
        booting = {mac: pool.submit(boot_vm, lan, mac, uefi=True, pxe_rom=False, ipv6_only=True,
                                    marks=MARKS)
                   for mac in (PLAIN, FETCHER)}
        results = {mac: future.result() for mac, future in booting.items()}
    assert ipv4_anywhere(lan) == []
    for mac, result in results.items():
        assert_booted(result, closure, system)
        print(f"{mac}: init after {result.elapsed:.1f} s; {result.seen_at}")
        assert "Start PXE over IPv6" in result.console and "Start PXE over IPv4" not in result.console
        # EDK2's address, from the range, is the one it fetched iPXE with over TFTP.
        station = re.search(r"Station IP address is (\S+)", result.console)
        assert station, result.console[-3000:]
        edk2 = ipaddress.IPv6Address(station.group(1))
        assert RANGE[0] <= edk2 <= RANGE[1]
        assert re.search(rf"^netboot: {edk2} mac=- profile=- tftp /ipxe\.efi complete", server.log, re.M), \
            server.log
        # iPXE's own DHCPv6 address fetched this machine's script over HTTP, and the script shows it.
        assert re.search(rf"netboot: {mac} at 2001:db8::[0-9a-f:]+ boots profile", result.console), \
            result.console[-3000:]
        script = re.findall(rf"^netboot: (\S+) mac={mac} profile=\S+ http /machine/{mac.replace(':', '-')}/"
                            rf"boot\.ipxe 200", server.log, re.M)
        assert script and RANGE[0] <= ipaddress.IPv6Address(script[-1]) <= RANGE[1], server.log
    # Stage 1 of the --fetch system: iPXE's address, the image over IPv6 from the URL iPXE was told, checked.
    console = results[FETCHER].console
    assert re.search(r"netboot stage 1: network: eth0 2001:db8::[0-9a-f:]+/64 .*\(from the loader\)", console), \
        console[-3000:]
    assert f"netboot stage 1: fetching http://[{SERVER}]:8080/machine/{FETCHER.replace(':', '-')}/" in console
    assert re.search(r"netboot stage 1: fetched \d+ bytes in .* sha256 checked", console), console[-3000:]
    assert re.search(rf"^netboot: 2001:db8::\S+ mac={FETCHER} profile=fetch http /machine/\S+/image 200",
                     server.log, re.M), server.log
    # The status record shows each machine's IPv6 address.
    for mac in (PLAIN, FETCHER):
        record = status_of(host, server.status_port, mac)
        assert ipaddress.IPv6Address(record["client"]) in ipaddress.IPv6Network("2001:db8::/64"), record
    server.stop()


STATELESS = "52:54:00:00:06:03"


@pytest.mark.slow  # a VM under emulation through firmware, iPXE and a kernel
def test_stateless_mode_answers_a_real_ipxe_beside_slaac(lan: Lan, outs: dict[str, Path], system: Path,
                                                         closure: list[str], tmp_path: Path) -> None:
    """radvd with the O flag and an autonomous prefix: addresses come from SLAAC, and `--dhcp6 stateless` answers
    the Information-Request of iPXE (the EFI driver of the NIC's option ROM, under OVMF) with the script's URL."""
    lan.host("router", "2001:db8::1/64").radvd(managed=False, other=True)
    server = serve_in(lan.host("netboot", f"{SERVER}/64"), "--dir", outs["squashfs"], *SERVED,
                      "--dhcp6", "stateless", "--state-dir", tmp_path / "state")
    result = boot_vm(lan, STATELESS, uefi=True, pxe_rom=True, ipv6_only=True, marks=MARKS)
    print(f"{STATELESS}: init after {result.elapsed:.1f} s; {result.seen_at}")
    assert_booted(result, closure, system)
    assert ipv4_anywhere(lan) == []
    # The address iPXE fetched with is its SLAAC one: the prefix and its MAC's EUI-64 (RFC 4291 §2.5.1).
    slaac = "2001:db8::5054:ff:fe00:603"
    assert re.search(rf"^netboot: {slaac} mac={STATELESS} profile=default http /machine/\S+/boot\.ipxe 200",
                     server.log, re.M), server.log
    assert re.search(rf"dhcp6: {STATELESS} ipxe\S* REPLY .*boot=http://\[{SERVER}\]:8080/boot\.ipxe", server.log), \
        server.log
    assert not (tmp_path / "state" / "dhcp6-leases").exists() and "IA_NA" not in server.log
    server.stop()


ARM = "52:54:00:00:06:04"


@pytest.mark.slow  # an arm64 VM under emulation, to its loader
def test_an_arm64_machine_gets_its_loader_over_dhcpv6(lan: Lan, arm64_system: Path, arm64_loaders: Path,
                                                      tmp_path: Path) -> None:
    """AAVMF's own PXE over IPv6 (option 61 = 11) gets an address and the arm64 loader, Debian's signed
    shimaa64.efi (there is no arm64 ipxe.efi), and downloads it over TFTP; the boot on to init through GRUB is
    IPv4's (tests/vm/test_arm64_lan.py)."""
    arm_squash = built(arm64_system, "--format", "squashfs")
    fleet = tmp_path / "machines.toml"
    fleet.write_text(f'[profiles.default]\ndir = {{ arm64 = "{arm_squash}" }}\n')
    lan.host("router", "2001:db8::1/64").radvd(managed=True)
    server = serve_in(lan.host("netboot", f"{SERVER}/64"), "--machines", fleet, *SERVED,
                      "--dhcp6", f"{RANGE[0]}-{RANGE[1]}", "--state-dir", tmp_path / "state",
                      "--loaders", f"arm64={arm64_loaders}")
    result = boot_vm(lan, ARM, uefi=True, pxe_rom=False, ipv6_only=True, arch="arm64", timeout=900,
                     until=("NBP file downloaded successfully",), marks=("Start PXE over IPv6",))
    print(f"{ARM}: loader downloaded after {result.elapsed:.1f} s; {result.seen_at}")
    assert "Start PXE over IPv4" not in result.console  # AAVMF takes OVMF's switch too
    assert "NBP filename is shimaa64.efi" in result.console, result.console[-3000:]
    assert "NBP file downloaded successfully" in result.console, result.console[-3000:]
    m = re.search(rf"dhcp6: {ARM} uefi-arm64-pxe REPLY address=(\S+) boot=tftp://\[{SERVER}\]/shimaa64\.efi",
                  server.log)
    assert m, server.log
    assert RANGE[0] <= ipaddress.IPv6Address(m.group(1)) <= RANGE[1]
    assert re.search(rf"^netboot: {m.group(1)} mac=\S+ profile=\S+ tftp /shimaa64\.efi complete", server.log,
                     re.M), server.log
    server.stop()
