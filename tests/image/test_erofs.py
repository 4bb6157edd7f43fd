"""The erofs format: the closure as an erofs image that stage 1 mounts under the /nix/store overlay."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from initrd_reader import decompress, items, split
from support import assert_booted, boot, built, cli, need, netboot_ok

from devtools import qemu


def image_of(out: Path, tmp_path: Path, compression: str = "lz4") -> tuple[Path, bytes]:
    """The erofs image of an output directory's initrd, written to a file, and the stage 1 member."""
    image_member, rest = split((out / "initrd").read_bytes())
    if compression != "lz4":  # the image is uncompressed, and its member compressed like the rest
        assert image_member is None
        whole = decompress((out / "initrd").read_bytes(), compression)
        image_member, rest = split(whole)
    assert image_member is not None and len(image_member) % 4 == 0
    (image,) = items(image_member)
    assert image.name == "nix-store.erofs" and stat.S_IMODE(image.mode) == 0o444
    path = tmp_path / "nix-store.erofs"
    path.write_bytes(image.data)
    return path, rest


def nid(image: Path, path: str) -> int:
    shown = subprocess.run(["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True, check=True)
    return int(re.search(r"NID:\s*(\d+)", shown.stdout).group(1))


def test_erofs_image_holds_the_closure(system: Path, closure: list[str], tmp_path: Path) -> None:
    need("fsck.erofs")
    out = built(system, "--format", "erofs")
    assert (out / "cmdline").read_text().startswith(f"init={system}/init ")
    image, stage1_member = image_of(out, tmp_path)
    # lz4 compressed: the image is smaller than the files it holds.
    listed = (system / "closure-files.sha256").read_text().splitlines()
    assert image.stat().st_size < sum(Path(line.split("  ", 1)[1]).stat().st_size for line in listed)

    # erofs-utils' own checker reads every file back, decompressing it, and extracts the tree.
    tree = tmp_path / "tree"
    subprocess.run(["fsck.erofs", f"--extract={tree}", str(image)], check=True, capture_output=True)
    assert sorted(os.listdir(tree)) == sorted(["nix-path-registration", *(Path(p).name for p in closure)])
    assert (tree / "nix-path-registration").read_bytes().splitlines()[0].decode() in closure
    for line in (system / "closure-files.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        extracted = tree / Path(name).relative_to("/nix/store")
        assert subprocess.run(["sha256sum", extracted], capture_output=True, text=True).stdout.split()[0] == digest
        assert extracted.stat().st_uid == 0 and extracted.stat().st_mtime == 1
    # A store path's hard links are separate files in the image (a NAR has none: the same image on every host).
    hard = next(p for p in closure if p.endswith("-netboot-test-hardlinks"))
    assert os.stat(f"{hard}/share/a").st_ino == os.stat(f"{hard}/share/b").st_ino
    name = hard.removeprefix("/nix/store")
    assert nid(image, f"{name}/share/a") != nid(image, f"{name}/share/b")

    stage1 = {e.name: e for e in items(stage1_member)}
    load = stage1["etc/netboot-modules"].data.decode().splitlines()
    # erofs needs libcrc32c, which wants crc32c: either module may load it, so both are optional.
    assert [ln.rsplit("/", 1)[1] for ln in load] == [
        "loop.ko", "crc32c-intel.ko", "crc32c_generic.ko", "libcrc32c.ko", "erofs.ko", "overlay.ko"]
    assert [ln.startswith("optional ") for ln in load] == [False, True, True, False, False, False]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_erofs_uncompressed_image_in_a_compressed_member(system: Path, tmp_path: Path, compression: str) -> None:
    need("fsck.erofs")
    out = built(system, "--format", "erofs", "--compress", compression)
    if compression == "zstd":
        assert (out / "initrd").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    image, _ = image_of(out, tmp_path, compression if compression != "none" else "lz4")
    subprocess.run(["fsck.erofs", str(image)], check=True, capture_output=True)
    # Uncompressed: the image is about as big as the closure's files.
    listed = (system / "closure-files.sha256").read_text().splitlines()
    files = sum(Path(line.split("  ", 1)[1]).stat().st_size for line in listed)
    assert image.stat().st_size > files


def test_erofs_reproducible_and_cached(system: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    netboot_ok("build", system, "--out", a, "--format", "erofs", "--no-cache")
    # Another file system's directory order and a cold then warm cache: the same bytes.
    shm = Path("/dev/shm") / f"netboot-test-{os.getpid()}"
    try:
        netboot_ok("build", system, "--out", shm, "--format", "erofs", "--cache-dir", cache)
        assert (shm / "initrd").read_bytes() == (a / "initrd").read_bytes()
    finally:
        subprocess.run(["rm", "-rf", shm], check=True)
    warm = netboot_ok("build", system, "--out", b, "--format", "erofs", "--cache-dir", cache)
    assert "reused from the cache" in warm.stderr and (b / "initrd").read_bytes() == (a / "initrd").read_bytes()
    assert len(list(cache.glob("*.erofs"))) == 1
    # lz4hc makes another image, cached beside the first.
    netboot_ok("build", system, "--out", c, "--format", "erofs", "--level", "9", "--cache-dir", cache)
    assert (c / "initrd").read_bytes() != (a / "initrd").read_bytes()
    assert len(list(cache.glob("*.erofs"))) == 2


def test_erofs_bad_input(system: Path, tmp_path: Path) -> None:
    bad = cli("build", system, "--out", tmp_path / "o", "--format", "erofs", "--level", "13")
    assert bad.returncode == 2 and "--level 13 is out of range for lz4 (1-12)" in bad.stderr
    assert not (tmp_path / "o").exists()
    # Without mkfs.erofs on PATH: named, with what to install.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nix-store", "lz4"):
        (bin_dir / tool).symlink_to(need(tool))
    bad = cli("build", system, "--out", tmp_path / "o", "--format", "erofs", env={"PATH": str(bin_dir)})
    assert bad.returncode == 2 and "mkfs.erofs not found on PATH (install Debian's erofs-utils" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def assert_erofs_store(result: qemu.BootResult) -> None:
    """The store is the overlay over the image stage 1 mounted."""
    mount = next(ln for ln in result.lines if ln.startswith("NETBOOT-TEST: store mount:"))
    assert "lowerdir=/mnt-root/nix/.ro-store" in mount


@pytest.mark.vm
def test_erofs_lz4hc_boots(system: Path, closure: list[str]) -> None:
    """lz4 and lz4hc: what erofs-utils offers that the kernel reads (Debian's has no erofs lzma). lz4, the
    default, boots in test_erofs_boots."""
    result = boot(built(system, "--format", "erofs", "--level", "12"))
    assert_booted(result, closure, system)
    assert_erofs_store(result)


@pytest.mark.vm
def test_erofs_uncompressed_image_boots(system: Path, closure: list[str]) -> None:
    assert_booted(boot(built(system, "--format", "erofs", "--compress", "zstd")), closure, system)


@pytest.mark.vm
def test_erofs_boots(outs: dict[str, Path], system: Path, closure: list[str]) -> None:
    """The default, lz4 (served and booted over the network like any build: tests/vm/test_fetch_boot.py's erofs
    image)."""
    result = boot(outs["erofs"])
    assert_booted(result, closure, system)
    assert_erofs_store(result)
    assert "/nix-store.erofs" not in result.console  # stage 1 mounted it without complaint
