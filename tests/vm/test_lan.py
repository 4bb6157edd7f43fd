"""The LAN in network namespaces (devtools.lan), and real PXE firmware booting through it: Debian's dnsmasq as the
site's DHCP server doing the PXE side as docs/dhcp.md configures it, `netboot serve` doing TFTP and HTTP.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lan_support import DNSMASQ_PXE, NETBOOT_ADDRESS, boot_vm, lan_fixture, serve_in  # noqa: F401  (`lan`)
from support import assert_booted, need

from devtools import lan as lan_module
from devtools.lan import Lan, LanError, leases

UEFI_MAC = "52:54:00:00:02:01"

# A UDP echo server: says "ready" once bound, answers one datagram, exits.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7007))
print("ready", flush=True)
data, peer = s.recvfrom(100)
s.sendto(b"echo " + data + b" to " + peer[0].encode(), peer)
"""
ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"hello from " + sys.argv[2].encode(), (sys.argv[1], 7007))
print(s.recvfrom(100)[0].decode())
"""


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def packets(log: str, mac: str) -> list[str]:
    """dnsmasq's --log-dhcp lines for each DHCP packet from `mac` (each begins with "available DHCP range")."""
    blocks: list[list[str]] = []
    for line in log.splitlines():
        if "available DHCP range" in line:
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    mine = re.compile(rf"DHCP[A-Z]+\(eth0\) (\S+ )?{mac}\b")
    return ["\n".join(b) + "\n" for b in blocks if any(mine.search(ln) for ln in b)]


def test_hosts_talk_over_the_bridge_and_close_leaves_nothing() -> None:
    need("ip")
    the_lan = Lan("nbtest")
    try:
        a = the_lan.host("a", "192.0.2.1/24")
        b = the_lan.host("b", "192.0.2.2/24")
        assert (a.address, a.ifname, b.address) == ("192.0.2.1", "eth0", "192.0.2.2")
        echo = a.popen([sys.executable, "-c", ECHO, a.address], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
        asked = b.run([sys.executable, "-c", ASK, a.address, "b"], capture_output=True, text=True, timeout=20)
        assert asked.returncode == 0, asked.stderr
        assert asked.stdout.split() == ["echo", "hello", "from", "b", "to", "192.0.2.2"]
        assert echo.wait(timeout=5) == 0
        # Still running at close: one started through Host.popen, one put into the switch by vm() (as QEMU is).
        sleeper = b.popen(["sleep", "600"])
        stray = subprocess.Popen(the_lan.vm(["sleep", "600"]))
        tap = the_lan.tap()
        links = subprocess.run(["ip", "-n", the_lan.switch, "-o", "link", "show", "master", "br0"],
                               capture_output=True, text=True, check=True).stdout
        assert tap in links and links.count("veth") == 2, links
        mine = {the_lan.switch, a.netns, b.netns}
        assert mine <= namespaces()
        # The host's own namespace is not on the LAN.
        assert "192.0.2.1" not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    finally:
        the_lan.close()
    assert not mine & namespaces()
    assert sleeper.poll() is not None
    stray.wait(timeout=10)
    assert not alive(sleeper.pid) and not alive(stray.pid)
    the_lan.close()  # idempotent


def test_errors_name_the_command_and_cleanup_survives_them(monkeypatch: pytest.MonkeyPatch) -> None:
    need("ip")
    with Lan("nbtest") as the_lan:
        with pytest.raises(LanError, match=r"`ip -n nbtest-\S+-bad addr add 192\.0\.2\.300/24 dev eth0` failed.*"):
            the_lan.host("bad", "192.0.2.300/24")
        with pytest.raises(LanError, match="prefix length"):
            the_lan.host("noprefix", "192.0.2.3")
        bad = f"{the_lan.name}-bad"
        assert bad in namespaces()  # made before the failure, deleted at close
    assert bad not in namespaces()

    # Setup failing half-way still deletes what was made.
    real_ip = lan_module.ip

    def failing_ip(*args: str) -> str:
        if "bridge" in args:
            raise LanError("`ip link add br0 type bridge` failed (exit status 2): injected")
        return real_ip(*args)

    def ours() -> set[str]:  # this process's: other test processes make LANs of their own meanwhile
        return {n for n in namespaces() if n.startswith(f"nbtest-{os.getpid()}-")}

    before = ours()
    monkeypatch.setattr(lan_module, "ip", failing_ip)
    with pytest.raises(LanError, match="injected"):
        Lan("nbtest")
    assert ours() == before


def test_an_ipv6_only_lan_with_radvd_as_its_router() -> None:
    """Hosts with IPv6 addresses only; radvd advertises the prefix (O flag, autonomous: a SLAAC address for a host
    without one) and itself as the default router; close stops it and removes its configuration."""
    need("ip")
    need("radvd")
    with Lan("nbtest") as the_lan:
        router = the_lan.host("router", "2001:db8::1/64")
        radvd = router.radvd(managed=False, other=True)
        server = the_lan.host("server", "2001:db8::10/64")
        node = the_lan.host("node", None)
        assert (server.address, node.address) == ("2001:db8::10", "")
        for host in (router, server, node):
            v4 = host.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
            assert [ln.split()[1] for ln in v4.splitlines()] == ["lo"], v4
        gateway = router.link_local()

        def learned() -> tuple[str, str]:
            routes = node.run(["ip", "-6", "route", "show", "default"], capture_output=True, text=True).stdout
            addresses = node.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"],
                                 capture_output=True, text=True).stdout
            return routes, addresses

        deadline = time.monotonic() + 20
        while not all(learned()) and time.monotonic() < deadline:
            time.sleep(0.1)
        routes, addresses = learned()
        assert f"default via {gateway} dev eth0 proto ra" in routes, (routes, radvd.log)
        assert re.search(r"inet6 2001:db8::\S+/64 scope global .*dynamic", addresses), (addresses, radvd.log)
        config = re.search(r"--config (\S+)", " ".join(radvd.proc.args)).group(1)
        assert "AdvManagedFlag off;" in Path(config).read_text()
    assert radvd.proc.poll() is not None and not Path(config).exists()


def test_leases_parses_dnsmasq_lease_files(tmp_path: Path) -> None:
    f = tmp_path / "leases"
    assert leases(f) == {}
    f.write_text("1764030000 52:54:00:00:02:01 192.0.2.150 * 01:52:54:00:00:02:01\n"
                 "1764030001 52:54:00:00:02:0A 192.0.2.151 node2 *\n"
                 "duid 00:01:00:01:2c:aa:bb:cc:52:54:00:00:00:01\n")
    assert leases(f) == {"52:54:00:00:02:01": "192.0.2.150", "52:54:00:00:02:0a": "192.0.2.151"}


def test_dnsmasq_pxe_and_netboot_serve_boot_uefi(lan: Lan, outs: dict[str, Path], system: Path,
                                                 closure: list[str], tmp_path: Path) -> None:
    """EDK2's own PXE client takes both branches of the configuration: ipxe.efi for the firmware, then the HTTP
    URL for iPXE (the branch QEMU's BIOS iPXE ROM takes at once; SeaBIOS boots in test_dhcp_qemu.py)."""
    need("dnsmasq")
    server = serve_in(lan.host("netboot", f"{NETBOOT_ADDRESS}/24"), "--dir", outs["squashfs"])
    try:
        dnsmasq = lan.host("dhcp", "192.0.2.2/24").dnsmasq(*DNSMASQ_PXE, leasefile=tmp_path / "leases")
        # UEFI with no iPXE in the NIC's ROM: EDK2's own PXE client fetches ipxe.efi over TFTP.
        uefi = boot_vm(lan, UEFI_MAC, uefi=True, pxe_rom=False)
    finally:
        server.stop()
    print(f"\nboot time (TCG): UEFI (EDK2 PXE) {uefi.elapsed:.1f} s")
    context = f"\ndnsmasq:\n{dnsmasq.log[-6000:]}\nnetboot serve:\n{server.log[-4000:]}"
    assert_booted(uefi, closure, system)

    got = dnsmasq.leases()
    assert UEFI_MAC in got, f"no lease for {UEFI_MAC}: {got}{context}"
    uefi_ip = got[UEFI_MAC]
    assert ipaddress.IPv4Address("192.0.2.100") <= ipaddress.IPv4Address(uefi_ip) <= ipaddress.IPv4Address(
        "192.0.2.199"), got

    # EDK2's own PXE client asked first (its vendor class, no user class) and was given ipxe.efi on
    # 192.0.2.10; iPXE then asked again and got the HTTP URL.
    assert "Start PXE over IPv4" in uefi.console and "NBP filename is ipxe.efi" in uefi.console, uefi.console
    url = f"http://{NETBOOT_ADDRESS}:8080/boot.ipxe"
    uefi_packets = packets(dnsmasq.log, UEFI_MAC)
    edk2 = [p for p in uefi_packets if "vendor class: PXEClient:Arch:00007:UNDI:003000" in p]
    assert edk2 and all("user class" not in p for p in edk2), context
    assert all(f"next server: {NETBOOT_ADDRESS}" in p and "bootfile-name  ipxe.efi" in p for p in edk2), context
    assert any(f"DHCPACK(eth0) {uefi_ip} {UEFI_MAC}" in p for p in edk2), context
    ipxe = [p for p in uefi_packets if p not in edk2]
    assert any(f"DHCPACK(eth0) {uefi_ip} {UEFI_MAC}" in p for p in ipxe), context
    assert all("user class: iPXE" in p and f"bootfile-name  {url}" in p for p in ipxe), context

    # netboot serve: ipxe.efi over TFTP; then the script, kernel and initrd over HTTP.
    assert any(f" {uefi_ip} " in ln and "/ipxe.efi complete " in ln for ln in server.lines if " tftp " in ln), context
    http = [ln for ln in server.lines if f" {uefi_ip} " in ln and " http " in ln and " 200 " in ln]
    assert any(" http /boot.ipxe " in ln for ln in http), context
    for step in ("boot.ipxe", "bzImage", "initrd"):
        assert any(f"mac={UEFI_MAC} " in ln and f"/{step} " in ln and "/machine/" in ln for ln in http), (
            step, context)
