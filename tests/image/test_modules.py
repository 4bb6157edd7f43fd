"""Module resolution from modules.dep / modules.builtin, checked against kmod's modprobe on a real kernel."""

from __future__ import annotations

import logging
import lzma
import subprocess
from pathlib import Path

import pytest
from support import need

from netboot.core.errors import NetbootError
from netboot.image.elf import read_header
from netboot.image.modules import ModuleTree, module_name
from netboot.image.stage1 import find_busybox


def installed_kernel() -> str:
    versions = sorted(p.parent.name for p in Path("/lib/modules").glob("*/modules.dep"))
    if not versions:
        pytest.fail("no kernel modules installed under /lib/modules (make test installs linux-image-amd64)")
    return versions[-1]


@pytest.mark.parametrize("module", ["tcm_loop", "overlay", "loop", "squashfs", "erofs", "btrfs", "nft_chain_nat",
                                    "vhost_net"])
def test_load_order_matches_modprobe(module: str) -> None:
    need("modprobe")
    version = installed_kernel()
    tree = ModuleTree.load(Path("/"), version)
    resolved = tree.resolve([module], "the test")
    ours = [f"/lib/modules/{version}/{p}" for p, _ in resolved]
    shown = subprocess.run(
        ["modprobe", "-S", version, "--show-depends", module], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    theirs = list(dict.fromkeys(line.split()[1] for line in shown if line.startswith("insmod ")))
    # The same modules in the same order, soft dependencies (modules.softdep, through modules.alias) included.
    assert ours == theirs
    assert ours[-1].endswith((f"/{module}.ko", f"/{module.replace('_', '-')}.ko"))
    # Exactly the soft dependencies are optional: what the module and its dependencies need is not.
    hard = {tree.deps[module][0], *tree.deps[module][1]}
    assert {p for p, optional in resolved if not optional} == hard


def fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "lib/modules/6.9.0"
    (root / "kernel/fs").mkdir(parents=True)
    (root / "modules.dep").write_text(
        "kernel/fs/a.ko.xz: kernel/fs/b-c.ko kernel/fs/d.ko\n"
        "kernel/fs/b-c.ko: kernel/fs/d.ko\n"
        "kernel/fs/d.ko:\n"
        "kernel/fs/z.ko.zst:\n"
    )
    (root / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    (root / "kernel/fs/a.ko.xz").write_bytes(lzma.compress(b"\x7fELF-a", check=lzma.CHECK_CRC32))
    (root / "kernel/fs/z.ko.zst").write_bytes(
        subprocess.run(["zstd", "-c"], input=b"\x7fELF-z", capture_output=True, check=True).stdout
    )
    return tmp_path


def test_dependencies_first_builtins_skipped(tmp_path: Path) -> None:
    tree = ModuleTree.load(fake_tree(tmp_path), "6.9.0")
    order = tree.resolve(["overlay", "a", "b_c", "d"], "x")
    assert order == [("kernel/fs/d.ko", False), ("kernel/fs/b-c.ko", False), ("kernel/fs/a.ko.xz", False)]
    assert tree.resolve(["overlay"], "x") == []


def test_soft_dependencies_come_first_and_optional(tmp_path: Path) -> None:
    root = fake_tree(tmp_path) / "lib/modules/6.9.0"
    (root / "modules.softdep").write_text("# comment\nsoftdep d pre: fast-z post: a\n")
    (root / "modules.alias").write_text("alias fast-z z\nalias fast-z missing_module\n")
    tree = ModuleTree.load(tmp_path, "6.9.0")
    # z (the alias's module that exists) before d; a, both d's post soft dependency and wanted, is not optional.
    assert tree.resolve(["a"], "x") == [("kernel/fs/z.ko.zst", True), ("kernel/fs/d.ko", False),
                                        ("kernel/fs/b-c.ko", False), ("kernel/fs/a.ko.xz", False)]
    # Wanted itself, a soft dependency is loaded as required.
    assert tree.resolve(["z", "d"], "x") == [("kernel/fs/z.ko.zst", False), ("kernel/fs/d.ko", False)]


def test_soft_dependency_the_kernel_lacks_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = fake_tree(tmp_path) / "lib/modules/6.9.0"
    (root / "modules.softdep").write_text("softdep d pre: fast-z gone\nsoftdep b-c pre: builtin-alias\n")
    (root / "modules.alias").write_text("alias fast-z z\n")
    # A soft dependency built into the kernel, named by an alias only modules.builtin.modinfo knows.
    (root / "modules.builtin.modinfo").write_bytes(b"overlay.alias=builtin-alias\0overlay.license=GPL\0")
    tree = ModuleTree.load(tmp_path, "6.9.0")
    with caplog.at_level(logging.WARNING, logger="netboot.image.modules"):
        order = tree.resolve(["a"], "the erofs format")
    assert [p for p, _ in order] == ["kernel/fs/z.ko.zst", "kernel/fs/d.ko", "kernel/fs/b-c.ko", "kernel/fs/a.ko.xz"]
    assert [r.getMessage() for r in caplog.records] == [
        "warning: module d needs gone loaded first (a soft dependency), which kernel 6.9.0 has neither as a module "
        "nor built in: the erofs format may not boot"]


def test_missing_module_is_named(tmp_path: Path) -> None:
    tree = ModuleTree.load(fake_tree(tmp_path), "6.9.0")
    with pytest.raises(NetbootError, match=r"kernel 6\.9\.0 has no module 'squashfs'.*\(needed by the squashfs fo"):
        tree.resolve(["squashfs"], "the squashfs format")


def test_compressed_modules_are_unpacked(tmp_path: Path) -> None:
    tree = ModuleTree.load(fake_tree(tmp_path), "6.9.0")
    assert tree.read_uncompressed("kernel/fs/a.ko.xz") == b"\x7fELF-a"
    assert tree.read_uncompressed("kernel/fs/z.ko.zst") == b"\x7fELF-z"


def test_version_choice(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    other = tmp_path / "lib/modules/6.8.0"
    other.mkdir()
    (other / "modules.dep").write_text("")
    assert ModuleTree.load(tmp_path, "6.9.0").version == "6.9.0"
    with pytest.raises(NetbootError, match=r"holds modules for 6\.8\.0, 6\.9\.0 but the kernel is 7\.0"):
        ModuleTree.load(tmp_path, "7.0")
    with pytest.raises(NetbootError, match=r"has no lib/modules/<version>/modules\.dep"):
        ModuleTree.load(tmp_path / "nothing", "6.9.0")


def test_module_names() -> None:
    assert module_name("kernel/fs/overlayfs/overlay.ko.xz") == "overlay"
    assert module_name("kernel/drivers/net/virtio-net.ko") == "virtio_net"


def test_static_busybox_detection(tmp_path: Path) -> None:
    busybox = read_header(Path("/bin/busybox"))  # Debian's busybox-static
    assert busybox is not None and (busybox.arch, busybox.bits, busybox.dynamic) == ("x86_64", 64, False)
    ls = read_header(Path("/bin/ls"))
    assert ls is not None and ls.dynamic
    assert read_header(Path(__file__)) is None


def test_closure_busybox_preferred(system: Path) -> None:
    from netboot.image.closure import Closure

    closure = Closure.of(system, None)
    chosen = find_busybox([p / "bin" / "busybox" for p in closure.paths], "x86_64")
    assert str(chosen).startswith("/nix/store/") and chosen.name == "busybox"
