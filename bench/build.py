"""Build benchmarks: netboot build against the plain tools, side by side in one run, on a ~1 GB closure.

- direct format, zstd -10  vs  find | sort | cpio -o -H newc --reproducible | zstd -T0 -10
- squashfs format, zstd 10 vs  bare mksquashfs with the same settings
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from measure import Run, measure, median_run

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
# Host directories copied into store paths of their own: ~1.1 GB and ~55k files on a Debian machine
# with what `make bench` installs (the kernel's modules, /usr/share, /usr/include).
PAYLOAD_CANDIDATES = ["/lib/modules", "/usr/share", "/usr/include"]


@dataclass
class Row:
    what: str
    against: str
    ours: Run
    theirs: Run
    ours_size: int
    theirs_size: int
    target: str


def bench_system() -> Path:
    payload = [p for p in PAYLOAD_CANDIDATES if os.path.isdir(p)]
    nix_list = "[ " + " ".join(payload) + " ]"
    link = DATA / "system"
    DATA.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [ROOT / "tests/system/build", link, "--arg", "payload", nix_list, "--argstr", "name", "bench"],
        check=True, capture_output=True, text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def small_out() -> Path:
    """The small test system (kernel 8 MB, initrd 11 MB), built into bench/data/boot-out: what the boot and
    load benchmarks serve."""
    system = subprocess.run([ROOT / "tests/system/build", DATA / "boot-system"], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    out = DATA / "boot-out"
    subprocess.run([sys.executable, "-m", "netboot", "build", system, "--out", str(out), "-q"], check=True, cwd=ROOT)
    return out


def closure_of(system: Path) -> list[str]:
    """The store paths, sorted as nixpkgs' closureInfo lists them (and as netboot hands them to mksquashfs)."""
    return sorted((system / "closure-paths").read_text().split())


def closure_stats(paths: list[str]) -> tuple[int, int]:
    files = size = 0
    for p in paths:
        for dirpath, dirnames, filenames in os.walk(p):
            files += len(filenames) + len(dirnames)
            for f in filenames:
                size += os.lstat(os.path.join(dirpath, f)).st_size
    return files, size


def netboot_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "netboot", "build", *args, "-q"]


def variant_system() -> Path:
    """The bench system with one small store path changed (its toplevel), everything else shared."""
    payload = [p for p in PAYLOAD_CANDIDATES if os.path.isdir(p)]
    out = subprocess.run(
        [ROOT / "tests/system/build", DATA / "variant", "--arg", "payload", "[ " + " ".join(payload) + " ]",
         "--argstr", "name", "bench-variant"],
        check=True, capture_output=True, text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def run_build(system: Path, runs: int) -> tuple[list[Row], dict[str, str]]:
    paths = closure_of(system)
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache = work / "cache"
    rel = " ".join(shlex.quote(p.lstrip("/")) for p in paths)
    cpio_ref = (
        f"cd / && find {rel} | LC_ALL=C sort | cpio -o -H newc --reproducible --quiet | zstd -q -T0 -10 "
        f"> {work}/ref.cpio.zst"
    )
    squash_ref = (
        f"mksquashfs {' '.join(map(shlex.quote, paths))} {work}/ref.squashfs -noappend -no-recovery "
        "-keep-as-directory -no-hardlinks -all-root -no-xattrs -no-exports -b 1M -comp zstd -Xcompression-level 10 "
        "-quiet -no-progress"
    )
    # Cold builds: every run starts from an empty cache, as a first build does.
    direct = netboot_argv(str(system), "--out", str(work / "direct"), "--format", "direct", "--level", "10",
                          "--cache-dir", str(cache))
    squash = netboot_argv(str(system), "--out", str(work / "squashfs"), "--level", "10", "--cache-dir", str(cache))
    variant = variant_system()
    rebuild = netboot_argv(str(variant), "--out", str(work / "rebuild"), "--format", "direct", "--level", "10",
                           "--cache-dir", str(cache))
    commands = {
        "netboot direct (cold cache)": shlex.join(["netboot", *direct[3:]]),
        "reference cpio | zstd": cpio_ref,
        "netboot squashfs (cold cache)": shlex.join(["netboot", *squash[3:]]),
        "reference mksquashfs": squash_ref,
        "netboot direct, one store path changed (warm cache)": shlex.join(["netboot", *rebuild[3:]]),
    }
    results: dict[str, list[Run]] = {k: [] for k in commands}
    for _ in range(runs):  # interleaved, so that both sides see the same machine state
        shutil.rmtree(cache, ignore_errors=True)
        results["netboot direct (cold cache)"].append(measure(direct, env=env, cwd=ROOT))
        results["reference cpio | zstd"].append(measure([cpio_ref], shell=True))
        # The cache now holds every path of the system: the variant differs in one small path.
        results["netboot direct, one store path changed (warm cache)"].append(measure(rebuild, env=env, cwd=ROOT))
        shutil.rmtree(cache, ignore_errors=True)
        results["netboot squashfs (cold cache)"].append(measure(squash, env=env, cwd=ROOT))
        results["reference mksquashfs"].append(measure([squash_ref], shell=True))
    m = {k: median_run(v) for k, v in results.items()}
    rows = [
        Row("direct format, zstd -10", "find | sort | cpio -H newc --reproducible | zstd -T0 -10",
            m["netboot direct (cold cache)"], m["reference cpio | zstd"],
            (work / "direct/initrd").stat().st_size, (work / "ref.cpio.zst").stat().st_size,
            "time ≤ 1.15x, size within 5%"),
        Row("squashfs format, zstd 10", "mksquashfs -comp zstd -Xcompression-level 10 -b 1M",
            m["netboot squashfs (cold cache)"], m["reference mksquashfs"],
            (work / "squashfs/initrd").stat().st_size, (work / "ref.squashfs").stat().st_size,
            "time ≤ 1.15x"),
        Row("direct format, one small store path changed (warm cache)", "the full direct build (cold cache)",
            m["netboot direct, one store path changed (warm cache)"], m["netboot direct (cold cache)"],
            (work / "rebuild/initrd").stat().st_size, (work / "direct/initrd").stat().st_size,
            "time ≤ 10% (aim ≤ 5%)"),
    ]
    return rows, commands


def markdown(system: Path, rows: list[Row], commands: dict[str, str], runs: int) -> str:
    paths = closure_of(system)
    files, size = closure_stats(paths)
    lines = [
        "## Build",
        "",
        f"Closure: {len(paths)} store paths, {files:,} files and directories, {size / 1e9:.2f} GB "
        f"(tests/system with payload {', '.join(p for p in PAYLOAD_CANDIDATES if os.path.isdir(p))}). "
        f"Median of {runs} interleaved runs; peak RSS is the maximum over the runs.",
        "",
        "| what | compared against | netboot | reference | time ratio | size (netboot / reference) "
        "| netboot peak RSS: own / with children | reference peak RSS | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.what} | `{r.against}` | {r.ours.seconds:.1f} s | {r.theirs.seconds:.1f} s "
            f"| **{r.ours.seconds / r.theirs.seconds:.2f}x** "
            f"| {r.ours_size / 1e6:.0f} MB / {r.theirs_size / 1e6:.0f} MB ({r.ours_size / r.theirs_size:.3f}) "
            f"| {r.ours.own_rss_mb:.0f} MB / {r.ours.tree_rss_mb:.0f} MB | {r.theirs.tree_rss_mb:.0f} MB | {r.target} |"
        )
    lines += ["", "Commands:", "", "```"]
    lines += [f"# {k}\n{v}" for k, v in commands.items()]
    lines += ["```", ""]
    return "\n".join(lines)


def main(runs: int = 3) -> str:
    system = bench_system()
    rows, commands = run_build(system, runs)
    text = markdown(system, rows, commands, runs)
    print(text)
    return text


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
