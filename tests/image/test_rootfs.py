"""Systems that are not Nix's: a root filesystem directory (--rootfs) or an OCI image archive (--oci), with a
kernel given apart, in every format; booted in QEMU."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from initrd_reader import archives, decompress, items, split
from ocimake import directory, file, oci_archive, symlink, whiteout
from support import ServerProcess, boot, cli, curl_tftp, need, netboot_ok

# The root's init (reached through an absolute symlink, resolved inside the root): says what it sees.
INIT = b"""#!/bin/sh
export PATH=/bin
busybox mount -t proc proc /proc
echo "ROOTFS-TEST: init $0"
echo "ROOTFS-TEST: root $(busybox awk '$2 == "/" { t = $3 } END { print t }' /proc/mounts)"
echo "ROOTFS-TEST: modules $(busybox ls /lib/modules)"
echo "ROOTFS-TEST: owner $(busybox stat -c '%u:%g %a' /etc/owned)"
echo "ROOTFS-TEST: null $(busybox stat -c '%F %t:%T' /dev/null)"
[ -e /etc/removed ] && echo "ROOTFS-TEST: whiteout ignored" || echo "ROOTFS-TEST: whiteout honoured"
echo "ROOTFS-TEST: marker $(busybox cat /etc/marker)"
echo NETBOOT-TEST-OK
busybox poweroff -f
"""
APPEND = "console=ttyS0,115200 panic=-1 loglevel=4"


def make_root(path: Path) -> Path:
    """A small Debian-like root: static busybox, /lib a link to usr/lib, a file of another owner, a device."""
    for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "usr/lib"):
        (path / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", path / "bin/busybox")
    (path / "bin/sh").symlink_to("busybox")
    (path / "lib").symlink_to("usr/lib")
    (path / "etc/init.sh").write_bytes(INIT)
    (path / "etc/init.sh").chmod(0o755)
    (path / "sbin/init").symlink_to("/etc/init.sh")
    (path / "etc/marker").write_text("rootfs\n")
    (path / "etc/owned").write_text("not root's\n")
    os.chown(path / "etc/owned", 1234, 5678)
    (path / "etc/owned").chmod(0o640)
    os.mknod(path / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    return path


def make_oci(path: Path) -> Path:
    """The same root as an OCI archive of two layers; the second removes a file of the first (a whiteout)."""
    busybox = Path("/bin/busybox").read_bytes()
    base = [directory(d) for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "usr", "usr/lib")]
    base += [file("bin/busybox", busybox, 0o755), symlink("bin/sh", "busybox"), symlink("lib", "usr/lib"),
             file("etc/init.sh", INIT, 0o755), symlink("sbin/init", "/etc/init.sh"),
             file("etc/marker", b"layer 1\n"), file("etc/owned", b"not root's\n", 0o640, uid=1234, gid=5678),
             file("etc/removed", b"only in layer 1\n")]
    return oci_archive(path, [base, [whiteout("etc/removed"), file("etc/marker", b"layer 2\n")]])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.getuid() != 0:
        pytest.fail("these tests make device nodes and files of other owners: they need root")
    return make_root(tmp_path_factory.mktemp("rootfs") / "root")


def modules_of(system: Path) -> Path:
    (version,) = (system / "kernel-modules/lib/modules").iterdir()
    return version


def report(result_lines: list[str]) -> dict[str, str]:
    return dict(ln.removeprefix("ROOTFS-TEST: ").split(" ", 1) for ln in result_lines
                if ln.startswith("ROOTFS-TEST: "))


@pytest.mark.vm
@pytest.mark.parametrize("fmt", ["direct", "squashfs", "erofs"])
def test_rootfs_boots(root: Path, system: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    modules = modules_of(system)
    netboot_ok("build", "--rootfs", root, "--kernel", system / "kernel", "--modules", modules, "--format", fmt,
               "--append", APPEND, "--out", out)
    assert (out / "cmdline").read_text().split()[0] == ("rdinit=/sbin/init" if fmt == "direct" else "init=/sbin/init")
    seen = report(boot(out).lines)
    assert seen["init"] == "/sbin/init"
    assert seen["root"] == ("rootfs" if fmt == "direct" else "overlay")  # stage 1's overlay over the image
    assert seen["modules"] == modules.name  # added at /lib/modules, through the /lib -> usr/lib link
    assert seen["owner"] == "1234:5678 640"
    assert seen["null"] == "character special file 1:3"
    assert seen["marker"] == "rootfs"


@pytest.mark.parametrize("fmt", ["direct", pytest.param("erofs", marks=pytest.mark.vm)])
def test_oci_builds_with_whiteouts(system: Path, tmp_path: Path, fmt: str) -> None:
    """The image unpacked, layer over layer, is a root like --rootfs's, packed by the same code (booted in every
    format by test_rootfs_boots): the erofs build boots, the direct build's initrd is read back."""
    archive = make_oci(tmp_path / "image.tar")
    out = tmp_path / "out"
    netboot_ok("build", "--oci", archive, "--kernel", system / "kernel", "--modules", modules_of(system),
               "--format", fmt, "--append", APPEND, "--out", out)
    if fmt == "erofs":
        seen = report(boot(out).lines)
    else:
        compression = json.loads((out / "manifest.json").read_text())["compression"]
        lead, rest = split((out / "initrd").read_bytes())
        members = [*([lead] if lead else []), *archives(decompress(rest, compression))]
        found = {i.name.removeprefix("./"): i for m in members for i in items(m)}
        owned = found["etc/owned"]
        seen = {"whiteout": "ignored" if "etc/removed" in found else "honoured",
                "marker": found["etc/marker"].data.decode().strip(),
                "owner": f"{owned.uid}:{owned.gid} {owned.mode & 0o7777:o}"}
    assert seen["whiteout"] == "honoured"  # /etc/removed of layer 1 is gone
    assert seen["marker"] == "layer 2"
    assert seen["owner"] == "1234:5678 640"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["kind"] == "oci" and manifest["input"]["layers"] == 2
    assert manifest["input"]["digest"].startswith("sha256:")


@pytest.mark.parametrize("fmt", ["direct", "squashfs", "erofs"])
def test_rootfs_reproducible_and_described(root: Path, system: Path, tmp_path: Path, fmt: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--rootfs", root, "--kernel", system / "kernel", "--modules", modules_of(system), "--format", fmt]
    netboot_ok("build", *args, "--out", a)
    netboot_ok("build", *args, "--out", b)
    for name in ("bzImage", "initrd", "cmdline", "netboot.ipxe", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["input"] == {"kind": "rootfs", "path": str(root)}
    assert manifest["system"] == str(root) and manifest["format"] == fmt
    assert manifest["root"]["files"] == 4 and "closure" not in manifest


def test_rootfs_direct_needs_no_modules(root: Path, system: Path, tmp_path: Path) -> None:
    netboot_ok("build", "--rootfs", root, "--kernel", system / "kernel", "--format", "direct", "--out", tmp_path / "o")
    bad = cli("build", "--rootfs", root, "--kernel", system / "kernel", "--out", tmp_path / "p")
    assert bad.returncode == 2, bad.stderr
    assert "the squashfs format needs the kernel's loop, squashfs and overlay modules: give --modules DIR" in bad.stderr
    assert not (tmp_path / "p").exists()


def test_soft_dependency_missing_from_the_modules_is_warned(root: Path, system: Path, tmp_path: Path) -> None:
    """erofs needs libcrc32c, which needs crc32c loaded first: modules without any crc32c get one warning."""
    modules = tmp_path / "modules" / modules_of(system).name
    shutil.copytree(modules_of(system), modules, symlinks=True)
    for index in ("modules.dep", "modules.alias"):
        lines = (modules / index).read_text().splitlines(keepends=True)
        (modules / index).write_text("".join(ln for ln in lines if "crc32c" not in ln or "libcrc32c" in ln))
    done = netboot_ok("build", "--rootfs", root, "--kernel", system / "kernel", "--modules", modules,
                      "--format", "erofs", "-q", "--out", tmp_path / "out")
    assert done.stderr.splitlines() == [
        f"netboot: warning: module libcrc32c needs crc32c loaded first (a soft dependency), which kernel "
        f"{modules.name} has neither as a module nor built in: the erofs format may not boot"]
    # With the system's own modules, no warning.
    done = netboot_ok("build", "--rootfs", root, "--kernel", system / "kernel", "--modules", modules_of(system),
                      "--format", "erofs", "-q", "--out", tmp_path / "out")
    assert done.stderr == ""


def broken_oci(tmp_path: Path, what: str) -> Path:
    archive = make_oci(tmp_path / "image.tar")
    if what == "escape":
        return oci_archive(tmp_path / "escape.tar", [[file("../../etc/evil", b"x")]])
    # Drop the last layer's blob from the archive.
    with tarfile.open(archive) as t:
        index = json.loads(t.extractfile("index.json").read())
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.loads(t.extractfile(f"blobs/sha256/{digest}").read())
        gone = manifest["layers"][-1]["digest"].split(":")[1]
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as t:
        for m, data in members:
            if not m.name.endswith(gone):
                t.addfile(m, None if data is None else io.BytesIO(data))
    return broken


@pytest.mark.parametrize("case", ["no init", "init not executable", "not a bzImage", "no kernel", "two inputs",
                                  "modules of another kernel", "oci missing blob", "oci escape", "no such root"])
def test_bad_input(root: Path, system: Path, tmp_path: Path, case: str) -> None:
    kernel = ["--kernel", system / "kernel"]
    args: list[object]
    match case:
        case "no init":
            args, expected = ["--rootfs", root, *kernel, "--init", "/sbin/nope"], \
                f"init /sbin/nope is not in the root filesystem {root}"
        case "init not executable":
            args, expected = ["--rootfs", root, *kernel, "--init", "/etc/marker"], \
                f"init /etc/marker in {root} is not an executable file"
        case "not a bzImage":
            args, expected = ["--rootfs", root, "--kernel", root / "etc/marker"], \
                f"kernel {root / 'etc/marker'} is not a Linux kernel image (no boot header); netboot boots an x86_64 "
        case "no kernel":
            args, expected = ["--rootfs", root], "--rootfs needs --kernel KERNEL (an x86_64 bzImage or an arm64 Image)"
        case "two inputs":
            args, expected = [system, "--rootfs", root, *kernel], \
                "give one of SYSTEM, --rootfs DIR and --oci IMAGE.tar (not SYSTEM and --rootfs)"
        case "modules of another kernel":
            other = tmp_path / "modules/9.9.9"
            other.mkdir(parents=True)
            (other / "modules.dep").write_text("")
            args, expected = ["--rootfs", root, *kernel, "--modules", other], "is for kernel 9.9.9, but the kernel is"
        case "oci missing blob":
            args, expected = ["--oci", broken_oci(tmp_path, "blob"), *kernel], "is missing from the archive"
        case "oci escape":
            args, expected = ["--oci", broken_oci(tmp_path, "escape"), *kernel], "../../etc/evil"
        case _:
            args, expected = ["--rootfs", tmp_path / "nowhere", *kernel], "does not exist"
    out = tmp_path / "out"
    done = cli("build", *args, "--format", "direct", "--out", out)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


@pytest.mark.vm
def test_rootfs_build_is_served_like_any_other(root: Path, system: Path, tmp_path: Path) -> None:
    """`netboot serve` serves a root filesystem's build like any other: the machine's script names its kernel and
    initrd, which TFTP hands out as built (the build itself boots in test_rootfs_boots; network boots of a build
    are tests/vm/'s)."""
    out = tmp_path / "out"
    netboot_ok("build", "--rootfs", root, "--kernel", system / "kernel", "--modules", modules_of(system),
               "--format", "squashfs", "--append", APPEND, "--out", out)
    server = ServerProcess("--dir", out, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    try:
        got = curl_tftp(server.tftp_port, "machine/52-54-00-00-0f-01/boot.ipxe")
        assert got.returncode == 0, got.stderr
        script = got.stdout.decode()
        words = {ln.split()[0]: ln.split() for ln in script.splitlines() if ln and not ln.startswith("#")}
        assert all(w in words["kernel"] for w in APPEND.split()), script
        for path, built_file in ((words["kernel"][1], "bzImage"), (words["initrd"][-1], "initrd")):
            got = curl_tftp(server.tftp_port, path.lstrip("/"))
            assert got.returncode == 0 and got.stdout == (out / built_file).read_bytes(), (path, got.stderr)
    finally:
        server.stop()
    assert "tftp /machine/52-54-00-00-0f-01/" in server.log


def test_rootfs_fetch_writes_the_root_image_beside_stage1(root: Path, system: Path, tmp_path: Path) -> None:
    """--fetch with a root filesystem: the root's image is the `image` file, named in stage 1 and on the command
    line by its sha256."""
    need("unsquashfs")
    args = ["--rootfs", root, "--kernel", system / "kernel", "--modules", modules_of(system), "--fetch"]
    a, b = tmp_path / "a", tmp_path / "b"
    netboot_ok("build", *args, "--out", a)
    netboot_ok("build", *args, "--out", b)
    image = (a / "image").read_bytes()
    assert image == (b / "image").read_bytes() and image[:4] == b"hsqs"
    assert f"netboot.image_sha256={hashlib.sha256(image).hexdigest()}" in (a / "cmdline").read_text().split()
    listing = subprocess.run(["unsquashfs", "-d", "", "-l", a / "image"], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "/etc/marker" in listing and "/sbin/init" in listing
    stage1 = {e.name: e for e in items(split((a / "initrd").read_bytes())[1])}
    assert stage1["etc/netboot-image"].data.decode().split() == ["root.squashfs", str(len(image)), str(image[0])]
