"""`make bench`: every comparison side by side in one run; prints the tables and rewrites BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arch_bench
import autobuild_bench
import boot_bench
import build
import db_driver
import dhcp6_perf
import dhcp_bench
import dhcp_perf
import fetch_bench
import format_bench
import ha_perf
import http_bench
import load_bench
import overlay_bench
import secureboot_bench
import status_bench

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = int(next(ln.split()[1] for ln in meminfo if ln.startswith("MemTotal"))) / 2**20
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, netboot at {commit.stdout.strip() or 'unknown commit'}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def tftp(runs: int) -> str:
    """bench/tftp/run.py writes its own report; it becomes a section here."""
    report = ROOT / "bench" / "BENCHMARKS-tftp.md"
    subprocess.run([sys.executable, str(ROOT / "bench/tftp/run.py"), "--runs", str(max(runs, 5)), "--workers", "2"],
                   check=True, cwd=ROOT)
    text = report.read_text().replace("# TFTP benchmarks", "## TFTP", 1)
    report.unlink()
    return text.replace("\n## ", "\n### ") + "\n"


def main() -> None:
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    system = build.bench_system()
    sections = [build.main(runs), http_bench.main(system, runs), tftp(runs), load_bench.main([]), status_bench.main([]),
                overlay_bench.main([]), autobuild_bench.main([]), format_bench.main([]),
                fetch_bench.main([]),
                boot_bench.main(runs), arch_bench.main(["--runs", str(runs)]), dhcp_bench.main(runs),
                dhcp_perf.main([]), dhcp6_perf.main([]), ha_perf.main([]), db_driver.main([]),
                secureboot_bench.main(runs)]
    text = "\n".join([
        "# Benchmarks",
        "",
        "Made by `make bench` (bench/run.py), which prepares its own data and runs each comparison side by side",
        "with the reference tool in the same run; ratios are netboot / reference (below 1 is faster).",
        "",
        f"Machine: {machine()}.",
        "",
        *sections,
    ])
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
