#!/usr/bin/env python3
"""arm64 beside x86_64: the same small test system (tests/system, default.nix and its arm64.nix sibling: Debian's
kernel, the same few modules, busybox-static, the checking init) built for each, on this host, and booted
directly (-kernel/-initrd) in QEMU under software emulation (TCG): x86_64 on q35, arm64 on the virt board
(Cortex-A57). The time from QEMU's start to the system's init, and to the test system's marker (its init has
sha256-checked every file of its store). Boots interleaved run by run, so that both see the same machine.
Then the same builds network-booted from one `netboot serve --dhcp proxy` on a namespace LAN (needs root): UEFI
firmware with EDK2's own PXE client, OVMF -> iPXE -> kernel over HTTP for x86_64, AAVMF -> Debian's signed shim
-> network GRUB -> kernel over TFTP for arm64 (tests/system/arm64-loaders).

    python3 bench/arch_bench.py [--runs 3] [--update]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import build  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools import lanboot, qemu  # noqa: E402
from devtools.lan import Lan  # noqa: E402
from netboot.core.artifacts import KERNEL_FILES  # noqa: E402

SECTION = "## arm64 beside x86_64"
WORK = build.DATA / "arch"
ARCHES = ("x86_64", "arm64")
FORMATS = ("direct", "squashfs")
INIT = "NETBOOT-TEST: init reached"
MARKER = "NETBOOT-TEST-OK"
TIMEOUT = 300.0


def system_for(arch: str) -> Path:
    out = subprocess.run([build.ROOT / "tests/system/build", "--arch", arch, WORK / f"system-{arch}"],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def boot(out: Path) -> tuple[float, float]:
    """Seconds from QEMU's start to the init, and to the marker."""
    result = qemu.watch(qemu.direct_argv(out, accel="tcg"), timeout=TIMEOUT, expect=MARKER, marks=[INIT, MARKER])
    if not result.expected_seen:
        raise RuntimeError(f"{out} did not boot:\n{result.console[-2000:]}")
    return result.seen_at[INIT], result.seen_at[MARKER]


MACS = {(arch, fmt): f"52:54:00:00:a{i}:0{j}" for i, arch in enumerate(ARCHES) for j, fmt in enumerate(FORMATS)}


def network_boots(outs: dict[tuple[str, str], Path], runs: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Each build booted by its own MAC from one server, `runs` rounds, one VM at a time."""
    loaders = subprocess.run([build.ROOT / "tests/system/arm64-loaders", WORK / "arm64-loaders"], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    fleet = WORK / "machines.toml"
    text = ""
    for fmt in FORMATS:  # one profile per format, with its build for each architecture
        builds = ", ".join(f'{arch} = "{outs[arch, fmt]}"' for arch in ARCHES)
        text += f"[profiles.{fmt}]\ndir = {{ {builds} }}\n"
    for (_, fmt), mac in MACS.items():
        text += f'[machines."{mac}"]\nprofile = "{fmt}"\n'
    fleet.write_text(text)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in outs}
    with Lan() as lan:
        # GRUB takes its TFTP server from the site's acknowledgement (docs/secure-boot-arm64.md).
        lan.host("site", f"{lanboot.SITE_ADDRESS}/24").dnsmasq(
            f"--dhcp-option=option:server-ip-address,{lanboot.NETBOOT_ADDRESS}", leasefile=WORK / "dnsmasq.leases")
        server = lan.host("netboot", f"{lanboot.NETBOOT_ADDRESS}/24")
        lanboot.start_serve(server, WORK / "serve.log", "--machines", str(fleet), "--http", "0.0.0.0:8080",
                            "--tftp", "0.0.0.0:69", "--dhcp", "proxy", "--loaders", f"arm64={loaders}")
        for run in range(runs):
            for (arch, fmt), mac in MACS.items():
                result = lanboot.boot_vm(lan, mac, uefi=True, pxe_rom=False, timeout=2 * TIMEOUT, arch=arch,
                                         marks=[INIT, MARKER])
                if not result.expected_seen:
                    raise RuntimeError(f"{arch} {fmt} did not network-boot:\n{result.console[-2000:]}")
                times[arch, fmt].append((result.seen_at[INIT], result.seen_at[MARKER]))
                print(f"bench: network run {run + 1}: {arch} {fmt}: init {times[arch, fmt][-1][0]:.1f} s, "
                      f"marker {times[arch, fmt][-1][1]:.1f} s", file=sys.stderr)
    return times


def table(outs: dict[tuple[str, str], Path], times: dict[tuple[str, str], list[tuple[float, float]]]) -> list[str]:
    rows = ["| format | arch | kernel | initrd | to init | to the marker (range) | marker / x86_64 |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for fmt in FORMATS:
        marker = {arch: statistics.median(m for _, m in times[arch, fmt]) for arch in ARCHES}
        for arch in ARCHES:
            out = outs[arch, fmt]
            kernel = (out / KERNEL_FILES[arch]).stat().st_size
            markers = [m for _, m in times[arch, fmt]]
            rows.append(
                f"| {fmt} | {arch} | {kernel / 1e6:.1f} MB | {(out / 'initrd').stat().st_size / 1e6:.1f} MB | "
                f"{statistics.median(i for i, _ in times[arch, fmt]):.1f} s | {marker[arch]:.1f} s "
                f"({min(markers):.1f} to {max(markers):.1f}) | {marker[arch] / marker['x86_64']:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> str:
    args = arguments(__doc__, runs=3).parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    outs: dict[tuple[str, str], Path] = {}
    for arch in ARCHES:
        system = system_for(arch)
        for fmt in FORMATS:
            out = outs[arch, fmt] = WORK / f"{arch}-{fmt}"
            subprocess.run([sys.executable, "-m", "netboot", "build", system, "--out", out, "--format", fmt, "-q"],
                           check=True, cwd=build.ROOT)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in outs}
    for run in range(args.runs):
        for key, out in outs.items():
            times[key].append(boot(out))
            print(f"bench: run {run + 1}: {key[0]} {key[1]}: init {times[key][-1][0]:.1f} s, "
                  f"marker {times[key][-1][1]:.1f} s", file=sys.stderr)
    qemu_version = subprocess.run(["qemu-system-aarch64", "--version"], capture_output=True,
                                  text=True).stdout.split("\n")[0]
    rows = table(outs, times)
    network = network_boots(outs, args.runs)
    lines = [
        SECTION,
        "",
        f"Measured by `python3 bench/arch_bench.py --runs {args.runs}` (`make bench-arch`) (load average before: "
        f"{load:.2f}), {qemu_version}: the small test system built for each architecture on this x86_64 host "
        "(`tests/system/build --arch ARCH`: Debian's kernel of the same version, the same modules, busybox-static "
        "and the init that checks its store), packed by `netboot build`, booted directly (`-kernel`/`-initrd`) "
        "under software emulation (TCG), one vCPU, 1 GiB: x86_64 on `q35`, arm64 on `virt` with a Cortex-A57. "
        f"Medians of {args.runs} boots, interleaved; from QEMU's start to the system's init, and to the marker "
        "`NETBOOT-TEST-OK` (its init has sha256-checked every file of its store). What differs besides the CPU: "
        "QEMU's q35 runs SeaBIOS before the x86_64 kernel, and a bzImage decompresses itself (emulated), while "
        "the arm64 Image is loaded uncompressed and started directly.",
        "",
        *rows,
        "",
        "The same builds network-booted (one VM at a time, medians of the same runs): UEFI firmware with EDK2's "
        "own PXE client (the NIC's option ROM off) through `netboot serve --dhcp proxy` beside the site's dnsmasq "
        "on a namespace LAN, one profile per format with a build per architecture (`dir = { x86_64 = ..., arm64 = "
        "... }`). x86_64: OVMF, `ipxe.efi` over TFTP, then the kernel and initrd over HTTP. arm64: AAVMF, "
        "Debian's signed `shimaa64.efi` and network GRUB (`--loaders arm64=DIR`, `tests/system/arm64-loaders`), "
        "then the kernel and initrd over TFTP (GRUB without its `http` module: Debian's arm64 GRUB modules are "
        "not installed on this x86_64 host). From QEMU's start, so the firmware's and the loaders' time counts.",
        "",
        *table(outs, network),
        "",
        "Commands (ARCH x86_64 or arm64, FORMAT direct or squashfs):",
        "",
        "```",
        "tests/system/build --arch ARCH bench/data/arch/system-ARCH",
        "netboot build bench/data/arch/system-ARCH --out bench/data/arch/ARCH-FORMAT --format FORMAT -q",
        "qemu/boot-dir bench/data/arch/ARCH-FORMAT --expect NETBOOT-TEST-OK",
        "# that is, for arm64 direct (the kernel's own init line needs loglevel=7)",
        "qemu-system-aarch64 -machine virt,accel=tcg -cpu cortex-a57 -m 1024 -smp 1 -nodefaults -display none "
        "-serial stdio -monitor none -no-reboot -kernel bench/data/arch/arm64-direct/Image "
        "-initrd bench/data/arch/arm64-direct/initrd -append 'rdinit=SYSTEM/init console=ttyAMA0 panic=-1 "
        "loglevel=4 loglevel=7'",
        "# network boots: one server for both architectures (bench/data/arch/machines.toml)",
        "netboot serve --machines bench/data/arch/machines.toml --dhcp proxy "
        "--loaders arm64=bench/data/arch/arm64-loaders/loaders",
        "```",
        "",
    ]
    return publish(SECTION, "\n".join(lines), args.update)


if __name__ == "__main__":
    main()
