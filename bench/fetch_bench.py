#!/usr/bin/env python3
"""--fetch against one initrd on the ~1 GB benchmark closure, squashfs, both booted through QEMU's iPXE over HTTP
from `netboot serve`; and stage 1's download of the image against curl's from the host, for the same file.

Boot: the time from QEMU's start to the system's init (`NETBOOT-TEST: init reached`): without --fetch, iPXE
downloads the whole initrd (the image in it); with --fetch, iPXE downloads a stage-1-only initrd and stage 1
downloads the image with Linux's TCP stack, then checks its sha256. Interleaved run by run; software emulation
(TCG), one vCPU, as the tests boot.

Download: stage 1's own figure (its console line `fetched N bytes in S s (R MB/s)`, the download alone) against
`curl -o /dev/null` of the same URL on the host (loopback, the reference: what the server can send).

    python3 bench/fetch_bench.py [--runs 1] [--update]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import build  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools import qemu  # noqa: E402

SECTION = "## Systems of any size: --fetch"
WORK = build.DATA / "fetch"
MEMORY = "2048"  # MiB, both ways: the initrd (and the image unpacked from it), or the image in stage 1's tmpfs
TIMEOUT = 1800.0
INIT = "NETBOOT-TEST: init reached"
FETCHED = re.compile(r"netboot stage 1: fetched (\d+) bytes in ([\d.]+) s \(([\d.]+) MB/s\), sha256 checked in "
                     r"([\d.]+) s")
MACS = {"initrd": "52:54:00:00:fe:01", "fetch": "52:54:00:00:fe:02"}


def serve(machines: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "netboot", "serve", "--machines", str(machines), "--http",
                             "127.0.0.1:0", "--no-tftp", "--status", "127.0.0.1:0"], cwd=build.ROOT,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"http: serving http://\S+:(\d+)/", line):
            return proc, int(m.group(1))
    raise RuntimeError("netboot serve did not start")


def boot(port: int, mac: str) -> tuple[float, str]:
    """Seconds from QEMU's start to the system's init, and the console."""
    argv = qemu.net_argv(f"http://10.0.2.2:{port}/boot.ipxe", mac, memory=MEMORY)
    result = qemu.watch(argv, timeout=TIMEOUT, marks=(INIT,), until=(INIT,))
    if INIT not in result.seen_at:
        raise RuntimeError(f"booting {mac} failed (timed out: {result.timed_out}):\n{result.console[-3000:]}")
    return result.seen_at[INIT], result.console


def curl(url: str) -> float:
    """MB/s of curl's download of `url` to /dev/null."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]) / float(out[1]) / 1e6


def main(argv: list[str] | None = None) -> str:
    args = arguments(__doc__, runs=1).parse_args(argv)
    system = build.bench_system()
    outs = {"initrd": WORK / "initrd", "fetch": WORK / "fetch"}
    WORK.mkdir(parents=True, exist_ok=True)
    for key, out in outs.items():
        subprocess.run([*build.netboot_argv(str(system), "--out", str(out), "--format", "squashfs"),
                        *(["--fetch"] if key == "fetch" else [])], check=True, cwd=build.ROOT)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        machines = Path(tmp) / "machines.toml"
        machines.write_text("".join(f'[profiles.{k}]\ndir = "{out}"\n\n[machines."{MACS[k]}"]\nprofile = "{k}"\n\n'
                                    for k, out in outs.items()))
        proc, port = serve(machines)
        try:
            to_init: dict[str, list[float]] = {k: [] for k in outs}
            stage1: list[tuple[float, float]] = []
            curls: list[float] = []
            for run in range(args.runs):
                for key in outs:
                    seconds, console = boot(port, MACS[key])
                    to_init[key].append(seconds)
                    print(f"bench: run {run + 1}: {key} init at {seconds:.1f} s", file=sys.stderr)
                    if key == "fetch":
                        m = FETCHED.search(console)
                        if m is None:
                            raise RuntimeError(f"stage 1 did not say what it fetched:\n{console[-3000:]}")
                        stage1.append((float(m.group(3)), float(m.group(4))))
                        url = re.search(r"netboot stage 1: fetching http://10\.0\.2\.2:\d+(\S+) ", console)
                        assert url is not None
                        time.sleep(1)
                        curls.append(curl(f"http://127.0.0.1:{port}{url.group(1)}"))
                        print(f"bench: run {run + 1}: stage 1 {stage1[-1][0]:.1f} MB/s, curl {curls[-1]:.1f} MB/s",
                              file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
    return publish(SECTION, markdown(system, outs, args.runs, to_init, stage1, curls, load), args.update)


def markdown(system: Path, outs: dict[str, Path], runs: int, to_init: dict[str, list[float]],
             stage1: list[tuple[float, float]], curls: list[float], load: float) -> str:
    files, size = build.closure_stats(build.closure_of(system))
    med = {k: statistics.median(v) for k, v in to_init.items()}
    initrd = {k: (out / "initrd").stat().st_size for k, out in outs.items()}
    image = (outs["fetch"] / "image").stat().st_size
    rate, check = statistics.median(r for r, _ in stage1), statistics.median(c for _, c in stage1)
    ref = statistics.median(curls)
    return f"""{SECTION}

Measured by `python3 bench/fetch_bench.py --runs {runs}` on {time.strftime('%Y-%m-%d')} (load average before:
{load:.2f}), on the benchmark closure ({files:,} files and directories, {size / 1e9:.2f} GB), squashfs, zstd 10:
each build network-booted through QEMU's own iPXE ROM (user networking, software emulation (TCG), one vCPU,
{MEMORY} MiB) from `netboot serve` over HTTP on loopback; the time from QEMU's start to the line
`NETBOOT-TEST: init reached` (the system's init has started){", medians" if runs > 1 else ", one boot each"}.

| build | iPXE downloads | stage 1 downloads | to init | / one initrd |
|---|---:|---:|---:|---:|
| one initrd (no `--fetch`) | {initrd['initrd'] / 1e6:,.0f} MB | | {med['initrd']:.1f} s | 1.00x |
| `--fetch` | {initrd['fetch'] / 1e6:,.1f} MB | {image / 1e6:,.0f} MB, then its sha256 ({check:.1f} s) \
| {med['fetch']:.1f} s | **{med['fetch'] / med['initrd']:.2f}x** |

Download of the image ({image / 1e6:,.0f} MB): stage 1 (busybox wget into a tmpfs, one stream: one vCPU) at
{rate:.1f} MB/s, its own figure for the download alone; `curl -o /dev/null` from the host for the same URL at
{ref:.1f} MB/s; stage 1 / curl: **{rate / ref:.2f}x**. Under emulation the guest's CPU is what limits stage 1
(every byte crosses QEMU's emulated virtio NIC and user-mode network stack); on hardware, the link.
"""


if __name__ == "__main__":
    main()
