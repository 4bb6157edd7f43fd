"""Machines of two architectures on one server: each profile's architecture from its build's manifest, each
machine's from its loader (iPXE's ${buildarch}, GRUB's $grub_cpu), the arm64 loaders, and refusals."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from support import fake_out
from test_grub import grub_checks, text

from netboot.core.errors import NetbootError
from netboot.core.loaders import Loaders
from netboot.core.machines import Machines
from netboot.server.namespace import Namespace

MIXED, X86, ARM = "52:54:00:00:0d:01", "52:54:00:00:0d:02", "52:54:00:00:0d:03"


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    fake_out(tmp_path / "x86", arch="x86_64")
    fake_out(tmp_path / "arm", arch="arm64")
    f = tmp_path / "machines.toml"
    f.write_text(f"""
[profiles.rack]
dir = {{ x86_64 = "x86", arm64 = "arm" }}
append = "quiet"
[profiles.x86]
dir = "x86"
[profiles.arm]
dir = "arm"
[machines."{MIXED}"]
profile = "rack"
[machines."{X86}"]
profile = "x86"
[machines."{ARM}"]
profile = "arm"
""")
    return f


def arm64_loaders(d: Path, ipxe: bool = False) -> Loaders:
    d.mkdir()
    for name in ("shimaa64.efi", "grubaa64.efi", "mmaa64.efi", *(["ipxe.efi"] if ipxe else [])):
        (d / name).write_bytes(f"arm64 {name}".encode())
    return Loaders.from_options([f"arm64={d}"])


def test_each_machine_gets_its_architectures_build(fleet: Path, tmp_path: Path) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False, loaders=arm64_loaders(tmp_path / "aa64", ipxe=True))
    try:
        # Each profile's architecture, from its build's manifest (what DHCP compares option 93 with).
        assert ns.arches == {"rack": "x86_64", "rack@arm64": "arm64", "x86": "x86_64", "arm": "arm64"}
        mixed = MIXED.replace(":", "-")
        arm_gen, x86_gen = ns.profiles["rack@arm64"].current.id, ns.profiles["rack"].current.id
        # iPXE of arm64 asks by its ${buildarch}: the profile's arm64 build, its kernel named Image.
        script = text(ns, f"machine/{mixed}/arm64/boot.ipxe")
        assert f"kernel /machine/{mixed}/{arm_gen}/Image initrd=initrd init=/x quiet" in script, script
        # x86 iPXE asks by MAC alone, or says x86_64 (UEFI) or i386 (BIOS): the x86_64 build.
        for name in (f"machine/{mixed}/boot.ipxe", f"machine/{mixed}/x86_64/boot.ipxe",
                     f"machine/{mixed}/i386/boot.ipxe"):
            assert f"kernel /machine/{mixed}/{x86_gen}/bzImage initrd=initrd" in text(ns, name), name
        # GRUB of arm64 (its $grub_cpu), the same choice.
        grub = text(ns, f"machine/{MIXED}/arm64/grub.cfg")
        grub_checks(grub, tmp_path)
        assert f"linux ${{netboot_files}}/machine/{mixed}/{arm_gen}/Image init=/x quiet;" in grub, grub
        # The files the arm64 script names are served to that machine, from the arm64 build.
        item = ns.lookup(f"machine/{mixed}/{arm_gen}/Image")
        assert item.mac == MIXED and item.file is not None and item.file.size == len(b"Image")
        assert ns.lookup(f"machine/{mixed}/{arm_gen}/initrd").file is not None
        # What a loader must ask for first chooses by architecture too.
        # iPXE's chain says ${buildarch} among its facts: the arm64 build for arm64, x86_64's for x86.
        assert "/buildarch=${buildarch:uristring}/" in text(ns, "boot.ipxe")
        said = text(ns, f"machine/{mixed}/uuid=/serial=S1/buildarch=arm64/platform=efi/boot.ipxe")
        assert f"kernel /machine/{mixed}/{arm_gen}/Image initrd=initrd" in said, said
        for arch in ("x86_64", "i386"):
            said = text(ns, f"machine/{mixed}/buildarch={arch}/boot.ipxe")
            assert f"kernel /machine/{mixed}/{x86_gen}/bzImage initrd=initrd" in said, said
        chain = text(ns, "grub/grub.cfg")
        grub_checks(chain, tmp_path)
        assert "source /machine/${net_default_mac}/${grub_cpu}/grub.cfg" in chain
        # The arm64 loaders of --loaders arm64=DIR, by the firmware's names; its iPXE apart from x86's.
        for name in ("shimaa64.efi", "grubaa64.efi", "mmaa64.efi", "arm64/ipxe.efi"):
            held = ns.lookup(name).file
            assert held is not None and held.size == len(f"arm64 {name.removeprefix('arm64/')}"), name
    finally:
        ns.close()


def test_a_machine_of_another_architecture_is_refused(fleet: Path, caplog: pytest.LogCaptureFixture) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    caplog.set_level(logging.INFO, logger="netboot.serve")
    try:
        x86 = X86.replace(":", "-")
        script = text(ns, f"machine/{x86}/arm64/boot.ipxe")
        # No kernel: it says why, and asks again by the same name later (the machines file may change).
        assert "kernel" not in script and "boot\n" not in script
        assert (f"echo netboot: this machine ({X86}) cannot boot: profile x86 is for x86_64, and this machine is "
                "arm64") in script
        assert script.endswith(f"chain --replace --autofree /machine/{x86}/arm64/boot.ipxe\n"), script
        # Said by ${buildarch} among iPXE's facts: refused alike, and asked again with its facts.
        script = text(ns, f"machine/{x86}/buildarch=arm64/boot.ipxe")
        assert "kernel" not in script and "profile x86 is for x86_64, and this machine is arm64" in script
        assert f"chain --replace --autofree /machine/{x86}/uuid=${{uuid}}/" in script, script
        grub = text(ns, f"machine/{X86}/arm64/grub.cfg")
        assert "linux" not in grub and "profile x86 is for x86_64, and this machine is arm64" in grub
        # An arm64-only profile offered to an x86_64 machine; an architecture netboot has no builds for.
        assert "profile arm is for arm64, and this machine is x86_64" in text(ns, f"machine/{ARM}/x86_64/boot.ipxe")
        assert "and this machine is riscv64" in text(ns, f"machine/{ARM}/riscv64/boot.ipxe")
        lines = [r.getMessage() for r in caplog.records]
        assert f"mac={X86} profile=x86 refused: profile x86 is for x86_64, and this machine is arm64" in lines
        assert ns.who(f"machine/{x86}/arm64/boot.ipxe") == (X86, "x86")
    finally:
        ns.close()


def test_a_build_of_another_architecture_than_its_dir_says_is_an_error(fleet: Path, tmp_path: Path) -> None:
    fleet.write_text('[profiles.rack]\ndir = { arm64 = "x86" }\n')
    with pytest.raises(NetbootError, match=rf"profile rack: {tmp_path}/x86 holds a build for x86_64, not arm64"):
        Namespace(Machines.load(fleet), single_dir=False)


def test_a_rebuild_into_another_architecture_keeps_the_previous_build(fleet: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    ns = Namespace(Machines.load(fleet), single_dir=False)
    caplog.set_level(logging.INFO, logger="netboot.serve")
    try:
        before = ns.profiles["rack@arm64"].current.id
        shutil.rmtree(tmp_path / "arm")
        fake_out(tmp_path / "arm", fmt="direct", arch="x86_64")
        ns.refresh()
        assert ns.profiles["rack@arm64"].current.id == before and ns.arches["rack@arm64"] == "arm64"
        assert ns.arches["arm"] == "x86_64"  # a profile of one build follows it, whatever its architecture
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
            f"profile rack@arm64: keeping the previous build: profile rack@arm64: {tmp_path}/arm holds a build for "
            "x86_64, not arm64"]
    finally:
        ns.close()
