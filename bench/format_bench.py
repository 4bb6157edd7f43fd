#!/usr/bin/env python3
"""The image formats side by side on the ~1 GB benchmark closure: how long each takes to build, how large its
initrd is, and how long a VM takes to boot it.

Builds, cold (--no-cache, so the image is really made), interleaved run by run: the erofs format with its
default lz4, bare mkfs.erofs with the same options on the closure laid out beforehand (its reference), the
squashfs format (zstd 10, the format erofs is to beat), and for the whole trade-off erofs with lz4hc 12, erofs
uncompressed in a zstd initrd member, and the direct format.

Boots, QEMU direct kernel boot under software emulation (TCG), of the squashfs, erofs (lz4) and direct builds:
the time from QEMU's start to the system's init (`NETBOOT-TEST: init reached`) and to the test system's marker
(`NETBOOT-TEST-OK`, printed once its init has read and sha256-checked every file of the store: the read path).
A squashfs boot takes over five minutes under TCG, so each format boots once unless --boot-runs says more.

    python3 bench/format_bench.py [--runs 3] [--boot-runs 1] [--update]
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import build  # noqa: E402
from measure import Run, measure, median_run  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools import qemu  # noqa: E402
from netboot.image.closure import REGISTRATION_NAME  # noqa: E402

SECTION = "## Image formats"
WORK = build.DATA / "formats"
BOOT_MEMORY = "4096"  # MiB: the initrd, and what the kernel unpacks from it, live in the guest's memory
BOOT_TIMEOUT = 900.0
INIT = "NETBOOT-TEST: init reached"
MARKER = "NETBOOT-TEST-OK"
# The reference's file system UUID and timestamps: fixed, as netboot fixes them (it derives the UUID from
# the image's contents).
REF_UUID = "6e657462-6f6f-7465-726f-667362656e63"
REF_MTIME = 1
REFERENCE = "mkfs.erofs"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    options: tuple[str, ...]
    boot: bool = False


# In the order each run builds them.
VARIANTS = (
    Variant("erofs", "erofs, lz4 (default: level 1, `mkfs.erofs -zlz4`)", ("--format", "erofs"), boot=True),
    Variant("squashfs", "squashfs, zstd 10 (default)", ("--format", "squashfs"), boot=True),
    Variant("erofs-lz4hc", "erofs, lz4hc 12 (`--level 12`, `mkfs.erofs -zlz4hc,12`)",
            ("--format", "erofs", "--level", "12")),
    Variant("erofs-zstd", "erofs uncompressed, its initrd member zstd 10 (`--compress zstd`)",
            ("--format", "erofs", "--compress", "zstd")),
    Variant("direct", "direct, zstd 10 (default)", ("--format", "direct"), boot=True),
)


def netboot_argv(system: Path, v: Variant) -> list[str]:
    return build.netboot_argv(str(system), "--out", str(WORK / v.key), *v.options, "--no-cache")


def shown(argv: list[str], system: Path) -> str:
    """A command as the text shows it: `netboot` for the module, SYSTEM and WORK for the long paths."""
    text = shlex.join(["netboot", *argv[3:]] if argv[1:3] == ["-m", "netboot"] else argv)
    return text.replace(str(system), "SYSTEM").replace(str(WORK), "WORK")


def lay_out(system: Path, root: Path) -> tuple[str, float]:
    """The reference's input, made once outside the timing: every store path of the closure and the
    registration in `root`, as netboot's own erofs root holds them. Hard links (`cp -al`) where the store's
    owner allows them, else copies (`cp -a`). Returns the command used and the seconds it took."""
    paths = build.closure_of(system)
    registration = subprocess.run(["nix-store", "--dump-db", *paths], check=True, capture_output=True).stdout
    started = time.monotonic()
    how = "cp -al"
    root.mkdir(parents=True)
    if subprocess.run(["cp", "-al", *paths, str(root)], stderr=subprocess.DEVNULL).returncode != 0:
        remove(root)
        root.mkdir(parents=True)
        how = "cp -a"
        subprocess.run(["cp", "-a", *paths, str(root)], check=True)
    (root / REGISTRATION_NAME).write_bytes(registration)
    (root / REGISTRATION_NAME).chmod(0o444)
    return how, time.monotonic() - started


def remove(root: Path) -> None:
    """Remove a laid-out closure: its directories made writable first (only the directories: its files may be
    the store's own, hard-linked)."""
    if root.exists():
        subprocess.run(["find", str(root), "-type", "d", "-exec", "chmod", "u+w", "{}", "+"], check=True)
        shutil.rmtree(root)


def mkfs_argv(root: Path, image: Path) -> list[str]:
    """Bare mkfs.erofs with the options netboot's erofs format passes (netboot/image/erofs.py) for lz4."""
    return ["mkfs.erofs", "--quiet", "-zlz4", f"-T{REF_MTIME}", f"-U{REF_UUID}", "--all-root", "-x-1",
            str(image), str(root)]


def boot(out: Path) -> tuple[float, float]:
    """Seconds from QEMU's start to the system's init and to the test system's marker."""
    result = qemu.watch(qemu.direct_argv(out, memory=BOOT_MEMORY), timeout=BOOT_TIMEOUT, expect=MARKER,
                        marks=(INIT, MARKER))
    if not result.expected_seen or INIT not in result.seen_at:
        raise RuntimeError(f"booting {out} failed (timed out: {result.timed_out}):\n{result.console[-3000:]}")
    return result.seen_at[INIT], result.seen_at[MARKER]


def version(package: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True,
                          text=True).stdout or "?"


def seconds(s: float) -> str:
    return f"{s:.1f} s"


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__, runs=3)
    p.add_argument("--boot-runs", type=int, default=1, help="boots of each format (default 1)")
    args = p.parse_args(argv)
    system = build.bench_system()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(build.ROOT)}
    root, image = WORK / "erofs-root", WORK / "ref.erofs"
    load = os.getloadavg()[0]
    builds: dict[str, list[Run]] = {v.key: [] for v in VARIANTS} | {REFERENCE: []}
    boots: dict[str, list[tuple[float, float]]] = {v.key: [] for v in VARIANTS if v.boot}
    try:
        how, layout_s = lay_out(system, root)
        print(f"bench: laid out the closure with {how} in {layout_s:.1f} s", file=sys.stderr)
        for run in range(args.runs):  # interleaved, so that every build sees the same machine state
            for v in VARIANTS:
                builds[v.key].append(measure(netboot_argv(system, v), env=env, cwd=build.ROOT))
                print(f"bench: run {run + 1}: {v.key} {builds[v.key][-1].seconds:.1f} s", file=sys.stderr)
                if v.key == "erofs":  # the reference right after the build it is the reference of
                    image.unlink(missing_ok=True)
                    builds[REFERENCE].append(measure(mkfs_argv(root, image)))
                    print(f"bench: run {run + 1}: {REFERENCE} {builds[REFERENCE][-1].seconds:.1f} s",
                          file=sys.stderr)
        for run in range(args.boot_runs):
            for key in boots:
                boots[key].append(boot(WORK / key))
                print(f"bench: boot {run + 1}: {key}: init {boots[key][-1][0]:.1f} s, "
                      f"marker {boots[key][-1][1]:.1f} s", file=sys.stderr)
    finally:
        remove(root)
    text = markdown(system, args.runs, args.boot_runs, builds, boots, how, layout_s, load)
    return publish(SECTION, text, args.update)


def markdown(system: Path, runs: int, boot_runs: int, builds: dict[str, list[Run]],
             boots: dict[str, list[tuple[float, float]]], how: str, layout_s: float, load: float) -> str:
    paths = build.closure_of(system)
    files, size = build.closure_stats(paths)
    t = {k: median_run(v).seconds for k, v in builds.items()}
    initrd = {v.key: (WORK / v.key / "initrd").stat().st_size for v in VARIANTS}
    ref_size = (WORK / "ref.erofs").stat().st_size
    erofs_vs_ref, erofs_vs_squashfs = t["erofs"] / t[REFERENCE], t["erofs"] / t["squashfs"]
    labels = {v.key: v.label for v in VARIANTS}
    rows = [
        f"| {labels['erofs']} | {seconds(t['erofs'])} | {megabytes(initrd['erofs'])} "
        f"| **{erofs_vs_squashfs:.2f}x** |",
        f"| reference: bare `mkfs.erofs -zlz4` on the laid-out closure (image only, no layout) "
        f"| {seconds(t[REFERENCE])} | {megabytes(ref_size)} (image) | {t[REFERENCE] / t['squashfs']:.2f}x |",
        *(f"| {labels[k]} | {seconds(t[k])} | {megabytes(initrd[k])} | {t[k] / t['squashfs']:.2f}x |"
          for k in ("squashfs", "erofs-lz4hc", "erofs-zstd", "direct")),
    ]
    netboot_keys = [v.key for v in VARIANTS]
    fastest_build = min(netboot_keys, key=lambda k: t[k])
    to_init = {k: statistics.median(b[0] for b in v) for k, v in boots.items()}
    to_marker = {k: statistics.median(b[1] for b in v) for k, v in boots.items()}
    fastest_init = min(to_init, key=lambda k: to_init[k])
    fastest_marker = min(to_marker, key=lambda k: to_marker[k])
    slowest = max(to_marker, key=lambda k: to_marker[k])
    boots_were = (f"{boot_runs} boots of each format, medians" if boot_runs > 1 else
                  f"one boot of each format (the default: the slowest, {labels[slowest].split(',')[0]}, takes "
                  f"{to_marker[slowest] / 60:.1f} minutes here)")
    boot_rows = [
        f"| {labels[k]} | {megabytes(initrd[k])} | {seconds(to_init[k])} | {seconds(to_marker[k])} "
        f"| {seconds(to_marker[k] - to_init[k])} |"
        for k in boots
    ]
    met = "met" if erofs_vs_squashfs <= 0.6 else "not met"
    commands = [
        *(f"# {v.key}\n{shown(netboot_argv(system, v), system)}" for v in VARIANTS),
        f"# reference, after `{how} $(cat SYSTEM/closure-paths) WORK/erofs-root` and "
        f"`nix-store --dump-db $(cat SYSTEM/closure-paths) > WORK/erofs-root/{REGISTRATION_NAME}`, untimed",
        shown(mkfs_argv(WORK / "erofs-root", WORK / "ref.erofs"), system),
        "# boots, FORMAT one of squashfs, erofs, direct",
        f"qemu/boot-dir WORK/FORMAT --memory {BOOT_MEMORY} --timeout {BOOT_TIMEOUT:.0f} --expect {MARKER}",
        "# that is, for erofs (direct's command line also gets loglevel=7, for the kernel's own init line)",
        shown(qemu.direct_argv(WORK / "erofs", memory=BOOT_MEMORY), system),
    ]
    return "\n".join([
        SECTION, "",
        f"Measured by `python3 bench/format_bench.py --runs {runs} --boot-runs {boot_runs}` (`make bench-formats`) "
        f"on {time.strftime('%Y-%m-%d')} (load average before: {load:.2f}), on the benchmark closure "
        f"({len(paths)} store paths, {files:,} files and directories, {size / 1e9:.2f} GB), erofs-utils "
        f"{version('erofs-utils')}, squashfs-tools {version('squashfs-tools')}, QEMU {version('qemu-system-x86')}. "
        f"Builds: medians of {runs} runs; boots: {boots_were}.", "",
        f"Build: every format built cold (`--no-cache`, so the image is made each time), the builds interleaved "
        f"run by run. The reference is bare `mkfs.erofs` with the options netboot passes, on a directory that "
        f"already holds the closure as netboot lays it out (each store path and the registration, made once "
        f"with `{how}` in {layout_s:.1f} s): its time does not include that layout step, nor the closure query, "
        f"stage 1 and the initrd around the image, which netboot's time does. mkfs.erofs {version('erofs-utils')} "
        f"compresses on one core; mksquashfs and zstd use both.", "",
        "| build | time | initrd | time / squashfs |",
        "|---|---:|---:|---:|",
        *rows, "",
        f"erofs (lz4) / bare mkfs.erofs: **{erofs_vs_ref:.2f}x**. erofs (lz4) / squashfs: "
        f"**{erofs_vs_squashfs:.2f}x**; the aim of ≤ 0.6x of the squashfs build is **{met}**. "
        f"Fastest to build: {labels[fastest_build]}.", "",
        f"Boot: QEMU direct kernel boot (`-kernel`/`-initrd`, software emulation (TCG), one vCPU, "
        f"{int(BOOT_MEMORY) // 1024} GiB) of the same builds; the time from QEMU's start to the line "
        f"`{INIT}` (the system's init has started) and to the marker `{MARKER}`, which the test system's init "
        f"prints once it has read and sha256-checked every file of its store. The difference is mostly the read "
        f"path: decompression on read for squashfs and erofs, plain memory for direct (whose initrd the kernel "
        f"unpacked in full before init).", "",
        "| format | initrd | to init | to the marker (store read and checked) | reading the store |",
        "|---|---:|---:|---:|---:|",
        *boot_rows, "",
        f"Fastest to init: {labels[fastest_init]}; fastest to the marker: {labels[fastest_marker]}.", "",
        "Commands (SYSTEM: the closure's toplevel; WORK: bench/data/formats):", "",
        "```",
        *commands,
        "```", "",
    ])


if __name__ == "__main__":
    main()
