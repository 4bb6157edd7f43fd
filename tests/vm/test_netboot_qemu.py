"""Network boots through QEMU's own iPXE ROM against a real `netboot serve`: BIOS and UEFI side by side (a boot
over TFTP alone is tests/vm/test_status_boot.py's)."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from support import ServerProcess, assert_booted, need, netboot_vm

from devtools import qemu

NODE1, NODE2, STRANGER = "52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:09:09"


@pytest.fixture(scope="module")
def fleet(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two registered machines on the squashfs build, everyone else on the direct build by default."""
    d = tmp_path_factory.mktemp("fleet")
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "{outs["direct"]}"
# loglevel=7 shows the kernel's "Run … as init process": nothing else marks the start of init in direct format.
append = "loglevel=7 netboot.profile=default"

[profiles.squash]
dir = "{outs["squashfs"]}"
append = "netboot.profile=squash"

[machines."{NODE1}"]
profile = "squash"
append = "hostname=node1"

[machines."{NODE2.replace(":", "-").upper()}"]
profile = "squash"
append = "hostname=node2"
""")
    server = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    yield server
    server.stop()


def cmdline_of(result: qemu.BootResult) -> list[str]:
    return next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: cmdline:")).split()[2:]


def test_two_registered_machines_boot_with_their_own_parameters_bios_and_uefi(fleet: ServerProcess, system: Path,
                                                                               closure: list[str]) -> None:
    need(qemu.qemu_binary())
    assert qemu.OVMF_CODE.is_file(), "OVMF is not installed (make test installs Debian's ovmf)"
    url = f"http://10.0.2.2:{fleet.http_port}/boot.ipxe"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        one, two = pool.map(lambda run: netboot_vm(url, run[0], uefi=run[1]), [(NODE1, False), (NODE2, True)])
    # UEFI: iPXE starts the kernel through its EFI stub, which loads the initrd named by initrd=initrd.
    assert "EFI stub: Loaded initrd from command line option" in two.console
    for result, name in ((one, "node1"), (two, "node2")):
        assert_booted(result, closure, system)
        args = cmdline_of(result)
        assert args[-2:] == ["netboot.profile=squash", f"hostname={name}"], args
        assert f"init={system}/init" in args
        assert any(ln.startswith("NETBOOT-TEST: store mount: overlay /nix/store overlay") for ln in result.lines)
    for mac in (NODE1, NODE2):
        assert f"mac={mac} profile=squash http /machine/{mac.replace(':', '-')}/boot.ipxe 200" in fleet.log
        assert f"mac={mac} profile=squash http /machine/{mac.replace(':', '-')}/" in fleet.log


def test_unregistered_machine_boots_the_default_profile(fleet: ServerProcess, system: Path,
                                                        closure: list[str]) -> None:
    result = netboot_vm(f"http://10.0.2.2:{fleet.http_port}/boot.ipxe", STRANGER)
    assert_booted(result, closure, system)
    args = cmdline_of(result)
    assert args[-1] == "netboot.profile=default" and f"rdinit={system}/init" in args
    assert "NETBOOT-TEST: store mount: none" in result.console  # the direct build
