"""The build cache: one member per store path, reused across builds, byte-identical to a cold build."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, build_system, cli, netboot_ok


def reused(stderr: str) -> int:
    m = re.search(r"; (\d+) reused from the cache", stderr)
    assert m, stderr
    return int(m.group(1))


@pytest.mark.parametrize("fmt", ["direct", "squashfs"])
def test_warm_build_is_identical_to_cold_and_uncached(
    system: Path, closure: list[str], tmp_path: Path, fmt: str
) -> None:
    cache = tmp_path / "cache"
    args = ["--format", fmt, "--cache-dir", cache]
    cold = netboot_ok("build", system, "--out", tmp_path / "cold", *args)
    assert reused(cold.stderr) == 0
    warm = netboot_ok("build", system, "--out", tmp_path / "warm", *args)
    assert reused(warm.stderr) == len(closure)
    netboot_ok("build", system, "--out", tmp_path / "none", "--format", fmt, "--no-cache")
    for name in ("initrd", "manifest.json"):
        assert (tmp_path / "cold" / name).read_bytes() == (tmp_path / "warm" / name).read_bytes()
        assert (tmp_path / "cold" / name).read_bytes() == (tmp_path / "none" / name).read_bytes()


def test_one_changed_path_is_the_only_one_packed(system: Path, closure: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    netboot_ok("build", system, "--out", tmp_path / "a", "--format", "direct", "--cache-dir", cache)
    variant = build_system(tmp_path / "variant", "--argstr", "name", "variant")  # only the toplevel differs
    assert len(set((variant / "closure-paths").read_text().split()) - set(closure)) == 1
    warm = netboot_ok("build", variant, "--out", tmp_path / "b", "--format", "direct", "--cache-dir", cache)
    assert reused(warm.stderr) == len(closure) - 1
    cold = netboot_ok("build", variant, "--out", tmp_path / "c", "--format", "direct", "--cache-dir", tmp_path / "c2")
    assert reused(cold.stderr) == 0
    assert (tmp_path / "b/initrd").read_bytes() == (tmp_path / "c/initrd").read_bytes()


def test_concurrent_builds_share_a_cache(system: Path, closure: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netboot",
                "build",
                str(system),
                "--out",
                str(tmp_path / f"o{i}"),
                "--format",
                "direct",
                "--cache-dir",
                str(cache),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    outputs = {(tmp_path / f"o{i}/initrd").read_bytes() for i in range(3)}
    assert len(outputs) == 1
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    warm = netboot_ok("build", system, "--out", tmp_path / "o4", "--format", "direct", "--cache-dir", cache)
    assert (tmp_path / "o4/initrd").read_bytes() in outputs
    assert reused(warm.stderr) == len(closure)


def test_cap_evicts_least_recently_used(system: Path, closure: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    netboot_ok("build", system, "--out", tmp_path / "a", "--format", "direct", "--cache-dir", cache)
    full = sum(p.stat().st_size for p in cache.iterdir() if not p.name.endswith(".json"))
    # A cap below what one build needs keeps that build's entries and drops everything else.
    netboot_ok(
        "build",
        system,
        "--out",
        tmp_path / "b",
        "--format",
        "direct",
        "--compress",
        "gzip",
        "--cache-dir",
        cache,
        "--cache-max",
        "1K",
    )
    left = [p for p in cache.iterdir() if not p.name.endswith(".json")]
    assert all(p.name.endswith(".cpio.gzip") for p in left) and len(left) == len(closure)
    assert full > 1024


def test_cache_command_shows_and_clears(system: Path, closure: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    netboot_ok("build", system, "--out", tmp_path / "a", "--format", "direct", "--cache-dir", cache)
    size = sum(p.stat().st_size for p in cache.iterdir() if not p.name.endswith(".json"))
    shown = netboot_ok("cache", "--cache-dir", cache).stdout
    assert shown == f"{cache}: {len(closure)} entries, {size / 2**20:,.1f} MiB\n"
    assert netboot_ok("cache", "--cache-dir", cache, "--clear").stdout.startswith(f"{cache}: removed ")
    assert list(cache.iterdir()) == []


def test_entry_without_metadata_is_made_again(system: Path, closure: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    netboot_ok("build", system, "--out", tmp_path / "a", "--format", "direct", "--cache-dir", cache)
    victim = next(cache.glob("*.json"))
    victim.unlink()  # as if a build died between its two renames
    again = netboot_ok("build", system, "--out", tmp_path / "b", "--format", "direct", "--cache-dir", cache)
    assert reused(again.stderr) == len(closure) - 1
    assert (tmp_path / "a/initrd").read_bytes() == (tmp_path / "b/initrd").read_bytes()


def test_unwritable_cache_is_an_error(system: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    proc = cli("build", system, "--out", tmp_path / "out", "--cache-dir", f / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"netboot: error: cache directory {f}/cache is not writable: Not a directory"
    ]
    assert not (tmp_path / "out").exists()


def test_bad_cache_max(system: Path, tmp_path: Path) -> None:
    proc = cli("build", system, "--out", tmp_path / "out", "--cache-max", "lots")
    assert (proc.returncode, proc.stderr.strip()) == (2, "netboot: error: invalid size 'lots' (like 500M or 5G)")
