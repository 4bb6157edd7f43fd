"""Boot a VM with real firmware on a LAN in network namespaces, against `netboot serve` and a DHCP server.

    python -m devtools.lanboot OUT [--dhcp proxy|dnsmasq|dhcp6] [--firmware uefi-pxe|bios] [--timeout S] [-q]

The LAN (devtools.lan) has the site's DHCP server, Debian's dnsmasq, on 192.0.2.2; `netboot serve --dir OUT` on
192.0.2.10; and the VM on a tap. With `--dhcp proxy` (the default) dnsmasq hands out addresses only and netboot's
own proxy DHCP the boot files; with `--dhcp dnsmasq` dnsmasq does both, configured as docs/dhcp.md's "With your
own DHCP server instead" says. `--dhcp dhcp6`: a LAN without IPv4, radvd on 2001:db8::1 advertising the M flag
and `netboot serve --dhcp6` on 2001:db8::10 (docs/ipv6.md); UEFI only. `uefi-pxe` is OVMF with the NIC's option
ROM disabled, so EDK2's own PXE client takes the first step as on real UEFI machines; `bios` is SeaBIOS with
QEMU's iPXE ROM. Used by `make demo-proxy` and the DHCP benchmark; needs root.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from devtools import qemu
from devtools.lan import Host, Lan, LanError

NETBOOT_ADDRESS = "192.0.2.10"
SITE_ADDRESS = "192.0.2.2"
NETBOOT_ADDRESS6, ROUTER_ADDRESS6 = "2001:db8::10", "2001:db8::1"  # the IPv6-only LAN's (--dhcp dhcp6)
RANGE6 = "2001:db8::1000-2001:db8::1fff"
MARKER = "NETBOOT-TEST-OK"  # what the test and demo systems print once they have checked their store

# docs/dhcp.md's dnsmasq configuration, with netboot serving on NETBOOT_ADDRESS.
DNSMASQ_PXE = (
    "--dhcp-userclass=set:ipxe,iPXE",
    "--dhcp-match=set:efi64,option:client-arch,7",
    "--dhcp-match=set:efi64,option:client-arch,9",
    f"--dhcp-boot=tag:ipxe,http://{NETBOOT_ADDRESS}:8080/boot.ipxe",
    f"--dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi,,{NETBOOT_ADDRESS}",
    f"--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe,,{NETBOOT_ADDRESS}",
)


@dataclass
class LanBoot:
    result: qemu.BootResult
    serve_log: str
    dhcp_log: str


def start_serve(host: Host, log: Path, *args: str, timeout: float = 30,
                command: Sequence[str] = (sys.executable, "-m", "netboot")) -> None:
    """`netboot serve ARGS` in `host`'s namespace, its log in `log`; returns once it serves (and answers DHCP).
    `command`: another command line whose `serve` serves as netboot's does (and logs the same)."""
    out = log.open("w")
    proc = host.popen([*command, "serve", *args], stdin=subprocess.DEVNULL,
                      stdout=subprocess.DEVNULL, stderr=out, cwd=Path(__file__).resolve().parent.parent)
    out.close()
    ready = re.compile(r"dhcp: (proxy DHCP|DHCP server for \S+) on" if "--dhcp" in args
                       else r"dhcp6: .* on " if "--dhcp6" in args else r"http: serving")
    deadline = time.monotonic() + timeout
    while not ready.search(log.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LanError(f"netboot serve did not start in {host.netns}:\n{log.read_text()}")
        time.sleep(0.05)


def boot_vm(lan: Lan, mac: str, *, uefi: bool, pxe_rom: bool, timeout: float = 300,
            echo: TextIO | None = None, secure_boot: bool = False, mok: Sequence[Path] = (),
            until: Sequence[str] = (), arch: str = qemu.DEFAULT_ARCH, marks: Sequence[str] = (),
            ipv6_only: bool = False) -> qemu.BootResult:
    """A VM of `arch` on a new tap of `lan`, network-booted until it powers off, the console shows a text of
    `until`, or `timeout` passes. UEFI VMs get a fresh copy of their firmware's variable store (OVMF's, AAVMF's);
    with `secure_boot`, the firmware that enforces it, Microsoft's keys, and the certificates of `mok` in shim's
    MOK list. `marks`: qemu.watch's, the times the console first showed them. `ipv6_only`: qemu.lan_argv's."""
    tap = lan.tap()
    with tempfile.TemporaryDirectory(prefix="netboot-lanvm-") as tmp:
        vars_copy = None
        if uefi:
            vars_copy = Path(tmp) / "VARS.fd"
            if secure_boot:
                qemu.secure_vars(vars_copy, mok)
            else:
                shutil.copyfile(qemu.UEFI[arch][1], vars_copy)
        argv = qemu.lan_argv(tap, mac, uefi=uefi, pxe_rom=pxe_rom, vars_copy=vars_copy, secure_boot=secure_boot,
                             arch=arch, ipv6_only=ipv6_only)
        return qemu.watch(lan.vm(argv), timeout=timeout, expect=MARKER, echo=echo, until=until, marks=marks)


def boot(out: Path, *, dhcp: str = "proxy", firmware: str = "uefi-pxe", mac: str = "52:54:00:de:e0:02",
         timeout: float = 300, echo: TextIO | None = None) -> LanBoot:
    uefi = firmware == "uefi-pxe"
    with Lan() as lan, tempfile.TemporaryDirectory(prefix="netboot-lanboot-") as tmp_name:
        tmp = Path(tmp_name)
        if dhcp == "dhcp6":
            if not uefi:
                raise LanError("a BIOS machine cannot boot on a network without IPv4 (iPXE's BIOS builds have no "
                               "IPv6): use --firmware uefi-pxe")
            radvd = lan.host("router", f"{ROUTER_ADDRESS6}/64").radvd(managed=True)
            server = lan.host("netboot", f"{NETBOOT_ADDRESS6}/64")
            start_serve(server, tmp / "serve.log", "--dir", str(out), "--http", f"[{NETBOOT_ADDRESS6}]:8080",
                        "--tftp", f"[{NETBOOT_ADDRESS6}]:69", "--dhcp6", RANGE6, "--state-dir", str(tmp / "state"))
            result = boot_vm(lan, mac, uefi=True, pxe_rom=False, timeout=timeout, echo=echo, ipv6_only=True)
            return LanBoot(result, (tmp / "serve.log").read_text(), radvd.log)
        site = lan.host("site", f"{SITE_ADDRESS}/24")
        server = lan.host("netboot", f"{NETBOOT_ADDRESS}/24")
        extra = () if dhcp == "proxy" else DNSMASQ_PXE
        dnsmasq = site.dnsmasq(*extra, leasefile=tmp / "dnsmasq.leases")
        serve_args = ["--dir", str(out), "--http", "0.0.0.0:8080", "--tftp", "0.0.0.0:69"]
        if dhcp == "proxy":
            serve_args += ["--dhcp", "proxy"]
        start_serve(server, tmp / "serve.log", *serve_args)
        result = boot_vm(lan, mac, uefi=uefi, pxe_rom=not uefi, timeout=timeout, echo=echo)
        return LanBoot(result, (tmp / "serve.log").read_text(), dnsmasq.log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.lanboot", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, metavar="OUT", help="an output directory of `netboot build`")
    p.add_argument("--dhcp", choices=("proxy", "dnsmasq", "dhcp6"), default="proxy",
                   help="who hands out boot files: netboot's proxy DHCP (default) or dnsmasq; dhcp6: netboot's "
                   "DHCPv6 on a LAN without IPv4, radvd its router")
    p.add_argument("--firmware", choices=("uefi-pxe", "bios"), default="uefi-pxe",
                   help="OVMF with EDK2's own PXE client (default), or SeaBIOS with QEMU's iPXE ROM")
    p.add_argument("--timeout", type=float, default=300, help="seconds before the VM is stopped (default 300)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the console")
    args = p.parse_args(argv)
    if not (args.out / "manifest.json").is_file():
        print(f"lanboot: error: {args.out} is not an output directory of netboot build", file=sys.stderr)
        return 2
    try:
        run = boot(args.out.absolute(), dhcp=args.dhcp, firmware=args.firmware, timeout=args.timeout,
                   echo=None if args.quiet else sys.stdout)
    except (LanError, OSError) as e:
        print(f"lanboot: error: {e}", file=sys.stderr)
        return 2
    print("\n--- netboot serve's log\n" + run.serve_log, file=sys.stderr)
    ok = run.result.expected_seen and not run.result.panicked
    print(f"lanboot: {'OK' if ok else 'FAILED'}: {args.firmware} VM, boot files from "
          f"{ {'proxy': 'netboot --dhcp proxy', 'dhcp6': 'netboot --dhcp6'}.get(args.dhcp, 'dnsmasq')}: "
          f"{'booted and checked its store' if ok else 'did not boot'} ({run.result.elapsed:.1f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
