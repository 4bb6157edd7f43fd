"""A LAN in network namespaces for tests: real PXE firmware in QEMU against real DHCP servers and `netboot serve`.

    from lan_support import boot_vm, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)

    def test_x(lan: Lan, outs, tmp_path):
        server = serve_in(lan.host("netboot", "192.0.2.10/24"), "--dir", outs["squashfs"])
        ...
        result = boot_vm(lan, "52:54:00:00:02:01", uefi=True, pxe_rom=False)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ServerProcess, need, vm_accel

from devtools import lanboot, qemu
from devtools.lan import Host, Lan
from devtools.lanboot import DNSMASQ_PXE, NETBOOT_ADDRESS  # noqa: F401  (for the tests)


@pytest.fixture(name="lan")
def lan_fixture() -> Iterator[Lan]:
    """`lan`: a fresh LAN; whatever ran in it is killed and its namespaces deleted afterwards, pass or fail.

    Import `lan_fixture` into a test module to use it (its own name keeps the import from clashing with the
    tests' `lan` parameters).
    """
    need("ip")
    with Lan() as the_lan:
        yield the_lan


lan = lan_fixture  # also importable as `lan`


class LanServer(ServerProcess):
    """`netboot serve` in a host's namespace; `url()` names the host's address."""

    def __init__(self, host: Host, *args: str | os.PathLike[str]) -> None:
        self.host = host
        super().__init__(*args, prefix=host.argv([]))

    def url(self, path: str) -> str:
        host = f"[{self.host.address}]" if ":" in self.host.address else self.host.address
        return f"http://{host}:{self.http_port}/{path.lstrip('/')}"


def serve_in(host: Host, *args: str | os.PathLike[str]) -> LanServer:
    """Start `netboot serve ARGS` in `host`'s namespace (HTTP on 8080, TFTP on 69 unless ARGS say otherwise, on
    every address of the host's family).

    Stop it with `.stop()`; the LAN also kills it when it closes.
    """
    strs = list(map(str, args))
    every = "[::]" if ":" in host.address else "0.0.0.0"
    if not any(a == "--http" or a.startswith("--http=") for a in strs):
        strs += ["--http", f"{every}:8080"]
    if not any(a in ("--tftp", "--no-tftp") or a.startswith("--tftp=") for a in strs):
        strs += ["--tftp", f"{every}:69"]
    return LanServer(host, *strs)


def grub_site(lan: Lan, leasefile: Path) -> None:
    """The site's DHCP server (plain leases) naming netboot's address (192.0.2.10) as the next server: GRUB 2.06
    takes its TFTP server from the acknowledgement of its address, not from the proxy's offer the firmware followed
    (docs/secure-boot-arm64.md, "Boot with Secure Boot on")."""
    lan.host("site", "192.0.2.2/24").dnsmasq("--dhcp-option=option:server-ip-address,192.0.2.10", leasefile=leasefile)


def boot_vm(lan: Lan, mac: str, *, uefi: bool, pxe_rom: bool = True, timeout: float = 300,
            arch: str = qemu.DEFAULT_ARCH, **secure) -> qemu.BootResult:
    """Network-boot a VM of `arch` on a new tap of `lan` until it powers off; fail if it did not within
    `timeout`. `secure`: lanboot.boot_vm's secure_boot, mok and until."""
    need(qemu.qemu_binary(arch))
    vm_accel()
    if uefi:
        code = qemu.UEFI[arch][0]
        assert code.is_file(), f"{code} is not installed (make deps installs Debian's ovmf and qemu-efi-aarch64)"
    result = lanboot.boot_vm(lan, mac, uefi=uefi, pxe_rom=pxe_rom, timeout=timeout, arch=arch, **secure)
    firmware = f"{arch} UEFI" if uefi else "BIOS"
    assert not result.timed_out, f"the {firmware} VM {mac} did not finish in {timeout} s:\n{result.console[-3000:]}"
    return result
