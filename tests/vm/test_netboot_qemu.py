"""Network boots through QEMU's own iPXE ROM against a real `netboot serve`: BIOS over HTTP and UEFI over TFTP
side by side, each with its own kernel parameters and its own /etc/hostname from an overlay rendered from one
template; and a machine nobody registered, on the default profile's direct build."""

from __future__ import annotations

import concurrent.futures
import json
import re
import urllib.request
from pathlib import Path

import pytest
from support import ServerProcess, assert_booted, hostname_seen, need, netboot_vm

from devtools import qemu

NODE1, NODE2, STRANGER = "52:54:00:00:01:01", "52:54:00:00:01:02", "52:54:00:00:09:09"


@pytest.fixture(scope="module")
def fleet(outs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two registered machines on the squashfs build, everyone else on the direct build by default; each profile
    with an overlay whose /etc/hostname is rendered from the profile's `site` and the machine's keys."""
    d = tmp_path_factory.mktemp("fleet")
    for overlay, template in (("overlay", "{{ site }}{{ hostname }}\n"), ("overlay-default", "{{ site }}{{ mac }}\n")):
        (d / overlay / "etc").mkdir(parents=True)
        (d / overlay / "etc/hostname.j2").write_text(template)
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "{outs["direct"]}"
# loglevel=7 shows the kernel's "Run … as init process": nothing else marks the start of init in direct format.
append = "loglevel=7 netboot.profile=default"
overlay = "overlay-default"
vars = {{ site = "bench-" }}

[profiles.squash]
dir = "{outs["squashfs"]}"
append = "netboot.profile=squash"
overlay = "overlay"
vars = {{ site = "rack1-" }}

[machines."{NODE1}"]
profile = "squash"
append = "hostname=node1"
hostname = "node1"

[machines."{NODE2.replace(":", "-").upper()}"]
profile = "squash"
append = "hostname=node2"
hostname = "node2"
""")
    server = ServerProcess("--machines", f, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    yield server
    server.stop()


def cmdline_of(result: qemu.BootResult) -> list[str]:
    return next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: cmdline:")).split()[2:]


def handed_over(server: ServerProcess, mac: str) -> None:
    """The overlay is the last file of a boot: the machine is handed over once it has it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.status_port}/api/machines", timeout=30) as r:
        machine = {m["mac"]: m for m in json.loads(r.read())["machines"]}[mac]
    assert machine["state"] == "handed-over", machine
    assert machine["last"]["path"].endswith("/overlay"), machine


def test_two_registered_machines_boot_with_their_own_parameters_and_overlays_bios_and_uefi(
        fleet: ServerProcess, system: Path, closure: list[str]) -> None:
    need(qemu.qemu_binary())
    assert qemu.OVMF_CODE.is_file(), "OVMF is not installed (make test installs Debian's ovmf)"
    runs = {NODE1: ("http", False), NODE2: ("tftp", True)}
    urls = {"http": f"http://10.0.2.2:{fleet.http_port}/boot.ipxe",
            "tftp": f"tftp://10.0.2.2:{fleet.tftp_port}/boot.ipxe"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        one, two = pool.map(lambda mac: netboot_vm(urls[runs[mac][0]], mac, uefi=runs[mac][1]), runs)
    # UEFI: iPXE starts the kernel through its EFI stub, which loads the initrd named by initrd=initrd.
    assert "EFI stub: Loaded initrd from command line option" in two.console
    for result, mac, name in ((one, NODE1, "node1"), (two, NODE2, "node2")):
        protocol = runs[mac][0]
        assert_booted(result, closure, system)
        args = cmdline_of(result)
        assert args[-2:] == ["netboot.profile=squash", f"hostname={name}"], args
        assert f"init={system}/init" in args
        assert any(ln.startswith("NETBOOT-TEST: store mount: overlay /nix/store overlay") for ln in result.lines)
        assert hostname_seen(result.lines) == f"rack1-{name}", result.console[-3000:]
        path = f"/machine/{mac.replace(':', '-')}"
        for name_served in ("boot.ipxe", r"\w+/bzImage", r"\w+/initrd", r"\w+/overlay"):
            assert re.search(rf"mac={mac} profile=squash {protocol} {path}/{name_served} (200|complete)", fleet.log), (
                fleet.log)
        handed_over(fleet, mac)


def test_unregistered_machine_boots_the_default_profile(fleet: ServerProcess, system: Path,
                                                        closure: list[str]) -> None:
    result = netboot_vm(f"http://10.0.2.2:{fleet.http_port}/boot.ipxe", STRANGER)
    assert_booted(result, closure, system)
    args = cmdline_of(result)
    assert args[-1] == "netboot.profile=default" and f"rdinit={system}/init" in args
    assert "NETBOOT-TEST: store mount: none" in result.console  # the direct build
    assert hostname_seen(result.lines) == f"bench-{STRANGER}", result.console[-3000:]  # the overlay over the root
    handed_over(fleet, STRANGER)
