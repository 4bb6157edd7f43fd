"""`netboot build --fetch` booted through QEMU's iPXE over HTTP: a system too large for one initrd (squashfs); and
(erofs) what stage 1 does with a changed image, a server that dies mid-download, and a mirror.

Each format boots once: what the image's size changes (a file over 2 GiB served, ranged and checked, a tmpfs of
its size) does not depend on the file system inside it, and a 2.5 GB boot costs about 150 s of emulated CPU
(its download and its sha256), so the large system boots in squashfs and the erofs image is the mirror test's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import pytest
from support import (
    MARKER,
    Nginx,
    ServerProcess,
    assert_booted,
    build_system,
    built,
    memoized,
    netboot,
    netboot_ok,
    netboot_vm,
)

BIG_BYTES = 2_500_000_000  # of random data: incompressible, so the image is as large
BIG = "52:54:00:00:0f:01"
MIRRORED = "52:54:00:00:0f:03"
# Random data does not compress: compressing 2.5 GB of it would cost minutes of CPU for nothing. The one-initrd
# build reuses the squashfs --fetch build's image (the build cache), or the other way round.
UNCOMPRESSED = ("--compress", "none")


def big_system() -> Path:
    """The test system with BIG_BYTES of random data in a store path of its own (built once per session)."""
    made = memoized("big-system", lambda path: (path / "path").write_text(str(build_system(
        path / "result", "--arg", "randomBytes", str(BIG_BYTES), "--argstr", "name", "netboot-big"))))
    return Path((made / "path").read_text())


def memory_for(out: Path) -> int:
    """MiB for a VM that downloads this build's image: the image (in a tmpfs) and room for the kernel, stage 1
    and the system's init."""
    return (out / "image").stat().st_size // 2**20 + 400


@pytest.mark.slow  # about 150 s of one VM (its download and sha256 of 2.5 GB): started first (conftest.py)
def test_a_system_too_large_for_one_initrd_boots_by_fetch(tmp_path: Path) -> None:
    system = big_system()
    closure = (system / "closure-paths").read_text().split()
    # As one initrd, iPXE cannot boot it: the build says so, and how to build it instead.
    one = netboot("build", system, "--format", "squashfs", *UNCOMPRESSED, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert re.search(r"warning: the initrd is 2\.\d\d GiB; .* iPXE cannot boot one above about 2 GiB .*"
                     r"build with --fetch", one.stderr), one.stderr
    os.unlink(tmp_path / "one" / "initrd")

    out = built(system, "--format", "squashfs", *UNCOMPRESSED, "--fetch")
    size = (out / "image").stat().st_size
    assert size >= BIG_BYTES and (out / "initrd").stat().st_size < 16 << 20
    machines = tmp_path / "machines.toml"
    machines.write_text(f'[profiles.big]\ndir = "{out}"\n\n[machines."{BIG}"]\nprofile = "big"\n')
    server = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        result = netboot_vm(f"http://10.0.2.2:{server.http_port}/boot.ipxe", BIG, timeout=3600,
                            memory=memory_for(out))
    finally:
        server.stop()
    assert_booted(result, closure, system)
    assert f"netboot stage 1: fetching http://10.0.2.2:{server.http_port}/machine/" in result.console
    assert re.search(rf"netboot stage 1: fetched {size} bytes in [\d.]+ s \([\d.]+ MB/s\), sha256 checked",
                     result.console), result.console[-3000:]
    assert "NETBOOT-TEST: store mount: overlay /nix/store overlay" in result.console
    assert re.search(rf"mac={BIG} profile=big http /machine/\S+/image 200 ", server.log), server.log


class Console:
    """The console as QEMU prints it (qemu.watch's `echo`), acting once on what it shows: `when[text]` runs
    (in a thread of its own, so that the console is read on) the first time `text` appears."""

    def __init__(self, when: dict[str, threading.Timer]) -> None:
        self.text = ""
        self.when = dict(when)

    def write(self, chunk: str) -> None:
        self.text += chunk
        for text in [t for t in self.when if t in self.text]:
            self.when.pop(text).start()

    def flush(self) -> None:
        pass


def test_stage1_refuses_a_changed_image_retries_a_dying_mirror_and_fetches_from_the_mirror(
        system: Path, closure: list[str], tmp_path: Path) -> None:
    """A machine on a base_url mirror, booting an erofs image it downloads in two ranged requests at once: its
    first download has a changed byte (refused with the mismatch message), the mirror dies in the middle of its
    second, and the third boots. Kernel, initrd and image come from the mirror; netboot serves the script and
    the machine's overlay alone."""
    out = built(system, "--format", "erofs", "--fetch")
    mirror = tmp_path / "mirror"
    netboot_ok("publish", out, mirror)
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    image = mirror / digest / "image"
    good = image.read_bytes()
    changed = bytearray(good)
    changed[len(good) // 2] ^= 1
    image.chmod(0o644)
    image.write_bytes(changed)

    (tmp_path / "nginx").mkdir()
    # 2 MB/s: a download lasts seconds, so the mirror can die in the middle of one.
    nginx = Nginx(mirror, tmp_path / "nginx", limit_rate=2 << 20)

    def die_and_restart() -> None:
        nginx.kill()
        nginx.start()

    console = Console({
        "does not match its sha256": threading.Timer(0, lambda: image.write_bytes(good)),
        "attempt 2 of": threading.Timer(1.5, die_and_restart),
    })
    (tmp_path / "overlay/etc").mkdir(parents=True)
    (tmp_path / "overlay/etc/hostname.j2").write_text("{{ hostname }}\n")
    machines = tmp_path / "machines.toml"
    machines.write_text(f'[profiles.rack]\ndir = "{out}"\nbase_url = "http://10.0.2.2:{nginx.port}/"\n'
                        'append = "netboot.fetch_streams=2"\noverlay = "overlay"\n\n'
                        f'[machines."{MIRRORED}"]\nprofile = "rack"\nhostname = "mirrored"\n')
    server = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        result = netboot_vm(f"http://10.0.2.2:{server.http_port}/boot.ipxe", MIRRORED, echo=console)
    finally:
        server.stop()
        nginx.stop()
    assert_booted(result, closure, system)
    url = f"http://10.0.2.2:{nginx.port}/{digest}/image"
    lines = [ln for ln in result.lines if ln.startswith("netboot stage 1: ")]
    said = "\n".join(lines)
    sums = (hashlib.sha256(changed).hexdigest(), hashlib.sha256(good).hexdigest())
    assert (f"netboot stage 1: the image from {url} does not match its sha256: it is {sums[0]}, the kernel "
            f"command line says {sums[1]}") in lines, said
    cut = [ln for ln in lines if ln == f"netboot stage 1: cannot download {url}"
           or ln.startswith(f"netboot stage 1: the image from {url} has ")]
    assert cut, said  # the second attempt, cut short
    assert f"netboot stage 1: fetching {url} ({len(good)} bytes, 2 streams) into memory, attempt 3 of 5" in lines
    assert "netboot stage 1: trying again in 2 s" in lines  # the backoff doubles
    assert any(ln.startswith(f"netboot stage 1: fetched {len(good)} bytes in ") for ln in lines), said
    assert console.text.index("attempt 3 of") < console.text.index(MARKER)  # neither image before was booted
    assert "NETBOOT-TEST: hostname: mirrored" in result.lines  # the overlay, from netboot

    # Kernel and initrd came from the mirror whole, the image in two ranges, twice (the changed one, then the
    # good one; the ranges cut short died with their server, unlogged); netboot sent the script and the overlay.
    access = nginx.log.read_text()
    sizes = json.loads((out / "manifest.json").read_text())["artifacts"]
    for name in ("bzImage", "initrd"):
        assert re.search(rf'"GET /{digest}/{name} HTTP/1.1" 200 {sizes[name]["size"]} ', access), access
    ranges = [int(n) for n in re.findall(rf'"GET /{digest}/image HTTP/1.1" 206 (\d+) ', access)]
    assert len(ranges) == 4 and sum(ranges) == 2 * (len(good) - 1), access  # stage 1 holds the first byte
    served = [ln for ln in server.log.splitlines() if f"mac={MIRRORED}" in ln]
    paths = [re.search(r" http (\S+) ", ln).group(1).rsplit("/", 1)[-1] for ln in served]  # type: ignore[union-attr]
    assert paths == ["boot.ipxe", "overlay"], served
