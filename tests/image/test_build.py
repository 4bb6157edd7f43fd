"""What `netboot build` writes: artifacts, manifest, initrd layout, reproducibility, atomic replacement."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from initrd_reader import archives, cpio_extract, decompress, items, newc_headers, split
from support import ROOT, build_system, need, netboot, netboot_ok


def test_artifacts_and_manifest(system: Path, closure: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out, "--format", "direct", "--append", "quiet hostname=n1")
    assert sorted(p.name for p in out.iterdir()) == ["bzImage", "cmdline", "initrd", "manifest.json", "netboot.ipxe"]
    params = (system / "kernel-params").read_text().strip()
    cmdline = f"rdinit={system}/init {params} quiet hostname=n1"
    assert (out / "cmdline").read_text() == cmdline + "\n"
    assert (out / "bzImage").read_bytes() == (system / "kernel").read_bytes()
    script = (out / "netboot.ipxe").read_text().splitlines()
    assert script[0] == "#!ipxe"
    commands = [ln for ln in script if ln and not ln.startswith("#")]
    assert commands == [f"kernel bzImage initrd=initrd {cmdline}", "initrd --name initrd initrd", "boot"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["system"] == str(system)
    assert (manifest["format"], manifest["compression"], manifest["level"]) == ("direct", "zstd", 10)
    assert manifest["closure"]["paths"] == len(closure)
    assert manifest["cmdline"] == cmdline
    assert manifest["kernel_version"] == os.path.basename(str(system)).split("netboot-test-", 1)[1]
    assert manifest["arch"] == "x86_64"
    assert manifest["tool"] == "netboot" and manifest["version"]
    for name in ("bzImage", "initrd", "cmdline", "netboot.ipxe"):
        data = (out / name).read_bytes()
        assert manifest["artifacts"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_squashfs_cmdline_uses_init(system: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out)
    assert (out / "cmdline").read_text().startswith(f"init={system}/init console=")
    assert json.loads((out / "manifest.json").read_text())["format"] == "squashfs"


def store_files(paths: list[str]) -> dict[str, tuple[str, bytes | str, int]]:
    """Every file under the store paths: relative name → (type, content or link target, permissions)."""
    found = {}
    for top in paths:
        for p in [Path(top), *sorted(Path(top).rglob("*"))] if not Path(top).is_symlink() else [Path(top)]:
            name = str(p).lstrip("/")
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[name] = ("link", os.readlink(p), 0o777)
            elif stat.S_ISDIR(st.st_mode):
                found[name] = ("dir", b"", stat.S_IMODE(st.st_mode))
            else:
                found[name] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def test_direct_initrd_holds_the_whole_closure(system: Path, closure: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out, "--format", "direct")
    initrd = (out / "initrd").read_bytes()
    assert initrd[:2] == b"\x28\xb5"  # zstd members
    members = archives(decompress(initrd, "zstd"))  # every entry aligned, each member ending in a trailer
    # Leading directories, one member per store path (in name order), the registration.
    assert len(members) == len(closure) + 2
    by_member = [[e.name for e in items(m)] for m in members]
    assert by_member[0] == ["dev", "dev/console", "nix", "nix/store", "proc", "sys"]
    for names_in, store_path in zip(by_member[1:-1], sorted(closure, key=lambda p: p.split("/")[-1]), strict=True):
        assert all(n == store_path[1:] or n.startswith(store_path[1:] + "/") for n in names_in), store_path
    assert by_member[-1] == ["nix/store/nix-path-registration"]

    entries = [e for m in members for e in items(m)]
    names = [e.name for e in entries]
    assert names[:6] == ["dev", "dev/console", "nix", "nix/store", "proc", "sys"]
    seen: set[str] = set()
    for name in names:  # every directory before its contents
        parent = name.rsplit("/", 1)[0] if "/" in name else None
        assert parent is None or parent in seen, f"{name} comes before its directory"
        seen.add(name)
    assert all((e.uid, e.gid, e.mtime) == (0, 0, 1) for e in entries)

    expected = store_files(closure)
    registration_name = "nix/store/nix-path-registration"
    got = {e.name: e for e in entries if e.name.startswith("nix/store/") and e.name != registration_name}
    assert sorted(got) == sorted(expected)
    for name, (kind, content, perm) in expected.items():
        e = got[name]
        if kind == "link":
            assert e.linkpath == content, name
        elif kind == "file":
            assert (e.data, stat.S_IMODE(e.mode)) == (content, perm), name
        else:
            assert stat.S_ISDIR(e.mode) and stat.S_IMODE(e.mode) == perm, name

    registration = next(e for e in entries if e.name == registration_name).data
    dump = subprocess.run(["nix-store", "--dump-db", *sorted(closure, key=lambda p: p.split("/")[-1])],
                          capture_output=True, check=True).stdout
    assert registration == dump

    # GNU cpio, the reference reader, unpacks the same tree.
    for member in members:
        cpio_extract(member, tmp_path / "x")
    for name, (kind, content, _) in expected.items():
        p = tmp_path / "x" / name
        if kind == "file":
            assert p.read_bytes() == content, name
        elif kind == "link":
            assert os.readlink(p) == content, name


def test_hardlinks_become_separate_files(system: Path, tmp_path: Path) -> None:
    """Hard links in the store are written as independent files: nlink 1, inodes never shared."""
    hard = next(p for p in (system / "closure-paths").read_text().split() if p.endswith("-netboot-test-hardlinks"))
    assert os.stat(f"{hard}/share/a").st_ino == os.stat(f"{hard}/share/b").st_ino
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out, "--format", "direct", "--compress", "none")
    members = archives((out / "initrd").read_bytes())
    (member,) = [m for m in members if items(m)[0].name == hard.lstrip("/")]  # the store path's own member
    headers = newc_headers(member)
    assert all(nlink == 1 for _, _, _, nlink, mode in headers if stat.S_ISREG(mode))
    inodes = [ino for _, name, ino, _, _ in headers if name != "TRAILER!!!"]
    assert len(inodes) == len(set(inodes))
    data = {e.name: e.data for e in items(member)}
    a, b = (data[f"{hard.lstrip('/')}/share/{n}"] for n in "ab")
    assert a == b == b"one inode, two names\n"


def test_squashfs_initrd_layout(system: Path, closure: list[str], tmp_path: Path) -> None:
    need("unsquashfs")
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out)
    image_member, rest = split((out / "initrd").read_bytes())
    assert image_member is not None and len(image_member) % 4 == 0
    (image,) = items(image_member)
    assert image.name == "nix-store.squashfs" and stat.S_IMODE(image.mode) == 0o444
    (tmp_path / "img").write_bytes(image.data)
    listing = subprocess.run(["unsquashfs", "-d", "", "-l", tmp_path / "img"], capture_output=True, text=True,
                             check=True).stdout.split()
    top_level = sorted(p for p in listing if p.count("/") == 1)
    assert top_level == sorted(["/nix-path-registration", *(p.removeprefix("/nix/store") for p in closure)])
    registration = subprocess.run(["unsquashfs", "-cat", tmp_path / "img", "nix-path-registration"],
                                  capture_output=True, check=True).stdout
    assert registration.splitlines()[0].decode() in closure

    assert rest[:2] == b"\x28\xb5"  # stage 1, zstd
    stage1 = {e.name: e for e in items(rest)}
    assert stage1["init"].data.startswith(b"#!/bin/busybox sh\n") and stat.S_IMODE(stage1["init"].mode) == 0o755
    assert stage1["bin/busybox"].data[:4] == b"\x7fELF"
    assert stage1["dev/console"].rdev == (5, 1)
    load = stage1["etc/netboot-modules"].data.decode().split()
    assert [p.rsplit("/", 1)[1] for p in load] == ["loop.ko", "squashfs.ko", "overlay.ko"]  # no soft dependencies
    for p in load:
        assert stage1[p].data[:4] == b"\x7fELF"


@pytest.mark.parametrize("fmt", ["direct", "squashfs", "erofs"])
def test_reproducible(system: Path, tmp_path: Path, fmt: str) -> None:
    """Two cold builds, each with a cache of its own (a shared one would hand the second the first's bytes), into
    folders of different names and depths, at different times: the same bytes."""
    outs = [tmp_path / "a" / "out", tmp_path / "elsewhere" / "deeper" / "b"]
    for n, out in enumerate(outs):
        if n:
            time.sleep(1.1)  # a clock-dependent byte would now differ
        out.parent.mkdir(parents=True)
        done = netboot_ok("build", system, "--out", out, "--format", fmt, "--cache-dir", out.parent / "cache")
        assert "; 0 reused from the cache" in done.stderr, done.stderr  # cold
    for name in ("bzImage", "initrd", "cmdline", "netboot.ipxe", "manifest.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_source_date_epoch_sets_every_mtime(system: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    netboot_ok("build", system, "--out", out, "--format", "direct", env=env)
    members = archives(decompress((out / "initrd").read_bytes(), "zstd"))
    assert {e.mtime for m in members for e in items(m)} == {1700000000}


def test_rebuild_replaces_atomically_and_failures_keep_the_old(system: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out, "--format", "direct", "--append", "first")
    old_cmdline = (out / "cmdline").read_text()
    with open(out / "initrd", "rb") as held:  # a transfer in progress keeps reading the old file
        old_initrd = (out / "initrd").read_bytes()
        failed = netboot("build", system, "--out", out, "--closure-info", tmp_path / "missing")
        assert failed.returncode == 2
        assert (out / "cmdline").read_text() == old_cmdline
        netboot_ok("build", system, "--out", out, "--format", "direct", "--compress", "gzip", "--append", "second")
        assert (out / "cmdline").read_text().endswith(" second\n")
        assert (out / "initrd").read_bytes()[:2] == b"\x1f\x8b"
        assert held.read() == old_initrd
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.slow
def test_interrupted_build_leaves_previous_output(system: Path, tmp_path: Path) -> None:
    """SIGTERM in the middle of a long mksquashfs: old output (of the small test system) intact, nothing left
    behind, no orphans."""
    large = build_system(tmp_path / "result", "--arg", "payload", "[ /usr/share/qemu /usr/lib/x86_64-linux-gnu ]")
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out, "--format", "direct")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "netboot", "build", str(large), "--out", str(out), "--compress", "xz"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(".netboot-" in p.name for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "the build did not start"
            time.sleep(0.05)
        while not subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "mksquashfs"], capture_output=True).stdout:
            assert time.monotonic() < deadline and proc.poll() is None, "mksquashfs did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "expected mksquashfs to be running"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "result"]
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), f"child {pid} outlived the build"


@pytest.mark.slow
def test_large_initrd_warns(tmp_path: Path) -> None:
    from fakestore import closure_info, make_system, store_path

    store = tmp_path / "store"
    top = make_system(store)
    big = store_path(store, "big")
    big.mkdir()
    with open(big / "disk.img", "wb") as f:
        f.truncate((1 << 30) + (64 << 20))
    out = tmp_path / "out"
    info = closure_info(tmp_path, [top, big])
    proc = netboot_ok("build", top, "--out", out, "--format", "direct", "--compress", "none", "--closure-info", info,
                      "--no-cache")  # the cache would write the GiB a second time
    assert "warning: the initrd is 1.06 GiB" in proc.stderr
    assert (out / "initrd").stat().st_size > 1 << 30


def run_on_terminal(*args: object) -> bytes:
    """Run netboot with a pseudo-terminal as stdout and stderr, and return what it printed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "netboot", *map(str, args)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    try:
        while chunk := os.read(master, 65536):
            output += chunk
    except OSError:  # EIO: the terminal's other end closed
        pass
    finally:
        os.close(master)
        assert proc.wait(timeout=120) == 0, output.decode(errors="replace")
    return output


def test_progress_on_a_terminal_only(system: Path, closure: list[str], tmp_path: Path) -> None:
    n = len(closure)
    shown = run_on_terminal("build", system, "--out", tmp_path / "a", "--format", "direct", "--no-cache")
    assert re.search(rb"\rpacking: %d/%d store paths, \d+ MiB" % (n, n), shown), shown
    shown = run_on_terminal("build", system, "--out", tmp_path / "a2", "--format", "direct")
    shown = run_on_terminal("build", system, "--out", tmp_path / "a3", "--format", "direct")
    assert re.search(rb"\rpacking: %d/%d store paths \(%d from the cache\), \d+ MiB" % (n, n, n), shown), shown
    shown = run_on_terminal("build", system, "--out", tmp_path / "b", "--no-cache")
    assert re.search(rb"\rsquashfs: \[=+\S?\] +\d+/\d+ 100%", shown), shown
    assert b"Filesystem size" not in shown  # mksquashfs's report is not passed on
    quiet = run_on_terminal("build", system, "--out", tmp_path / "c", "--format", "direct", "-q")
    assert quiet == b""
    piped = netboot_ok("build", system, "--out", tmp_path / "d", "--format", "direct")
    assert "packing:" not in piped.stderr and "\r" not in piped.stderr


@pytest.mark.parametrize("fmt", ["squashfs", "erofs"])
def test_fetch_writes_the_image_beside_a_small_initrd(system: Path, closure: list[str], tmp_path: Path,
                                                      fmt: str) -> None:
    """--fetch: the image is a file of its own, its sha256 on the command line; the initrd holds stage 1 with the
    network drivers and modules.alias to load them by modalias, and names the image it downloads."""
    out = tmp_path / "out"
    netboot_ok("build", system, "--out", out, "--format", fmt, "--fetch")
    assert sorted(p.name for p in out.iterdir()) == [
        "bzImage", "cmdline", "image", "initrd", "manifest.json", "netboot.ipxe"]
    image = (out / "image").read_bytes()
    digest = hashlib.sha256(image).hexdigest()
    cmdline = (out / "cmdline").read_text().split()
    assert f"netboot.image_sha256={digest}" in cmdline and f"init={system}/init" in cmdline
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"]["image"] == {"size": len(image), "sha256": digest}
    assert manifest["cmdline"] == " ".join(cmdline)
    if fmt == "squashfs":
        assert image[:4] == b"hsqs"
    else:
        assert image[1024:1028] == b"\xe2\xe1\xf5\xe0"  # erofs's superblock magic, at 1 KiB

    initrd = (out / "initrd").read_bytes()
    assert len(initrd) < len(image) / 4
    image_member, rest = split(initrd)
    assert image_member is None  # no image in the initrd: stage 1 alone
    stage1 = {e.name: e for e in items(rest)}
    assert not any(n.startswith("nix-store.") for n in stage1)
    name, size, first = stage1["etc/netboot-image"].data.decode().split()
    assert (name, int(size), int(first)) == (f"nix-store.{fmt}", len(image), image[0])
    version = manifest["kernel_version"]
    dep = stage1[f"lib/modules/{version}/modules.dep"].data.decode()
    assert "kernel/drivers/net/virtio_net.ko:" in dep and "kernel/drivers/net/ethernet/intel/e1000/e1000.ko:" in dep
    for line in dep.splitlines():
        for module in line.replace(":", "").split():
            assert stage1[f"lib/modules/{version}/{module}"].data[:4] == b"\x7fELF"
    aliases = stage1[f"lib/modules/{version}/modules.alias"].data.decode().splitlines()
    assert "alias virtio:d00000001v* virtio_net" in aliases  # a virtio network device (ID 1)
    assert any(a.startswith("alias pci:v00008086d0000100E") and a.endswith(" e1000") for a in aliases)

    script = (out / "netboot.ipxe").read_text()
    assert f"kernel bzImage initrd=initrd {' '.join(cmdline)} netboot.image_url=${{netboot-base}}/image " in script
    assert "BOOTIF=01-${netX/mac:hexhyp}" in script


def test_fetch_needs_an_image_format(system: Path, tmp_path: Path) -> None:
    proc = netboot("build", system, "--out", tmp_path / "out", "--format", "direct", "--fetch")
    assert proc.returncode == 2, proc.stderr
    assert "--fetch downloads an image at boot: it needs --format squashfs or erofs, not direct" in proc.stderr
    assert not (tmp_path / "out").exists()
