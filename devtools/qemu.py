"""Boot netboot artifacts in QEMU and watch the serial console.

`python -m devtools.qemu OUT` boots an out DIR with -kernel/-initrd/-append (qemu/boot-dir), in the QEMU of
its build's architecture (x86_64: q35; arm64: virt, no firmware needed);
`python -m devtools.qemu net --url URL --mac MAC [--uefi]` network-boots through QEMU's iPXE (qemu/netboot).
Software emulation (TCG) is the default: it works everywhere, while KVM is opt-in (--accel kvm, or
NETBOOT_QEMU_ACCEL=kvm) because a /dev/kvm that opens is not always one that runs guests; `kvm_works` tells
by booting a kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from netboot.core.artifacts import DEFAULT_ARCH, KERNEL_FILES, arch_of

# The kernel's "Run /init as init process", and stage 1's last word before it execs the system's init;
# the kernel's "Failed to execute" takes it back.
_REACHED = re.compile(rb"netboot stage 1: starting (\S+)|Run (\S+) as init process|Failed to execute (\S+)")
_PANIC = re.compile(rb"Kernel panic|netboot stage 1: .*cannot")


@dataclass
class BootResult:
    console: str = ""
    init_reached: str | None = None  # the init= / rdinit= program the console shows being started
    expected_seen: bool = False
    exit_status: int | None = None
    timed_out: bool = False
    panicked: bool = False
    elapsed: float = 0.0
    lines: list[str] = field(default_factory=list)
    # For each text of watch()'s `marks` the console showed: seconds from QEMU's start to its first appearance.
    seen_at: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Board:
    """The QEMU machine a build of one architecture boots in."""

    binary: str
    machine: str
    cpu: tuple[str, ...]  # -cpu, under software emulation
    console: str  # the serial console's kernel name (console=)
    host_machine: str  # platform.machine() of a host that runs it under KVM


BOARDS = {
    "x86_64": Board("qemu-system-x86_64", "q35", (), "ttyS0,115200", "x86_64"),
    # QEMU's generic arm64 board with its PL011 UART; a Cortex-A57 rather than `max`, whose pointer
    # authentication is slow to emulate (QEMU docs, "Arm CPU features": pauth-impdef).
    "arm64": Board("qemu-system-aarch64", "virt", ("-cpu", "cortex-a57"), "ttyAMA0", "aarch64"),
}


def qemu_binary(arch: str = DEFAULT_ARCH) -> str:
    """NETBOOT_QEMU replaces the x86_64 QEMU (e.g. a wrapper); the others are QEMU's own."""
    return os.environ.get("NETBOOT_QEMU", BOARDS[arch].binary) if arch == "x86_64" else BOARDS[arch].binary


def default_accel() -> str:
    return os.environ.get("NETBOOT_QEMU_ACCEL") or "tcg"


def build_arch(out: Path) -> str:
    """The architecture of an output directory's build (its manifest's "arch")."""
    try:
        return arch_of(json.loads((out / "manifest.json").read_text()))
    except (OSError, ValueError):
        return DEFAULT_ARCH


def kvm_works(kernel: Path, timeout: float = 10) -> tuple[bool, str]:
    """Whether KVM runs guests here, and why not: `kernel` booted without a root file system must get as far as
    its panic for want of one (a few seconds under KVM) before `timeout`. A /dev/kvm that opens, and even runs
    a few instructions, may still hang a kernel for good, so nothing less than a kernel's boot tells."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    argv = [*base_argv("256", "kvm"), "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=4"]
    result = watch(argv, timeout=timeout, expect="Kernel panic")
    if result.expected_seen:
        return True, f"a kernel booted in {result.elapsed:.1f} s"
    last = result.lines[-1] if result.lines else "nothing on the console"
    return False, f"a kernel did not boot in {timeout:g} s ({last})"


def base_argv(memory: str, accel: str | None = None, arch: str = DEFAULT_ARCH, smm: bool = False) -> list[str]:
    board = BOARDS[arch]
    accel = accel or default_accel()
    cpu = board.cpu
    if accel == "kvm":
        if platform.machine() != board.host_machine:
            accel = "tcg"  # KVM runs guests of the host's own architecture only
        elif cpu:
            cpu = ("-cpu", "host")
    return [
        qemu_binary(arch), "-machine", f"{board.machine},accel={accel}{',smm=on' * smm}", *cpu, "-m", memory,
        "-smp", "1",
        "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
    ]


def direct_argv(out: Path, *, append: str = "", memory: str = "1024", accel: str | None = None,
                kernel: Path | None = None) -> list[str]:
    """A direct boot of an output directory (-kernel/-initrd/-append), in the QEMU of its architecture; `kernel`
    in place of its own if given."""
    arch = build_arch(out)
    cmdline = (out / "cmdline").read_text().strip()
    if "console=" not in cmdline:
        cmdline += f" console={BOARDS[arch].console}"
    if cmdline.startswith("rdinit="):
        # Nothing runs before the system's init in the direct format; the kernel's own
        # "Run … as init process" (KERN_INFO) is what shows that it was started.
        cmdline += " loglevel=7"
    if append:
        cmdline += " " + append
    return [
        *base_argv(memory, accel, arch),
        "-kernel", str(kernel or out / KERNEL_FILES[arch]), "-initrd", str(out / "initrd"), "-append", cmdline,
    ]


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # Debian's ovmf package
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")  # EDK2 for QEMU's arm64 virt board (Debian's qemu-efi-aarch64)
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
UEFI = {"x86_64": (OVMF_CODE, OVMF_VARS), "arm64": (AAVMF_CODE, AAVMF_VARS)}  # arch -> (code, variables template)
# Secure Boot: firmware that enforces it (SMM keeps the variables out of the guest's reach), and variables with
# Microsoft's KEK and db enrolled, as on machines sold with Secure Boot on.
OVMF_CODE_SECURE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_MICROSOFT = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
SHIM_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"  # shim's variables' vendor GUID, the owner of MOK entries


def secure_vars(dest: Path, mok: Sequence[Path] = ()) -> Path:
    """A copy of the variables with Microsoft's keys at `dest`, with each certificate of `mok` in shim's MOK list
    (virt-fw-vars, from PyPI's virt-firmware: no MokManager dialogue at a console)."""
    shutil.copyfile(OVMF_VARS_MICROSOFT, dest)
    for cert in mok:
        subprocess.run([sys.executable, "-m", "virt.firmware.vars", "--inplace", str(dest), "--add-mok", SHIM_GUID,
                        str(cert)], check=True, capture_output=True)
    return dest


def net_argv(
    url: str, mac: str, *, uefi: bool = False, vars_copy: Path | None = None, memory: str = "1024",
    accel: str | None = None,
) -> list[str]:
    """Network boot through QEMU's own iPXE ROM on user networking; 10.0.2.2 is the host's loopback.

    BIOS boots the NIC's iPXE option ROM (-boot n); UEFI boots OVMF, which finds iPXE's EFI driver in the
    same ROM. `vars_copy` is a writable copy of OVMF's variable store, needed for UEFI.
    """
    argv = [
        *base_argv(memory, accel),
        "-netdev", f"user,id=net0,bootfile={url}",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
    ]
    if uefi:
        if vars_copy is None:
            raise ValueError("UEFI needs a writable copy of the OVMF variables")
        argv += [
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
        ]
    else:
        argv += ["-boot", "n"]
    return argv


def lan_argv(
    tap: str, mac: str, *, uefi: bool, pxe_rom: bool = True, vars_copy: Path | None = None,
    memory: str = "1024", accel: str | None = None, secure_boot: bool = False, arch: str = DEFAULT_ARCH,
    ipv6_only: bool = False,
) -> list[str]:
    """A VM whose NIC is on a tap device (see devtools.lan), network-booting first, against real DHCP servers.

    BIOS: SeaBIOS boots the NIC's iPXE option ROM (-boot n). UEFI: OVMF, with the NIC first in the boot order
    (bootindex); with `pxe_rom` OVMF runs iPXE's EFI driver from the same ROM, without it (`romfile=`) EDK2's
    own PXE client does the first step, as on real UEFI machines. `vars_copy` is a writable copy of OVMF's
    variable store, needed for UEFI. `secure_boot`: the firmware that enforces it (give it `secure_vars`). arm64:
    AAVMF (UEFI only, without Secure Boot) on the virt board; EDK2's own PXE client asks with option 93 = 11.
    `ipv6_only`: EDK2 goes straight to PXE over IPv6, skipping PXE over IPv4 and its DHCPv4 timeout. Run it in
    the tap's namespace (`Lan.vm`).
    """
    nic = f"virtio-net-pci,netdev=n0,mac={mac}"
    if not pxe_rom:
        if not uefi:
            raise ValueError("a BIOS VM boots from the network only through the NIC's option ROM")
        nic += ",romfile="
    if arch != "x86_64" and not uefi:
        raise ValueError(f"an {arch} VM boots UEFI firmware")
    argv = [
        *base_argv(memory, accel, arch, smm=secure_boot),
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
    ]
    if uefi:
        if vars_copy is None:
            raise ValueError("UEFI needs a writable copy of the OVMF variables")
        if secure_boot:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        if ipv6_only:
            # EDK2's network stack reads this switch from fw_cfg (OVMF's and, seen here, AAVMF's): with it off,
            # EDK2 makes no "PXEv4" boot option, whose DHCPv4 would go unanswered for about a minute.
            argv += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]
        argv += [
            "-device", f"{nic},bootindex=1",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE_SECURE if secure_boot else UEFI[arch][0]}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
        ]
    else:
        argv += ["-device", nic, "-boot", "n"]
    return argv


# ECMA-48's escape sequences: CSI (ESC [ parameters intermediates final), OSC and the other strings (ESC ] P X ^ _
# … ended by BEL or ESC \), and ESC with one or more intermediates and a final byte (ESC c: reset, ESC ( B: a
# character set). EDK2 clears the screen and places its text with them (MdeModulePkg's TerminalDxe).
_CSI = r"\x1b\[[0-?]*[ -/]*[@-~]"
_STRING = r"\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)"
_ESCAPES = re.compile(rf"{_CSI}|{_STRING}|\x1b[ -/]*[0-~]")
_UNFINISHED = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|[\]PX^_][^\x07\x1b]*\x1b?|[ -/]*)?\Z")
_LONGEST_HELD = 256
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")  # all but tab, newline, return and ESC


def terminal_text(text: str) -> tuple[str, str]:
    """A console's output as it can be shown on the terminal the demo runs in, without clearing it, moving its
    cursor or changing its modes: escape sequences and control characters taken out, a cursor placement (CSI …
    H or f, which starts a new line of the firmware's screen) made a newline. Returns that and the unfinished
    escape sequence `text` ends in, to be put before the next chunk."""
    unfinished = _UNFINISHED.search(text)
    held = text[unfinished.start():] if unfinished else ""
    if held:
        text = text[: -len(held)]
        if len(held) > _LONGEST_HELD:  # a string never ended: garbage, not held forever
            held = ""
    text = _ESCAPES.sub(lambda m: "\n" if m.group(0)[1] == "[" and m.group(0)[-1] in "Hf" else "", text)
    return _CONTROLS.sub("", text.replace("\x1b", "")), held


def watch(argv: Sequence[str], *, timeout: float, expect: str | None = None, echo: TextIO | None = None,
          marks: Sequence[str] = (), answers: Sequence[tuple[str, str]] = (), until: Sequence[str] = ()
          ) -> BootResult:
    """Run QEMU until it exits (the guest powered off or panicked) or `timeout` passes; stop it by its PID.

    `argv` may start with `ip netns exec NS` (devtools.lan): ip execs QEMU in the namespace, so the PID is QEMU's.
    For each text in `marks`, the time from QEMU's start to when the console first showed it goes into
    `seen_at` (read as it arrives, so to within the pipe's latency). `answers` drive the console (the serial
    port is QEMU's stdin): each (text, keys), in turn, types `keys` once the console shows `text` after what
    the previous answer waited for. `until`: texts that end the run as soon as the console shows one (a boot
    refused: nothing more will come).
    """
    result = BootResult()
    started = time.monotonic()
    stdin = subprocess.PIPE if answers else subprocess.DEVNULL
    proc = subprocess.Popen(list(argv), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    buf = b""
    held = ""  # the start of an escape sequence the console's last chunk ended in (terminal_text)
    pending = list(answers)
    answered_to = 0  # where in `buf` the next answer's text is looked for
    try:
        fd = proc.stdout.fileno()
        while True:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                result.timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if echo is not None:
                shown, held = terminal_text(held + chunk.decode(errors="replace"))
                echo.write(shown)
                echo.flush()
            buf += chunk
            if _PANIC.search(buf):
                result.panicked = True
            if expect is not None and expect.encode() in buf:
                result.expected_seen = True
            for mark in marks:
                if mark not in result.seen_at and mark.encode() in buf:
                    result.seen_at[mark] = time.monotonic() - started
            if any(text.encode() in buf for text in until):
                break
            while pending and (at := buf.find(pending[0][0].encode(), answered_to)) >= 0:
                assert proc.stdin is not None
                answered_to = at + len(pending[0][0])
                with contextlib.suppress(BrokenPipeError):  # QEMU has exited: its end is read below
                    proc.stdin.write(pending.pop(0)[1].encode())
                    proc.stdin.flush()
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        result.exit_status = proc.wait()
        result.elapsed = time.monotonic() - started
    for m in _REACHED.finditer(buf):
        started_init = m.group(1) or m.group(2)
        result.init_reached = started_init.decode(errors="replace") if started_init else None
    result.console = buf.decode(errors="replace").replace("\r\n", "\n")
    result.lines = result.console.splitlines()
    return result


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="1024", help="guest memory in MiB (default 1024)")
    p.add_argument("--accel", default=default_accel(), help="tcg (default) or kvm")
    p.add_argument("--timeout", type=float, default=180, help="seconds before the VM is stopped (default 180)")
    p.add_argument("--expect", help="also require this text on the console (e.g. a marker the system prints)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the console")


def _report(prog: str, result: BootResult, args: argparse.Namespace) -> int:
    ok = result.init_reached is not None and not result.panicked and (args.expect is None or result.expected_seen)
    what = f"init reached: {result.init_reached}" if result.init_reached else "init NOT reached"
    if args.expect is not None:
        what += f"; {args.expect!r} {'seen' if result.expected_seen else 'NOT seen'}"
    if result.timed_out:
        what += f"; stopped after {args.timeout:.0f} s"
    print(f"\n{prog}: {'OK' if ok else 'FAILED'}: {what} ({result.elapsed:.1f} s)", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qemu/boot-dir",
        description="Boot a `netboot build` output directory in QEMU (-kernel/-initrd/-append) on a serial "
        "console and report whether the system's init was reached.",
    )
    p.add_argument("out", type=Path, metavar="DIR", help="an output directory of `netboot build`")
    p.add_argument("--append", default="", help="extra kernel parameters for this boot")
    p.add_argument("--kernel", type=Path, help="boot this kernel in place of the build's (e.g. its vmlinux, which "
                   "QEMU starts at its PVH entry without bzImage's decompressor)")
    _common(p)
    args = p.parse_args(argv)
    for name in (KERNEL_FILES[build_arch(args.out)], "initrd", "cmdline"):
        if not (args.out / name).is_file():
            print(f"boot-dir: error: {args.out} has no {name}; is it an output of netboot build?", file=sys.stderr)
            return 2
    result = watch(
        direct_argv(args.out, append=args.append, memory=args.memory, accel=args.accel, kernel=args.kernel),
        timeout=args.timeout, expect=args.expect, echo=None if args.quiet else sys.stdout,
    )
    return _report("boot-dir", result, args)


def net_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qemu/netboot",
        description="Network-boot a QEMU VM through QEMU's own iPXE ROM on user networking against a running "
        "`netboot serve`, print its serial console, and report whether the system's init was reached. "
        "From the VM, 10.0.2.2 is this machine's loopback.",
    )
    p.add_argument("--url", default="http://10.0.2.2:8080/boot.ipxe",
                   help="the boot file: http://10.0.2.2:PORT/boot.ipxe or tftp://10.0.2.2:PORT/boot.ipxe")
    p.add_argument("--mac", default="52:54:00:12:34:56", help="the VM's MAC address (default 52:54:00:12:34:56)")
    p.add_argument("--uefi", action="store_true", help="boot UEFI firmware (OVMF) instead of BIOS")
    _common(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="netboot-qemu-") as tmp:
        vars_copy = None
        if args.uefi:
            vars_copy = Path(tmp) / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
        argv_ = net_argv(args.url, args.mac, uefi=args.uefi, vars_copy=vars_copy, memory=args.memory,
                         accel=args.accel)
        result = watch(argv_, timeout=args.timeout, expect=args.expect, echo=None if args.quiet else sys.stdout)
    return _report("netboot", result, args)


if __name__ == "__main__":
    raise SystemExit(net_main(sys.argv[2:]) if sys.argv[1:2] == ["net"] else main())
