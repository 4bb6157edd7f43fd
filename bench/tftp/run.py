#!/usr/bin/env python3
"""TFTP benchmark: netboot's server side by side with tftpd-hpa (in.tftpd), on loopback, in one run.

Prepares its own data under bench/data/tftp, starts both servers on free loopback ports, and measures:
  1. one lock-step curl stream of a ~200 MB file at blksize 1468;
  2. 50 concurrent curl clients of an 8 MB file at blksize 1468 (total wall time), all from one address (as
     behind a NAT), then each from an address of its own;
  3. atftp with windowsize 16 against the same client lock-step;
  4. the server's resident memory while serving files of growing size.
Each figure is the median of --runs runs, the servers taking turns. netboot runs twice: with --workers
worker processes (the figures compared), and in one process (what an embedding event loop gets without
workers). Writes bench/BENCHMARKS-tftp.md.

    python3 bench/tftp/run.py [--runs 5] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DATA = REPO / "bench" / "data" / "tftp"
REPORT = REPO / "bench" / "BENCHMARKS-tftp.md"
MiB = 1024 * 1024


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench: {tool} not found (Debian: apt-get install curl atftp tftpd-hpa)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_file(path: Path, size: int, sparse: bool = False) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    if sparse:
        with path.open("wb") as f:
            f.truncate(size)
        return
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            left -= len(chunk)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # ready when a request for a missing file gets its ERROR
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                sys.exit(f"bench: {self.name} exited: {err}")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                s.sendto(b"\x00\x01bench-probe\x00octet\x00", ("127.0.0.1", self.port))
                with contextlib.suppress(TimeoutError):
                    s.recvfrom(600)
                    return
        sys.exit(f"bench: {self.name} did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pids(self) -> list[int]:
        """The server process and its descendants (tftpd-hpa forks per transfer, ours may have workers)."""
        assert self.proc is not None
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def timed(argvs: list[list[str]], cwd: Path) -> float:
    """Start every command at once; seconds until the last has finished. Any failure aborts the benchmark."""
    start = time.perf_counter()
    procs = [subprocess.Popen(a, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in argvs]
    for p, argv in zip(procs, argvs, strict=True):
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"bench: {' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return time.perf_counter() - start


def curl(port: int, name: str, out: Path, blksize: int, source: str = "127.0.0.1") -> list[str]:
    return [need("curl"), "-s", "--interface", source, "--tftp-blksize", str(blksize), "-o", str(out),
            f"tftp://127.0.0.1:{port}/{name}"]


def atftp(port: int, name: str, out: Path, *options: str) -> list[str]:
    argv = [need("atftp")]
    for option in options:
        argv += ["--option", option]
    return [*argv, "-g", "-r", name, "-l", str(out), "127.0.0.1", str(port)]


def check(out: Path, expected: str) -> None:
    if digest(out) != expected:
        sys.exit(f"bench: {out} does not match what was served")


@contextlib.contextmanager
def sampling(pids: Callable[[], list[int]]) -> Iterator[list[int]]:
    """Sample the resident memory of `pids()` every 20 ms while the block runs; yields the samples."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_kib(pids()))
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="netboot's --tftp-workers (default 2: one a core)")
    p.add_argument("--quick", action="store_true", help="smaller files, 1 run: a smoke test, not figures")
    p.add_argument("--no-report", action="store_true", help=f"do not write {REPORT.relative_to(REPO)}")
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    big_size = 24 * MiB if args.quick else 200 * MiB
    clients = 10 if args.quick else 50

    need("in.tftpd")
    DATA.mkdir(parents=True, exist_ok=True)
    os.chmod(DATA, 0o755)  # tftpd-hpa drops to user nobody
    print("bench: preparing data", file=sys.stderr)
    files = {"big.bin": big_size, "8m.bin": 8 * MiB, "64m.bin": 64 * MiB}
    for name, size in files.items():
        make_file(DATA / name, size)
    rss_sizes = [8 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB] if not args.quick else [8 * MiB, 64 * MiB]
    for size in rss_sizes:
        make_file(DATA / f"rss-{size // MiB}m.bin", size, sparse=True)
    for f in DATA.iterdir():
        os.chmod(f, 0o644)
    # Hashing reads every file, which also puts it in the page cache: no server pays for the disk.
    digests = {name: digest(DATA / name) for name in files}

    def netboot(name: str, workers: int) -> Server:
        port = free_port()
        return Server(name, [sys.executable, "-m", "netboot.tftp", "--root", str(DATA), "--listen",
                             f"127.0.0.1:{port}", "--quiet", "--tftp-workers", str(workers)], port)

    hpa_port = free_port()
    hpa = Server(HPA, [need("in.tftpd"), "-L", "-a", f"127.0.0.1:{hpa_port}", "-s", str(DATA)], hpa_port)
    servers = [netboot(OURS, args.workers), hpa, netboot(SINGLE, 0)]
    env_note = f"{platform.node()}: {os.cpu_count()} cores, load before: {os.getloadavg()[0]:.2f}"
    results: dict[str, dict[str, list[float]]] = {}
    rss: dict[str, dict[int, int]] = {s.name: {} for s in servers}

    def record(test: str, server: str, value: float) -> None:
        results.setdefault(test, {}).setdefault(server, []).append(value)
        print(f"  {test:<40} {server:<18} {value:8.3f}", file=sys.stderr)

    for server in servers:
        server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="tftp-bench-") as tmp:
            out = Path(tmp)
            for run in range(runs):
                print(f"bench: run {run + 1}/{runs}", file=sys.stderr)
                order = servers[run % len(servers):] + servers[:run % len(servers)]
                for server in order:
                    t = timed([curl(server.port, "big.bin", out / "big", 1468)], out)
                    check(out / "big", digests["big.bin"])
                    record(f"1 stream {big_size // MiB} MB blksize 1468", server.name, t)
                for label, sources in (("from one address", ["127.0.0.1"] * clients),
                                       (f"from {clients} addresses", [f"127.0.1.{i + 1}" for i in range(clients)])):
                    for server in order:
                        argvs = [curl(server.port, "8m.bin", out / f"c{i}", 1468, sources[i]) for i in range(clients)]
                        t = timed(argvs, out)
                        for i in range(clients):
                            check(out / f"c{i}", digests["8m.bin"])
                            (out / f"c{i}").unlink()
                        record(f"{clients} clients x 8 MB blksize 1468, {label}", server.name, t)
                for server in order:
                    for label, options in (("lock-step", ()), ("windowsize 16", ("windowsize 16",)),
                                           ("windowsize 64", ("windowsize 64",))):
                        if options and server is hpa:
                            continue  # tftpd-hpa does not implement windowsize
                        t = timed([atftp(server.port, "64m.bin", out / "w", "blksize 1468", *options)], out)
                        check(out / "w", digests["64m.bin"])
                        record(f"atftp 64 MB blksize 1468 {label}", server.name, t)
            for server in servers:
                for size in rss_sizes:
                    name = f"rss-{size // MiB}m.bin"
                    with sampling(server.pids) as samples:
                        timed([curl(server.port, name, out / "r", 65464)], out)
                    rss[server.name][size] = max(samples)
                    label = f"RSS serving {size // MiB} MB"
                    print(f"  {label:<40} {server.name:<18} {max(samples) // 1024:5} MiB", file=sys.stderr)
    finally:
        for server in servers:
            server.stop()

    medians = {test: {s: statistics.median(v) for s, v in by.items()} for test, by in results.items()}
    ratios = {test: {s: statistics.median(a / b for a, b in zip(v, by[HPA], strict=True))
                     for s, v in by.items() if HPA in by}
              for test, by in results.items()}
    lines = table(medians, ratios, rss, runs, args.workers)
    print("\n".join(lines))
    if not args.quick and not args.no_report:
        write_report(lines, env_note, args, servers)
    return 0


OURS, HPA, SINGLE = "netboot", "tftpd-hpa", "netboot, 1 process"


Figures = dict[str, dict[str, float]]


def table(medians: Figures, ratios: Figures, rss: dict[str, dict[int, int]], runs: int, workers: int
          ) -> list[str]:
    def ratio(test: str, name: str) -> str:
        """The median of the ratios of each run: the servers of one run ran within seconds of each other,
        so a slow spell of the shared machine weighs on them alike."""
        by = ratios[test]
        return f"{by[name]:.2f}x" if name in by else "n/a"

    def secs(by: dict[str, float], name: str) -> str:
        return f"{by[name]:.2f} s" if name in by else "n/a"

    lines = [f"| test (median of {runs} runs) | netboot ({workers} workers) | tftpd-hpa | ratio | "
             "netboot, 1 process | ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for test, by in medians.items():
        lines.append(f"| {test} | {secs(by, OURS)} | {secs(by, HPA)} | {ratio(test, OURS)} | "
                     f"{secs(by, SINGLE)} | {ratio(test, SINGLE)} |")
    windowed = [t for t in medians if "windowsize 16" in t]  # the figure; 64 shows the trend
    lockstep = [t for t in medians if "atftp" in t and "lock-step" in t]
    stream = [t for t in medians if "1 stream" in t]
    if windowed and lockstep and stream:
        w, lock, one = medians[windowed[0]], medians[lockstep[0]], medians[stream[0]]
        big = int(stream[0].split()[2])
        lines += ["", f"| netboot, atftp windowsize 16 | netboot ({workers} workers) | netboot, 1 process |",
                  "| --- | ---: | ---: |"]
        lines.append("| speed-up over atftp lock-step (same blksize 1468) | "
                     + " | ".join(f"{lock[n] / w[n]:.1f}x" for n in (OURS, SINGLE)) + " |")
        lines.append("| throughput over the lock-step curl stream (MB/s vs MB/s) | "
                     + " | ".join(f"{64 / w[n]:.0f} vs {big / one[n]:.0f} = {64 / w[n] / (big / one[n]):.1f}x"
                                  for n in (OURS, SINGLE)) + " |")
    lines += ["", "| peak RSS serving a file (blksize 65464) | netboot (all processes) | tftpd-hpa | "
              "netboot, 1 process |", "| ---: | ---: | ---: | ---: |"]
    for size in rss[OURS]:
        cells = " | ".join(f"{rss[n][size] / 1024:.1f} MiB" for n in (OURS, HPA, SINGLE))
        lines.append(f"| {size // MiB} MB | {cells} |")
    return lines


def write_report(lines: list[str], env_note: str, args: argparse.Namespace, servers: list[Server]) -> None:
    def cmd(argv: list[str]) -> str:
        return " ".join(a if a != sys.executable else "python3" for a in argv).replace(str(REPO) + "/", "")

    commands = "\n".join(f"- {s.name}: `{cmd(s.argv)}`" for s in servers)
    text = f"""# TFTP benchmarks

Measured by `python3 bench/tftp/run.py --runs {args.runs} --workers {args.workers}` on
{time.strftime('%Y-%m-%d')} ({env_note}). The servers ran side by side in the same run, on loopback,
taking turns test by test; every figure is a median, every download was checked byte for byte. Ratios are
netboot / tftpd-hpa (below 1: netboot is faster), the median of the ratios within each run, and come from
that one run: the machine is shared (another build may run beside), so absolute times vary from run to
run far more than the ratios do.

{chr(10).join(lines)}

Servers:
{commands}

tftpd-hpa forks one process per transfer. netboot's workers run the transfers of files; the server process
keeps requests, limits and logging. Both run with their default limits: netboot's 32 transfers at once per
address queue the other requests of the one-address test, which start as transfers end.

Clients: `curl -s --interface ADDR --tftp-blksize 1468 -o OUT tftp://127.0.0.1:PORT/FILE` (curl also asks for
tsize and timeout), 50 of them started at once for the concurrent tests, from 127.0.0.1 or from 127.0.1.1-50;
`atftp --option "blksize 1468"
[--option "windowsize 16"] -g -r FILE -l OUT 127.0.0.1 PORT` (tftpd-hpa does not implement windowsize).
Memory: the highest resident set of the server and all its processes, sampled every 20 ms while one curl
fetched a sparse file at blksize 65464.
"""
    REPORT.write_text(text)
    print(f"bench: wrote {REPORT.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
