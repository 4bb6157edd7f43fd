"""The kernel's architecture: recognised from its boot header, naming the build's files, recorded in the manifest,
choosing stage 1's busybox and an OCI image's platform; arm64 builds made on this x86_64 host in every format."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from fakestore import arm64_image, bzimage, closure_info, make_system
from initrd_reader import items, split
from ocimake import file, oci_index_archive, read_members
from support import built, cli, netboot_ok

from netboot.image.elf import read_header


def tiny_root(path: Path) -> Path:
    """A root filesystem with nothing but an init: enough for the direct format."""
    (path / "sbin").mkdir(parents=True)
    (path / "sbin/init").write_text("#!/bin/sh\n")
    (path / "sbin/init").chmod(0o755)
    return path


def kernel_file(tmp_path: Path, data: bytes, name: str = "vmlinuz") -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def ipxe_commands(out: Path) -> list[str]:
    return [ln for ln in (out / "netboot.ipxe").read_text().splitlines() if ln and not ln.startswith("#")]


@pytest.mark.parametrize(("case", "arch", "name", "release"), [
    ("bzImage", "x86_64", "bzImage", "6.1.0-fake"),
    ("Image", "arm64", "Image", "6.1.0-fake-arm64"),
    ("Image.gz", "arm64", "Image", "6.1.0-fake-arm64"),
])
def test_kernel_names_the_build(tmp_path: Path, case: str, arch: str, name: str, release: str) -> None:
    data = {"bzImage": bzimage(), "Image": arm64_image(), "Image.gz": arm64_image(gzipped=True)}[case]
    kernel = kernel_file(tmp_path, data)
    out = tmp_path / "out"
    done = cli("build", "--rootfs", tiny_root(tmp_path / "root"), "--kernel", kernel, "--format", "direct",
               "--out", out, "--no-cache")
    assert done.returncode == 0, done.stderr
    assert f"built {out} for {arch}:" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "cmdline", "initrd", "manifest.json",
                                                            "netboot.ipxe"])
    # An Image.gz is unpacked: firmware, GRUB and iPXE load the Image through its EFI stub.
    assert (out / name).read_bytes() == (gzip.decompress(data) if case == "Image.gz" else data)
    m = manifest(out)
    assert (m["arch"], m["kernel_version"]) == (arch, release)
    assert sorted(m["artifacts"]) == sorted([name, "initrd", "cmdline", "netboot.ipxe"])
    assert m["artifacts"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert ipxe_commands(out)[0] == f"kernel {name} initrd=initrd {m['cmdline']}"


def pe(machine: int) -> bytes:
    """An MS-DOS stub pointing to a PE header for `machine` (the PE format's "Machine Types")."""
    head = bytearray(0x200)
    head[:2] = b"MZ"
    head[0x3C:0x40] = struct.pack("<I", 0x80)
    head[0x80:0x86] = b"PE\0\0" + struct.pack("<H", machine)
    return bytes(head)


def zimage_arm32() -> bytes:
    head = bytearray(0x200)
    head[0x24:0x28] = struct.pack("<I", 0x016F2818)  # Documentation/arch/arm/booting.rst
    return bytes(head)


def riscv_image() -> bytes:
    head = bytearray(0x200)
    head[0x30:0x38] = b"RISCV\0\0\0"
    head[0x38:0x3C] = b"RSC\x05"  # Documentation/arch/riscv/boot-image-header.rst
    return bytes(head)


def zboot() -> bytes:
    head = bytearray(pe(0xAA64))
    head[4:8] = b"zimg"  # drivers/firmware/efi/libstub/zboot-header.S
    return bytes(head)


REFUSED = {
    "arm32 zImage": (zimage_arm32(), " is an arm32 zImage"),
    "RISC-V Image": (riscv_image(), " is a RISC-V Image"),
    "PE for i386": (pe(0x14C), " is a PE file for i386 without a Linux boot header"),
    "EFI program for x86_64": (pe(0x8664), " is a PE file for x86_64 without a Linux boot header"),
    "EFI zboot": (zboot(), " is an EFI zboot image (a compressed kernel inside an EFI decompressor, "
                           "CONFIG_EFI_ZBOOT); give the Image inside it"),
    "ELF vmlinux": (Path("/bin/busybox").read_bytes(), " is an ELF file for x86_64 (a vmlinux?), not a boot image"),
    "big-endian arm64": (arm64_image(flags=0b1011), " is a big-endian arm64 Image"),
    "gzip of something else": (gzip.compress(b"hello" * 100), " is gzip-compressed but not an arm64 Image"),
    "damaged Image.gz": (arm64_image(gzipped=True)[:-40], ": its gzip stream is damaged ("),
    "text": (b"#!/bin/sh\necho not a kernel\n", " is not a Linux kernel image (no boot header)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unknown_kernels_are_refused(tmp_path: Path, case: str) -> None:
    data, what = REFUSED[case]
    kernel = kernel_file(tmp_path, data)
    out = tmp_path / "out"
    done = cli("build", "--rootfs", tiny_root(tmp_path / "root"), "--kernel", kernel, "--format", "direct",
               "--out", out, "--no-cache")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"netboot: error: kernel {kernel}{what}"), done.stderr
    if case != "damaged Image.gz":
        assert done.stderr.rstrip().endswith("; netboot boots an x86_64 bzImage or an arm64 Image (or Image.gz)")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


def test_oci_image_for_the_kernels_platform(tmp_path: Path) -> None:
    """From an image index, the image of the kernel's architecture; an only image of another is refused."""
    layers = {platform: [[file("sbin/init", b"#!/bin/sh\n", 0o755), file("platform", platform.encode())]]
              for platform in ("linux/amd64", "linux/arm64")}
    archive = oci_index_archive(tmp_path / "image.tar", layers)
    members = read_members(archive)
    index = json.loads(members[f"blobs/sha256/{json.loads(members['index.json'])['manifests'][0]['digest'][7:]}"])
    digests = {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"] for m in index["manifests"]}
    for arch, data, platform in (("x86_64", bzimage(), "linux/amd64"), ("arm64", arm64_image(), "linux/arm64")):
        out = tmp_path / f"out-{arch}"
        netboot_ok("build", "--oci", archive, "--kernel", kernel_file(tmp_path, data, arch), "--format", "direct",
                   "--out", out, "--no-cache")
        m = manifest(out)
        assert (m["arch"], m["input"]["digest"]) == (arch, digests[platform])
        files = {e.name: e.data for e in items((out / "initrd").read_bytes())}
        assert files["platform"] == platform.encode()

    only_amd64 = oci_index_archive(tmp_path / "amd64.tar", {"linux/amd64": layers["linux/amd64"]})
    done = cli("build", "--oci", only_amd64, "--kernel", tmp_path / "arm64", "--format", "direct",
               "--out", tmp_path / "refused", "--no-cache")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "holds one image, for linux/amd64, and the kernel needs linux/arm64" in done.stderr
    assert not (tmp_path / "refused").exists()


def busybox_of(system: Path) -> Path:
    closure = (system / "closure-paths").read_text().split()
    return Path(next(p for p in closure if p.endswith("-busybox-static-1.35"))) / "bin/busybox"


def stage1_files(out: Path) -> dict[str, bytes]:
    _, rest = split((out / "initrd").read_bytes())
    return {e.name: e.data for e in items(rest)}


def elf_of(data: bytes, tmp_path: Path) -> tuple[str, bool] | None:
    """(architecture, dynamically linked) of an ELF program given as bytes."""
    (tmp_path / "elf").write_bytes(data)
    header = read_header(tmp_path / "elf")
    return None if header is None else (header.arch, header.dynamic)


@pytest.mark.parametrize("fmt", ["direct", "squashfs", "erofs"])
def test_arm64_system_builds_on_this_host(arm64_system: Path, tmp_path: Path, fmt: str) -> None:
    """The arm64 test system (Debian's arm64 kernel, modules and busybox in a Nix toplevel) packed here, on
    x86_64, in each format: nothing of arm64 can run on this host, so nothing of it ran."""
    out = built(arm64_system, "--format", fmt)
    assert sorted(p.name for p in out.iterdir()) == ["Image", "cmdline", "initrd", "manifest.json", "netboot.ipxe"]
    assert (out / "Image").read_bytes() == (arm64_system / "kernel").read_bytes()
    m = manifest(out)
    assert (m["arch"], m["kernel_version"]) == ("arm64", arm64_system.name.split("netboot-test-", 1)[1])
    assert "Image" in m["artifacts"] and "bzImage" not in m["artifacts"]
    assert ipxe_commands(out)[0].startswith("kernel Image initrd=initrd ")
    assert "console=ttyAMA0" in (out / "cmdline").read_text()
    if fmt == "direct":
        published = tmp_path / "published"
        netboot_ok("publish", out, published)
        (where,) = published.iterdir()
        assert (where / "Image").read_bytes() == (out / "Image").read_bytes() and not (where / "bzImage").exists()
        return
    # Stage 1 runs the system's own arm64 busybox and loads arm64 modules; nothing of the host's x86_64.
    stage1 = stage1_files(out)
    assert stage1["bin/busybox"] == busybox_of(arm64_system).read_bytes()
    assert elf_of(stage1["bin/busybox"], tmp_path) == ("arm64", False)
    modules = stage1["etc/netboot-modules"].decode().split()
    assert modules and all(elf_of(stage1[p], tmp_path) == ("arm64", False) for p in modules if p != "optional")


def test_arm64_stage1_never_takes_the_hosts_busybox(arm64_system: Path, tmp_path: Path) -> None:
    """An arm64 system without a busybox of its own: this host's x86_64 busybox-static is no stand-in (the
    kernel could not run it); --busybox gives one, checked to be arm64 and static."""
    store = tmp_path / "store"
    top = make_system(store, kernel=(arm64_system / "kernel").read_bytes())
    (top / "kernel-modules").symlink_to((arm64_system / "kernel-modules").resolve())
    info = closure_info(tmp_path, [top])
    args = ["build", top, "--closure-info", info, "--format", "squashfs", "--no-cache"]
    done = cli(*args, "--out", tmp_path / "refused")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "netboot: error: no static arm64 busybox for stage 1 (not /bin/busybox, a static x86_64 ELF program): add "
        "one to the system, or give --busybox PATH (Debian's busybox-static:arm64 has one)")
    assert not (tmp_path / "refused").exists()

    busybox = busybox_of(arm64_system)
    out = tmp_path / "out"
    done = cli(*args, "--busybox", busybox, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"stage 1: busybox from {busybox}," in done.stderr
    assert stage1_files(out)["bin/busybox"] == busybox.read_bytes()


@pytest.mark.parametrize("case", ["not ELF", "dynamic", "other architecture", "direct format"])
def test_busybox_option_is_checked(system: Path, arm64_system: Path, tmp_path: Path, case: str) -> None:
    text = tmp_path / "busybox.sh"
    text.write_text("#!/bin/sh\n")
    given, fmt, expected = {
        "not ELF": (text, "squashfs", f"--busybox {text} is not an ELF program"),
        "dynamic": (Path("/bin/ls"), "erofs", "--busybox /bin/ls is dynamically linked, and stage 1 holds no "
                    "libraries: give a static busybox (Debian's busybox-static:amd64)"),
        "other architecture": (busybox_of(arm64_system), "squashfs",
                               f"--busybox {busybox_of(arm64_system)} is for arm64, but the kernel is x86_64"),
        "direct format": (Path("/bin/busybox"), "direct", "--busybox is for the stage 1 of the squashfs and erofs "
                          "formats; the direct format has none"),
    }[case]
    out = tmp_path / "out"
    done = cli("build", system, "--format", fmt, "--busybox", given, "--out", out, "--no-cache")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"netboot: error: {expected}"
    assert not out.exists()


def test_arm64_rootfs_takes_its_own_busybox(arm64_system: Path, tmp_path: Path) -> None:
    """A root filesystem with an arm64 kernel: stage 1's busybox is the root's arm64 one, the host's never."""
    root = tiny_root(tmp_path / "root")
    (root / "bin").mkdir()
    shutil.copy(busybox_of(arm64_system), root / "bin/busybox")
    (modules,) = (arm64_system / "kernel-modules/lib/modules").iterdir()
    out = tmp_path / "out"
    netboot_ok("build", "--rootfs", root, "--kernel", arm64_system / "kernel", "--modules", modules,
               "--format", "squashfs", "--out", out, "--no-cache")
    assert manifest(out)["arch"] == "arm64"
    assert stage1_files(out)["bin/busybox"] == busybox_of(arm64_system).read_bytes()
