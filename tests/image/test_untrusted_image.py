"""An untrusted OCI image built as root: what another local user can reach during and after the build, what the
image may cost, which of this machine's files it can make netboot read, and what a killed build leaves."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from initrd_reader import items, split
from ocimake import Entry, compress, device, directory, fifo, file, layer_tar, oci_archive, symlink
from support import NOBODY, ROOT, need, netboot, netboot_ok, nobody_python
from test_rootfs import INIT, modules_of


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory every local user may look into, as an --out's parent often is (pytest's own is root's only)."""
    if os.getuid() != 0:
        pytest.fail("these tests build images with device nodes and setuid files, as root, and try them as nobody")
    path = Path("/tmp") / f"netboot-untrusted-{os.getpid()}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=True)


def root_layer() -> list[Entry]:
    """A bootable root: static busybox, an init."""
    return [*(directory(d) for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "tmp")),
            file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755), symlink("bin/sh", "busybox"),
            file("etc/init.sh", INIT, 0o755), symlink("sbin/init", "/etc/init.sh")]


# What another user must never reach: a device node anyone may open, a setuid-root program.
HOSTILE = [directory("dev"), device("dev/exposed", 1, 3, 0o666), directory("usr/bin"),
           file("usr/bin/rootshell", b"#!/bin/sh\nexec /bin/sh\n", 0o4755), file("usr/bin/groupshell", b"", 0o2755)]


@pytest.fixture
def python_of_nobody() -> Iterator[tuple[list[str], dict[str, str]]]:
    """This project's Python, as nobody runs it (support.nobody_python), in a directory of its own."""
    path = Path("/tmp") / f"netboot-nobody-{os.getpid()}"
    try:
        yield nobody_python(path)
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=True)


def as_nobody(python: tuple[list[str], dict[str, str]], paths: list[Path]) -> dict[str, str]:
    """What `nobody` gets trying to list, stat and open each path: "ok" or the error's name."""
    script = (
        "import json, os, sys\n"
        "seen = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        if os.path.isdir(p) and not os.path.islink(p):\n"
        "            os.listdir(p)\n"
        "        else:\n"
        "            os.stat(p)\n"
        "            os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))\n"
        "        seen[p] = 'ok'\n"
        "    except OSError as e:\n"
        "        seen[p] = type(e).__name__\n"
        "print(json.dumps(seen))\n"
    )
    argv, env = python
    done = subprocess.run([*argv, "-c", script, *map(str, paths)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def paused_build(tmp_path: Path, archive: Path, out: Path, system: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`netboot build --oci` stopped where the image is unpacked in full: mksquashfs, wrapped to wait for the
    test, is about to read it. Returns the build, its staging directory, and the FIFO that lets it go on."""
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    paused, go = tmp_path / "paused", tmp_path / "go"
    os.mkfifo(go)
    real = need("mksquashfs")
    wrapper = wrapper_dir / "mksquashfs"
    wrapper.write_text(f'#!/bin/sh\ntouch {paused}\nread line < {go}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{wrapper_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "netboot", "build", "--oci", str(archive), "--kernel", str(system / "kernel"),
         "--modules", str(modules_of(system)), "--format", "squashfs", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        while not paused.exists():
            assert proc.poll() is None, f"the build ended before it was unpacked:\n{proc.communicate()[1]}"
            time.sleep(0.05)
        (staging,) = out.parent.glob(f".{out.name}.netboot-*")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, staging, go


@pytest.mark.parametrize("end", ["published", "killed"])
def test_nothing_an_image_brings_is_reachable_by_another_user(system: Path, tmp_path: Path, shared: Path,
                                                             python_of_nobody: tuple[list[str], dict[str, str]],
                                                             end: str) -> None:
    archive = oci_archive(tmp_path / "image.tar", [root_layer(), HOSTILE])
    out = shared / "out"
    proc, staging, go = paused_build(tmp_path, archive, out, system)
    try:
        unpacked = staging / ".scratch" / "oci-root"
        node, setuid, setgid = unpacked / "dev/exposed", unpacked / "usr/bin/rootshell", unpacked / "usr/bin/groupshell"
        # The build is stopped with the image unpacked, as root: the node and the setuid file are there.
        assert stat.S_ISCHR(node.lstat().st_mode) and stat.S_IMODE(node.lstat().st_mode) == 0o666
        assert setuid.lstat().st_mode & stat.S_ISUID and setuid.lstat().st_uid == 0
        assert setgid.lstat().st_mode & stat.S_ISGID
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700
        tried = [staging, unpacked, node, setuid, setgid]
        assert as_nobody(python_of_nobody, tried) == {str(p): "PermissionError" for p in tried}
        if end == "killed":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            assert staging.exists()  # what kill -9 leaves is still out of reach
            assert as_nobody(python_of_nobody, tried) == {str(p): "PermissionError" for p in tried}
            netboot_ok("build", "--oci", archive, "--kernel", system / "kernel", "--modules", modules_of(system),
                       "--format", "squashfs", "--out", out)
        else:
            with open(go, "w") as f:
                f.write("go\n")
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Published: the artifacts alone, readable by all; the unpacked tree is gone, and so is the leftover.
    assert sorted(p.name for p in shared.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["bzImage", "cmdline", "initrd", "manifest.json", "netboot.ipxe"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert set(as_nobody(python_of_nobody, [out, out / "initrd"]).values()) == {"ok"}


def cli_refusal(system: Path, tmp_path: Path, layers: list, *flags: str) -> str:
    """The one line `netboot build --oci` refuses the image with; exit 2, no output, nothing left behind."""
    archive = oci_archive(tmp_path / "image.tar", layers)
    out = tmp_path / "out"
    done = netboot("build", "-q", "--oci", archive, "--kernel", system / "kernel", "--format", "direct",
                   "--out", out, *flags, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".out.netboot-*"))
    return lines[0]


def test_image_over_the_byte_limit(system: Path, tmp_path: Path) -> None:
    bomb = compress(layer_tar([file("zeros", bytes(256 << 20))]), "zstd")  # 256 MiB in a few kilobytes
    line = cli_refusal(system, tmp_path, [root_layer(), bomb], "--max-image-bytes", "8M")
    assert line.endswith("entry zeros: the image is larger than 8 MiB (--max-image-bytes)"), line


def test_image_over_the_entry_limit(system: Path, tmp_path: Path) -> None:
    line = cli_refusal(system, tmp_path, [root_layer(), [file(f"f{i}") for i in range(100)]],
                       "--max-image-entries", "50")
    assert line.endswith("the image has more than 50 entries (--max-image-entries)"), line


def test_image_thousands_of_directories_deep(system: Path, tmp_path: Path) -> None:
    line = cli_refusal(system, tmp_path, [root_layer(), [file("d/" * 2000 + "f")]])  # 4,001 bytes: a valid path
    assert line.endswith("it is 2,001 directories deep, more than 256"), line


def test_image_with_a_name_over_path_max(system: Path, tmp_path: Path) -> None:
    line = cli_refusal(system, tmp_path, [root_layer(), [file("/".join(["n" * 200] * 25))]])
    assert line.endswith("its name is 5,024 bytes long, more than 4,096"), line
    assert len(line) < 500


def test_limit_flags_checked(system: Path, tmp_path: Path) -> None:
    for flags, expected in ((["--max-image-bytes", "0"], "--max-image-bytes 0 must be positive"),
                            (["--max-image-bytes", "lots"], "invalid size 'lots'"),
                            (["--max-image-entries", "many"], "invalid count 'many'")):
        done = netboot("build", "--oci", tmp_path / "x.tar", "--kernel", system / "kernel", "--out", tmp_path / "o",
                       *flags)
        assert done.returncode == 2 and expected in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_leftover_of_a_killed_build_does_not_break_the_next(system: Path, tmp_path: Path) -> None:
    """A build killed while its staging held a tree deeper than the recursion limit: the next build removes it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".out.netboot-{dead.pid}-abcd1234"
    leftover.mkdir(mode=0o700)
    try:
        fd = os.open(leftover, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(sys.getrecursionlimit() + 500):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        # Another user's directory of that name is not netboot's to remove.
        strangers = tmp_path / f".out.netboot-{dead.pid}-stranger"
        strangers.mkdir()
        os.chown(strangers, NOBODY, NOBODY)
        archive = oci_archive(tmp_path / "image.tar", [root_layer()])
        netboot_ok("build", "--oci", archive, "--kernel", system / "kernel", "--format", "direct",
                   "--out", tmp_path / "out")
        assert sorted(p.name for p in tmp_path.glob(".out.netboot-*")) == [strangers.name]
    finally:
        # Left behind, the tree would break pytest's own clean-up of old temporary directories (shutil.rmtree).
        subprocess.run(["rm", "-rf", str(leftover)], check=True)


def module_build(system: Path, tmp_path: Path, entries: list[Entry], dep: str) -> subprocess.CompletedProcess:
    """`netboot build --oci` (squashfs, whose stage 1 loads loop, squashfs and overlay) of a root with `entries`
    and, as its own lib/modules/<version>/modules.dep, `dep`."""
    base = f"lib/modules/{modules_of(system).name}"
    archive = oci_archive(tmp_path / "image.tar", [[*root_layer(), file(f"{base}/modules.dep", dep.encode()),
                                                    *entries]])
    return netboot("build", "-q", "--oci", archive, "--kernel", system / "kernel", "--format", "squashfs",
                   "--out", tmp_path / "out", timeout=600)


def test_the_roots_own_modules_are_looked_up_inside_it(system: Path, tmp_path: Path) -> None:
    """A symlink out of the image's module tree, or an absolute name in its modules.dep, leads to the image's own
    file of that name, never to this machine's: the initrd is world-readable."""
    host = tmp_path / "host"
    host.mkdir()
    for name in ("loop.ko", "squashfs.ko"):
        (host / name).write_bytes(b"HOST-SECRET of this machine")
    base = f"lib/modules/{modules_of(system).name}"
    done = module_build(system, tmp_path, [
        symlink(f"{base}/kernel/loop.ko", str(host / "loop.ko")),
        file(f"{base}/kernel/overlay.ko", b"\x7fELF overlay of the image"),
        file(str(host / "loop.ko").lstrip("/"), b"\x7fELF loop of the image"),
        file(str(host / "squashfs.ko").lstrip("/"), b"\x7fELF squashfs of the image"),
    ], f"kernel/loop.ko:\n{host / 'squashfs.ko'}:\nkernel/overlay.ko:\n")
    assert done.returncode == 0, done.stderr
    _, stage1 = split((tmp_path / "out" / "initrd").read_bytes())
    modules = {e.name.rsplit("/", 1)[-1]: e.data for e in items(stage1) if e.name.endswith(".ko")}
    assert modules == {"loop.ko": b"\x7fELF loop of the image", "squashfs.ko": b"\x7fELF squashfs of the image",
                       "overlay.ko": b"\x7fELF overlay of the image"}


def test_a_fifo_among_the_roots_modules_is_refused(system: Path, tmp_path: Path) -> None:
    """Read, a FIFO would hang the build until someone writes to it."""
    base = f"lib/modules/{modules_of(system).name}"
    done = module_build(system, tmp_path, [fifo(f"{base}/kernel/loop.ko")],
                        "kernel/loop.ko:\nkernel/squashfs.ko:\nkernel/overlay.ko:\n")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"/{base}/kernel/loop.ko in the root filesystem " in done.stderr
    assert done.stderr.strip().endswith("is not a regular file")


def test_a_module_that_unpacks_without_end_is_refused(system: Path, tmp_path: Path) -> None:
    base = f"lib/modules/{modules_of(system).name}"
    bomb = compress(bytes(300 << 20), "zstd")  # 300 MiB of zeros in a few kilobytes
    done = module_build(system, tmp_path, [file(f"{base}/kernel/loop.ko.zst", bomb)],
                        "kernel/loop.ko.zst:\nkernel/squashfs.ko:\nkernel/overlay.ko:\n")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.strip().endswith("loop.ko.zst unpacks to more than 256 MiB"), done.stderr
