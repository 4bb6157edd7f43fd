"""Boot what `netboot build` makes in QEMU (-kernel/-initrd) and check the system saw its whole closure."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from support import ROOT, assert_booted, boot, build_system, built, need, netboot_ok, pvh_kernel, vm_accel

from devtools import qemu


def assert_direct_booted(result: qemu.BootResult, closure: list[str], system: Path) -> None:
    assert_booted(result, closure, system)
    # No stage 1: the store is the initramfs itself, not a separate mount.
    assert "NETBOOT-TEST: store mount: none" in result.console
    assert "netboot stage 1" not in result.console


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip"])  # lz4: test_boot_dir_script_reports_...
def test_direct_boots_each_compression(system: Path, closure: list[str], compression: str) -> None:
    assert_direct_booted(boot(built(system, "--format", "direct", "--compress", compression)), closure, system)


@pytest.mark.parametrize("compression", ["xz", "gzip"])  # zstd, the default: the network boots' builds
def test_squashfs_boots_other_compressors(system: Path, closure: list[str], compression: str) -> None:
    """Stage 1 mounts the image read-only under a writable overlay (assert_booted: the store is writable), and
    the system sees the command line as built."""
    out = built(system, "--format", "squashfs", "--compress", compression)
    result = boot(out)
    assert_booted(result, closure, system)
    mount = next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: store mount:"))
    assert mount.split()[3:6] == ["overlay", "/nix/store", "overlay"], mount
    assert "lowerdir=/mnt-root/nix/.ro-store" in mount
    cmdline = next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: cmdline:"))
    assert cmdline.split()[2:] == (out / "cmdline").read_text().split()


def test_stage1_loads_compressed_modules(tmp_path: Path) -> None:
    """A kernel whose modules are .ko.xz and .ko.zst (both in one tree, so that one boot loads each kind: loop
    .zst, squashfs and overlay .xz): stage 1 gets them unpacked, and the system boots."""
    system = build_system(tmp_path / "result", "--argstr", "moduleCompression", "mixed")
    modules = system / "kernel-modules"
    assert any(modules.rglob("loop.ko.zst")) and any(modules.rglob("squashfs.ko.xz"))
    assert any(modules.rglob("overlay.ko.xz")) and not any(modules.rglob("*.ko"))
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out)
    closure = (system / "closure-paths").read_text().split()
    assert_booted(boot(out), closure, system)


def test_boot_dir_script_reports_reached_and_failed_inits(system: Path, closure: list[str]) -> None:
    """Its first boot is also the direct lz4 build's: the console it echoes gets test_direct_boots_each_
    compression's checks."""
    out = built(system, "--format", "direct", "--compress", "lz4")
    vm_accel()  # the script's QEMU takes it from the environment
    ok = subprocess.run(
        [ROOT / "qemu/boot-dir", out, "--expect", "NETBOOT-TEST-OK"], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stderr
    assert f"OK: init reached: {system}/init" in ok.stderr
    console = ok.stdout.replace("\r\n", "\n")
    echoed = qemu.BootResult(console=console, lines=console.splitlines(), init_reached=f"{system}/init")
    assert_direct_booted(echoed, closure, system)
    # An rdinit= the kernel cannot run: the script must say so and fail (bzImage's start was the first boot's:
    # this one starts the same kernel at its PVH entry).
    bad = subprocess.run(
        [ROOT / "qemu/boot-dir", out, "-q", "--append", "rdinit=/nix/store/missing-init",
         "--kernel", pvh_kernel(out / "bzImage")], capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1, bad.stderr
    assert "FAILED: init NOT reached" in bad.stderr


def test_rescue_shell_on_the_console_when_a_module_fails(system: Path, tmp_path: Path) -> None:
    """module_blacklist= makes the kernel refuse loop (EPERM): stage 1's rescue shell must answer on the serial
    console, its input the console rather than the module list it was reading."""
    need(qemu.qemu_binary())
    vm_accel()
    out = built(system)
    argv = qemu.direct_argv(out, append="module_blacklist=loop", kernel=pvh_kernel(out / "bzImage"))
    result = qemu.watch(argv, timeout=240, answers=[
        ("here is a shell", "echo RESCUE-$((6 * 7))\n"),  # the shell, not the echo of what is typed, prints 42
        ("RESCUE-42", "poweroff -f\n"),
    ])
    console = result.console
    assert not result.timed_out, console[-3000:]
    assert re.search(r"netboot stage 1: cannot load module /lib/modules/\S+/loop\.ko", console), console[-3000:]
    # At the start of a line, what the shell printed (what is typed next may be echoed right after it).
    assert re.search(r"^RESCUE-42", console, re.MULTILINE), console[-3000:]
    assert "Kernel panic" not in console and "not syncing" not in console
