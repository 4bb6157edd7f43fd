"""Every bad input: a one-line error naming the problem, exit status 2, and the output directory untouched.

The command runs in the test's process (support.cli); a few run it as its own process, for the exit status and
the entry point as a user meets them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fakestore import closure_info, make_system, store_path
from support import cli, need, netboot, netboot_ok, nobody_python


def snapshot(d: Path) -> dict[str, bytes] | None:
    if not d.exists():
        return None
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory from an earlier successful build, which no failed build may touch (each test checks
    it is as it was)."""
    base = tmp_path_factory.mktemp("previous")
    top = make_system(base / "prev-store")
    out = base / "out"
    netboot_ok("build", top, "--out", out, "--format", "direct", "--closure-info", closure_info(base, [top]))
    return out


def expect_error(
    out: Path, args: list, fragment: str, env: dict[str, str] | None = None, run: Callable | None = None
) -> None:
    before = snapshot(out)
    proc = (run or cli)(*args, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert "error" in lines[0] and fragment in lines[0], lines[0]
    assert snapshot(out) == before
    if out.parent.is_dir():
        leftovers = [p.name for p in out.parent.iterdir() if ".netboot-" in p.name]
        assert leftovers == []


def test_system_missing(tmp_path: Path, previous: Path) -> None:
    expect_error(previous, ["build", tmp_path / "nope", "--out", previous], "does not exist", run=netboot)


def test_system_not_a_directory(tmp_path: Path, previous: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(previous, ["build", f, "--out", previous], "is not a directory")


def test_system_without_kernel(tmp_path: Path, previous: Path) -> None:
    top = make_system(tmp_path / "store")
    (top / "kernel").unlink()
    expect_error(previous, ["build", top, "--out", previous], "has no kernel")


def test_a_directory_that_is_no_system_names_how_to_build_one(previous: Path) -> None:
    proc = cli("build", "/etc", "--out", previous)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    error = proc.stderr.strip()
    assert "system /etc is not a system: it has no kernel" in error, error
    assert "nixos-rebuild build" in error and "-A config.system.build.toplevel" in error, error
    assert "--rootfs DIR" in error and "--oci IMAGE.tar" in error and "--kernel" in error, error
    # The flags it names are the build's own.
    help_text = cli("build", "--help").stdout
    assert all(flag in help_text for flag in ("--rootfs DIR", "--oci IMAGE.tar", "--kernel KERNEL")), help_text


def test_system_without_init(tmp_path: Path, previous: Path) -> None:
    top = make_system(tmp_path / "store", init=False)
    expect_error(previous, ["build", top, "--out", previous], "has no init")


def test_not_a_store_path_without_closure_info(tmp_path: Path, previous: Path) -> None:
    top = tmp_path / "plain"
    shutil.copytree(make_system(tmp_path / "store"), top)
    expect_error(previous, ["build", top, "--out", previous], "pass --closure-info")


def tool_path(tmp_path: Path, *tools: str) -> dict[str, str]:
    """An environment whose PATH holds only the given tools."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for t in tools:
        (bindir / t).symlink_to(need(t))
    return {**os.environ, "PATH": str(bindir)}


def test_nix_store_needed_but_absent(system: Path, tmp_path: Path, previous: Path) -> None:
    env = tool_path(tmp_path, "zstd", "mksquashfs")
    expect_error(previous, ["build", system, "--out", previous], "nix-store not found", env=env)


def test_mksquashfs_missing(system: Path, tmp_path: Path, previous: Path) -> None:
    env = tool_path(tmp_path, "zstd", "nix-store")
    expect_error(previous, ["build", system, "--out", previous], "mksquashfs not found", env=env)


def test_compressor_missing(system: Path, tmp_path: Path, previous: Path) -> None:
    env = tool_path(tmp_path, "nix-store", "mksquashfs")
    args = ["build", system, "--out", previous, "--format", "direct", "--compress", "lz4"]
    expect_error(previous, args, "lz4 not found", env=env)


def test_missing_store_path(tmp_path: Path, previous: Path) -> None:
    store = tmp_path / "store"
    top = make_system(store)
    gone = store_path(store, "gone")
    info = closure_info(tmp_path, [top, gone])
    expect_error(previous, ["build", top, "--out", previous, "--closure-info", info], f"store path {gone} is missing")


@pytest.mark.root
def test_unreadable_store_path(tmp_path: Path) -> None:
    """Run as an unprivileged user (root reads everything) on a store path it may not read."""
    base = Path("/tmp") / f"netboot-unreadable-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        store = base / "store"
        top = make_system(store)
        secret = store_path(store, "secret")
        secret.mkdir()
        (secret / "key").write_text("x")
        secret.chmod(0o700)
        for p in (base, store, top):
            p.chmod(0o755)
        info = closure_info(base, [top, secret])
        info.chmod(0o755)
        outs = base / "outs"
        outs.mkdir(mode=0o777)
        outs.chmod(0o777)
        out = outs / "out"

        python, python_env = nobody_python(base / "python")

        def as_nobody(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([*python, "-m", "netboot", *map(str, args)], capture_output=True, text=True,
                                  cwd="/", env=python_env)

        args = ["build", top, "--out", out, "--format", "direct", "--closure-info", info, "--no-cache"]
        expect_error(out, args, f"cannot read {secret}: Permission denied", run=as_nobody)
    finally:
        shutil.rmtree(base)


def test_unknown_compression(system: Path, previous: Path) -> None:
    args = ["build", system, "--out", previous, "--compress", "bzip9"]
    expect_error(previous, args, "invalid choice: 'bzip9'", run=netboot)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--level", "20"], "--level 20 is out of range for zstd (1-19)"),
        (["--compress", "gzip", "--level", "0"], "--level 0 is out of range for gzip (1-9)"),
        (["--compress", "xz", "--level", "10"], "out of range for xz (0-9)"),
        (["--compress", "lz4", "--level", "13"], "out of range for lz4 (1-12)"),
        (["--compress", "none", "--level", "3"], "--level does not apply to --compress none"),
        (["--compress", "xz", "--level", "6"], "mksquashfs's xz compressor has no levels"),
        (["--level", "high"], "invalid level 'high'"),
    ],
)
def test_bad_level(system: Path, previous: Path, args: list[str], fragment: str) -> None:
    expect_error(previous, ["build", system, "--out", previous, *args], fragment)


def test_out_parent_is_a_file(system: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(f / "out", ["build", system, "--out", f / "out"], f"{f} is not a directory")
    expect_error(f / "a" / "out", ["build", system, "--out", f / "a" / "out"], f"{f} is not a directory")


def test_out_parents_are_created_and_a_failed_build_leaves_none(tmp_path: Path) -> None:
    top = make_system(tmp_path / "store")
    info = closure_info(tmp_path, [top])
    out = tmp_path / "out" / "rack" / "a"
    netboot_ok("build", top, "--out", out, "--format", "direct", "--closure-info", info)
    assert (out / "manifest.json").is_file() and (out / "initrd").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "rack").iterdir()) == ["a"]
    # A build that fails while packing removes the directories it created for --out, and only those.
    gone = store_path(tmp_path / "store", "gone")
    broken = closure_info(tmp_path, [top, gone])
    failed = tmp_path / "out" / "new" / "deeper" / "b"
    expect_error(failed, ["build", top, "--out", failed, "--format", "direct", "--closure-info", broken],
                 f"store path {gone} is missing")
    assert not (tmp_path / "out" / "new").exists() and out.is_dir()


def test_out_is_a_file(system: Path, tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("precious")
    expect_error(f, ["build", system, "--out", f], "exists and is not a directory")
    assert f.read_text() == "precious"


def test_out_is_someone_elses_directory(system: Path, tmp_path: Path) -> None:
    d = tmp_path / "home"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    expect_error(d, ["build", system, "--out", d], "did not make (no manifest.json)")


def test_out_not_writable(system: Path) -> None:
    # /proc refuses new directories even to root.
    expect_error(Path("/proc/netboot-out"), ["build", system, "--out", "/proc/netboot-out"], "is not writable")


def test_file_of_4_gib_is_refused(tmp_path: Path, previous: Path) -> None:
    store = tmp_path / "store"
    top = make_system(store)
    big = store_path(store, "big")
    big.mkdir()
    with open(big / "huge.img", "wb") as f:
        f.truncate(4 << 30)  # sparse: exactly 4 GiB, one byte more than newc can describe
    info = closure_info(tmp_path, [top, big])
    args = ["build", top, "--out", previous, "--format", "direct", "--closure-info", info]
    expect_error(previous, args, f"{big}/huge.img is 4.0 GiB; an initrd (newc cpio) cannot hold a file of 4 GiB")


def test_closure_info_without_the_system(tmp_path: Path, previous: Path) -> None:
    store = tmp_path / "store"
    top = make_system(store)
    other = store_path(store, "other")
    other.mkdir()
    info = closure_info(tmp_path, [other])
    expect_error(previous, ["build", top, "--out", previous, "--closure-info", info], "does not contain the system")


def test_closure_info_incomplete(tmp_path: Path, previous: Path) -> None:
    top = make_system(tmp_path / "store")
    info = closure_info(tmp_path, [top])
    (info / "registration").unlink()
    args = ["build", top, "--out", previous, "--closure-info", info]
    expect_error(previous, args, "cannot read registration: No such file or directory")


def test_bad_source_date_epoch(system: Path, previous: Path) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "yesterday"}
    expect_error(previous, ["build", system, "--out", previous], "SOURCE_DATE_EPOCH='yesterday'", env=env)


def test_multiline_append(system: Path, previous: Path) -> None:
    expect_error(previous, ["build", system, "--out", previous, "--append", "a\nb"], "--append must be a single line")


def test_kernel_lacking_a_needed_module(tmp_path: Path, previous: Path) -> None:
    store = tmp_path / "store"
    top = make_system(store)
    mods = store_path(store, "modules") / "lib/modules/6.1.0-test"
    (mods / "kernel/fs/squashfs").mkdir(parents=True)
    (mods / "kernel/drivers/block").mkdir(parents=True)
    (mods / "kernel/fs/squashfs/squashfs.ko").write_bytes(b"\x7fELF")
    (mods / "kernel/drivers/block/loop.ko").write_bytes(b"\x7fELF")
    (mods / "modules.dep").write_text("kernel/fs/squashfs/squashfs.ko:\nkernel/drivers/block/loop.ko:\n")
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (top / "kernel-modules").symlink_to(mods.parent.parent.parent)
    info = closure_info(tmp_path, [top, mods.parent.parent.parent])
    args = ["build", top, "--out", previous, "--closure-info", info]
    expect_error(previous, args, "kernel 6.1.0-test has no module 'overlay', built in or loadable")
