"""UEFI Secure Boot with real firmware on a namespace LAN: OVMF enforcing it with Microsoft's keys (and, where said,
the test's certificate in shim's MOK list), EDK2's own PXE client, netboot's proxy and authoritative DHCP.

Each VM checks as much as its one boot can; GRUB over HTTP (Secure Boot off) boots beside them on the same
server."""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import subprocess
from pathlib import Path

from lan_support import boot_vm, grub_site, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import assert_booted, need, signed_build, signing_keys
from test_dhcp_live import start

from devtools import qemu
from devtools.lan import Lan

DEBIAN, SIGNED, SIGNED_NO_MOK = "52:54:00:00:21:01", "52:54:00:00:21:02", "52:54:00:00:21:03"
UKI, TAMPERED, HTTP = "52:54:00:00:22:01", "52:54:00:00:22:02", "52:54:00:00:22:03"
REFUSED = "could not boot profile"  # what netboot's GRUB configuration says when GRUB refused to load
SECURE = "EFI stub: UEFI Secure Boot is enabled."


def both(*boots):
    """Boot two VMs at once (a VM under software emulation keeps one core busy)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(*b[:-1], **b[-1]) for b in boots]]


def vm(lan: Lan, mac: str, **kw) -> tuple:
    return (boot_vm, lan, mac, {"uefi": True, "pxe_rom": False, **kw})


def locked_down(result: qemu.BootResult) -> None:
    """The kernel, booted with Secure Boot on, locked itself down, and stage 1 still loaded its (signed) modules:
    the store is the squashfs image under an overlay."""
    assert SECURE in result.console, result.console[-3000:]
    assert "NETBOOT-TEST: lockdown: none [integrity] confidentiality" in result.lines, result.console[-3000:]
    assert any(ln.startswith("NETBOOT-TEST: store mount: overlay /nix/store overlay rw") for ln in result.lines)


def refused(result: qemu.BootResult) -> None:
    """shim refused the image GRUB asked it to verify, and nothing booted."""
    assert "error: bad shim signature." in result.console and REFUSED in result.console, result.console[-3000:]
    assert result.init_reached is None and "Linux version" not in result.console


def tftp_lines(log: str, mac: str) -> list[str]:
    return [ln for ln in log.splitlines() if f"mac={mac} " in ln and " tftp /machine/" in ln]


def test_grub_chain_through_proxy_dhcp(lan: Lan, outs: dict[str, Path], system: Path, closure: list[str],
                                        tmp_path: Path) -> None:
    """Debian's shim, GRUB and kernel with an overlay; the operator's kernel with and without its certificate in
    MokList. (A machine of an iPXE profile beside them keeps the iPXE path: tests/dhcp/test_dhcp_exchange.py's
    offers, and EDK2 through proxy DHCP to iPXE: tests/vm/test_dhcp_qemu.py.)"""
    cert = signing_keys() / "cert.pem"
    signed = signed_build(system)
    (tmp_path / "overlay/etc").mkdir(parents=True)
    (tmp_path / "overlay/etc/hostname.j2").write_text("{{ hostname }}\n")
    machines = tmp_path / "machines.toml"
    machines.write_text(f"""
[profiles.debian]
dir = "{outs['squashfs']}"
loader = "grub"
overlay = "overlay"
[profiles.signed]
dir = "{signed}"
loader = "grub"
[machines."{DEBIAN}"]
profile = "debian"
hostname = "secure-node"
[machines."{SIGNED}"]
profile = "signed"
[machines."{SIGNED_NO_MOK}"]
profile = "signed"
""")
    grub_site(lan, tmp_path / "dnsmasq.leases")
    server = start(lan.host("netboot", "192.0.2.10/24"), "--machines", machines, "--dhcp", "proxy")
    debian, signed_vm = both(vm(lan, DEBIAN, secure_boot=True), vm(lan, SIGNED, secure_boot=True, mok=[cert]))
    no_mok = boot_vm(lan, SIGNED_NO_MOK, uefi=True, pxe_rom=False, secure_boot=True, until=[REFUSED])
    server.stop()
    log = server.log

    # Debian-signed all the way: shim (Microsoft's key), GRUB and the kernel (Debian's, which shim carries).
    assert_booted(debian, closure, system)
    locked_down(debian)
    assert "NETBOOT-TEST: hostname: secure-node" in debian.lines  # its overlay, the second initrd
    for mac in (DEBIAN, SIGNED, SIGNED_NO_MOK):
        assert f"{mac} uefi-x64-pxe OFFER address=- boot=tftp://192.0.2.10/shimx64.efi" in log
    assert re.search(r" tftp /grubx64\.efi complete ", log) and " tftp /grub/grub.cfg complete " in log
    # Under Secure Boot, GRUB loads no module: kernel, initrd and overlay over TFTP.
    assert [ln.split()[5].rsplit("/", 1)[1] for ln in tftp_lines(log, DEBIAN)] == [
        "grub.cfg", "bzImage", "initrd", "overlay"], log
    assert "/grub/x86_64-efi/http.mod" not in log
    # The operator's kernel: trusted through MokList, refused by a machine with Microsoft's keys alone.
    assert_booted(signed_vm, closure, system)
    locked_down(signed_vm)
    refused(no_mok)
    print(f"\nVM start to init (TCG, two at a time): grub chain {debian.elapsed:.1f} s, operator-signed "
          f"{signed_vm.elapsed:.1f} s")


def test_unified_kernel_image_through_authoritative_dhcp(lan: Lan, outs: dict[str, Path], system: Path,
                                                         closure: list[str], tmp_path: Path) -> None:
    """The signed UKI boots; the same with one byte changed is refused; GRUB without Secure Boot fetches over
    HTTP."""
    need("objdump")
    cert = signing_keys() / "cert.pem"
    signed = signed_build(system)
    tampered = tmp_path / "tampered"
    shutil.copytree(signed, tampered)
    one_byte_changed(tampered / "netboot.efi")
    machines = tmp_path / "machines.toml"
    machines.write_text(f"""
[profiles.uki]
dir = "{signed}"
loader = "uki"
[profiles.tampered]
dir = "{tampered}"
loader = "uki"
[profiles.grub]
dir = "{outs['squashfs']}"
loader = "grub"
[machines."{UKI}"]
profile = "uki"
[machines."{TAMPERED}"]
profile = "tampered"
[machines."{HTTP}"]
profile = "grub"
""")
    server = start(lan.host("netboot", "192.0.2.10/24"), "--machines", machines, "--dhcp", "192.0.2.100-192.0.2.199",
                   "--state-dir", tmp_path / "state")
    uki, bad = both(vm(lan, UKI, secure_boot=True, mok=[cert]),
                    vm(lan, TAMPERED, secure_boot=True, mok=[cert], until=[REFUSED]))
    http = boot_vm(lan, HTTP, uefi=True, pxe_rom=False)
    server.stop()
    log = server.log

    assert_booted(uki, closure, system)
    locked_down(uki)
    for mac in (UKI, TAMPERED, HTTP):
        assert re.search(rf"{mac} uefi-x64-pxe ACK address=192\.0\.2\.1\d\d boot=tftp://192\.0\.2\.10/shimx64\.efi",
                         log), log
    assert [ln.split()[5].rsplit("/", 1)[1] for ln in tftp_lines(log, UKI)] == ["grub.cfg", "netboot.efi"], log
    # Kernel, initrd and command line are under the image's signature: the command line as built, nothing else.
    built = f"NETBOOT-TEST: cmdline: {(signed / 'cmdline').read_text().strip()}"
    assert built in [ln.rstrip() for ln in uki.lines], uki.console[-3000:]
    refused(bad)
    # Secure Boot off: shim and GRUB as they are, GRUB loads its http module and fetches kernel and initrd by HTTP.
    assert_booted(http, closure, system)
    assert "NETBOOT-TEST: lockdown: [none] integrity confidentiality" in http.lines
    assert "tftp /grub/x86_64-efi/http.mod complete" in log
    gen = f"/machine/{HTTP.replace(':', '-')}/"
    assert re.search(rf"mac={HTTP} profile=grub http {gen}\S+/bzImage 200 ", log), log
    assert re.search(rf"mac={HTTP} profile=grub http {gen}\S+/initrd 200 ", log), log
    print(f"\nVM start to init (TCG): uki chain {uki.elapsed:.1f} s (beside another VM), grub chain over HTTP "
          f"{http.elapsed:.1f} s (alone)")


def one_byte_changed(uki: Path) -> None:
    """Change one byte of the image's command line (panic=-1 becomes panic=-2): what an attacker on the wire
    would change."""
    out = subprocess.run(["objdump", "-h", str(uki)], capture_output=True, text=True, check=True).stdout
    offset = int(re.search(r"\.cmdline\s+\S+\s+\S+\s+\S+\s+(\S+)", out).group(1), 16)
    data = bytearray(uki.read_bytes())
    at = data.index(b"panic=-1", offset) + len("panic=-")
    data[at] = ord("2")
    uki.write_bytes(bytes(data))
