"""arm64 and x86_64 UEFI machines on one server: an AAVMF VM (EDK2's PXE client, option 93 = 11) boots the arm64
system in squashfs through Debian's signed shimaa64.efi and network GRUB, through netboot's proxy DHCP beside the
site's dnsmasq; an x86_64 machine of the same profile (a build per architecture) is offered iPXE and its profile's
x86_64 build (its requests played on the LAN: OVMF through iPXE boots in tests/vm/test_dhcp_qemu.py). The arm64
direct format boots in tests/vm/test_boot_arm64.py; GRUB's configuration carries any build's command line as it was
built (tests/server/test_grub.py)."""

from __future__ import annotations

import re
from pathlib import Path

from dhcp_support import DISCOVER, request
from lan_support import boot_vm, grub_site, lan_fixture  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import assert_booted, built
from test_dhcp_live import probe, start, wait_for

from devtools.lan import Host, Lan

ARM, X86, ARM_ON_X86 = "52:54:00:00:0f:02", "52:54:00:00:0f:03", "52:54:00:00:0f:04"


def fetch(client: Host, path: str) -> bytes:
    """A GET of netboot's HTTP from a host on the LAN."""
    got = client.run(["curl", "-fsS", f"http://192.0.2.10:8080{path}"], capture_output=True, timeout=60)
    assert got.returncode == 0, got.stderr
    return got.stdout


def test_arm64_and_x86_64_uefi_machines_boot_from_one_server(lan: Lan, outs: dict[str, Path], arm64_system: Path,
                                                             arm64_loaders: Path, tmp_path: Path) -> None:
    arm_squash = built(arm64_system, "--format", "squashfs")
    fleet = tmp_path / "machines.toml"
    # One profile with a build per architecture, and an x86_64 one that an arm64 machine is listed on.
    fleet.write_text(f"""
[profiles.rack]
dir = {{ x86_64 = "{outs['squashfs']}", arm64 = "{arm_squash}" }}
[profiles.x86]
dir = "{outs['squashfs']}"
[machines."{ARM}"]
profile = "rack"
[machines."{X86}"]
profile = "rack"
[machines."{ARM_ON_X86}"]
profile = "x86"
""")
    grub_site(lan, tmp_path / "dnsmasq.leases")
    server = start(lan.host("netboot", "192.0.2.10/24"), "--machines", fleet, "--dhcp", "proxy",
                   "--loaders", f"arm64={arm64_loaders}")
    result = boot_vm(lan, ARM, uefi=True, pxe_rom=False, timeout=900, arch="arm64")
    assert_booted(result, (arm64_system / "closure-paths").read_text().split(), arm64_system)
    assert "NETBOOT-TEST: machine: aarch64" in result.console
    assert "netboot stage 1: starting" in result.console
    # EDK2's arm64 PXE client took shim from netboot's proxy offer; shim fetched grubaa64.efi beside it, and GRUB
    # asked for this machine's arm64 configuration, then its build's Image.
    assert f"{ARM} uefi-arm64-pxe OFFER address=- boot=tftp://192.0.2.10/shimaa64.efi" in server.log
    for name in ("grubaa64.efi", f"machine/{ARM}/arm64/grub.cfg"):
        assert re.search(rf" tftp /{re.escape(name)} complete ", server.log), (name, server.log)
    assert re.search(rf"mac={ARM} profile=rack tftp /machine/{ARM.replace(':', '-')}/[0-9a-f]+/Image complete ",
                     server.log), server.log
    print(f"\nboot time (TCG): arm64 squashfs {result.elapsed:.1f} s")

    # The x86_64 machine of the same profile: EDK2 on OVMF is offered ipxe.efi, and iPXE's script (the facts
    # x86_64 UEFI iPXE sends) boots the profile's x86_64 build.
    client = lan.host("client", "192.0.2.50/24")
    x86_pxe = request(DISCOVER, X86, options=[(93, (7).to_bytes(2, "big")), (60, b"PXEClient:Arch:00007:UNDI:003000")])
    probe(client, x86_pxe)
    wait_for(server, f"{X86} uefi-x64-pxe OFFER address=- boot=tftp://192.0.2.10/ipxe.efi")
    hyphens = X86.replace(":", "-")
    facts = "uuid=/serial=/manufacturer=/product=/buildarch=x86_64/platform=efi"
    script = fetch(client, f"/machine/{hyphens}/{facts}/boot.ipxe").decode()
    kernel = re.search(rf"^kernel (/machine/{hyphens}/[0-9a-f]+/bzImage) ", script, re.M)
    assert kernel, script
    assert fetch(client, kernel.group(1)) == (outs["squashfs"] / "bzImage").read_bytes()

    # An arm64 machine whose profile has x86_64's build only: not answered, one line saying why.
    arm_pxe = request(DISCOVER, ARM_ON_X86, options=[(93, (11).to_bytes(2, "big")),
                                                     (60, b"PXEClient:Arch:00011:UNDI:003000")])
    replies = probe(client, arm_pxe, arm_pxe)
    assert [source for source, _ in replies if source.startswith("192.0.2.10:")] == []  # dnsmasq's only
    refusal = (f"dhcp: {ARM_ON_X86}: not answered: uefi-arm64-pxe: refused: profile x86 is for x86_64, and this "
               "machine is arm64")
    wait_for(server, refusal)
    assert server.log.count(refusal) == 1
    server.stop()
