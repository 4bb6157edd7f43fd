"""An arm64 system, built on this x86_64 host, booted directly (-kernel/-initrd) in QEMU's arm64 virt board."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import assert_booted, boot, built


@pytest.mark.parametrize("fmt", ["direct", "squashfs", "erofs"])
def test_arm64_boots(arm64_system: Path, fmt: str) -> None:
    """The system's init runs on an arm64 CPU and finds its whole closure; in the image formats after stage 1
    (the system's arm64 busybox, its arm64 modules) mounted the store."""
    closure = (arm64_system / "closure-paths").read_text().split()
    result = boot(built(arm64_system, "--format", fmt))
    assert_booted(result, closure, arm64_system)
    console = result.console
    assert "NETBOOT-TEST: machine: aarch64" in console, console[-3000:]
    mount = next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: store mount:"))
    if fmt == "direct":
        assert mount == "NETBOOT-TEST: store mount: none" and "netboot stage 1" not in console
    else:
        assert mount.split()[3:6] == ["overlay", "/nix/store", "overlay"], mount
        assert f"netboot stage 1: starting {arm64_system}/init" in console
