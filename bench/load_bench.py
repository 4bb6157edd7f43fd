#!/usr/bin/env python3
"""`make bench-load`: boot storms against netboot serve and the reference servers, side by side in one run.

- HTTP: 1,000 simulated iPXE machines at once (boot.ipxe, their per-MAC script, kernel, initrd: see
  storm.py) against `netboot serve --dir` and against nginx serving the same files statically (every
  /machine/<mac>/boot.ipxe mapped to one copy of a machine's script). Wall time, script p99, peak RSS.
- TFTP: 200 curl clients from 200 loopback addresses, each fetching undionly.kpxe then boot.ipxe at blksize
  1432, inside a network namespace that drops 2% of the UDP datagrams it receives (nftables), against
  `netboot serve` with its default flags and against tftpd-hpa serving the same two files. Wall time,
  failed transfers, retransmissions, peak RSS.

The servers take turns within each run; the figures are medians, the ratios medians of each run's ratio.
`--update` replaces the section "## Load" of BENCHMARKS.md.

    python3 bench/load_bench.py [--runs 5] [--machines 1000] [--clients 200] [--loss 2] [--update]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "bench" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build  # noqa: E402
import http_bench  # noqa: E402
import storm  # noqa: E402
from measure import PeakRss  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools.lan import Lan  # noqa: E402

SECTION = "## Load: boot storms"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench: {tool} not found (make bench installs nginx, curl and tftpd-hpa)")
    return path


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def netboot_serve(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "netboot", "serve", "--dir", str(out), "-q", *args]


# -- HTTP --------------------------------------------------------------------------------------------------

def static_tree(out: Path, port: int) -> Path:
    """What nginx serves: boot.ipxe and one machine's script as netboot renders them, and the same files."""
    tree = DATA / "load-static"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    server = http_bench.Netboot(out, port)
    try:
        for name, path in (("boot.ipxe", "boot.ipxe"), ("machine.ipxe", "machine/52-54-00-00-00-00/boot.ipxe")):
            subprocess.run(["curl", "-sf", "-o", str(tree / name), f"http://127.0.0.1:{port}/{path}"], check=True)
    finally:
        server.stop()
    for name in ("bzImage", "initrd"):
        shutil.copy(out / name, tree / name)
    return tree


# Every machine's script is one static copy; the kernel and initrd it names map to the same two files.
NGINX_LOCATIONS = r"""
        location = /boot.ipxe { default_type text/plain; }
        location ~ ^/machine/[^/]+/boot\.ipxe$ { default_type text/plain; try_files /machine.ipxe =404; }
        location ~ ^/machine/.*/(bzImage|initrd)$ { try_files /$1 =404; }"""


def http_rounds(out: Path, runs: int, machines: int) -> dict[str, dict[str, list[float]]]:
    ours_port, nginx_port = http_bench.free_port(), http_bench.free_port()
    tree = static_tree(out, http_bench.free_port())
    ours = http_bench.Netboot(out, ours_port)
    try:
        nginx = http_bench.Nginx(tree, nginx_port, name="load-nginx", connections=4096, locations=NGINX_LOCATIONS)
    except BaseException:
        ours.stop()
        raise
    servers = {"netboot": (ours.proc.pid, ours_port), "nginx": (nginx.proc.pid, nginx_port)}
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    try:
        for _, port in servers.values():
            storm.http_storm("127.0.0.1", port, 20)  # warm up: the page cache, nginx's workers
        for run in range(runs):
            order = list(servers) if run % 2 == 0 else list(reversed(servers))
            for name in order:
                pid, port = servers[name]
                with PeakRss(pid) as peak:
                    result = storm.http_storm("127.0.0.1", port, machines)
                if result.failures:
                    sys.exit(f"bench: {len(result.failures)} machines failed against {name}: {result.failures[:3]}")
                f = figures[name]
                f.setdefault("seconds", []).append(result.seconds)
                f.setdefault("p99", []).append(result.p99_ms())
                f.setdefault("median", []).append(result.median_ms())
                f.setdefault("rss", []).append(peak.mb)
                f.setdefault("gb", []).append(result.bytes / 1e9)
                print(f"  http storm {name:<8} {result.seconds:6.2f} s  script p99 {result.p99_ms():6.1f} ms  "
                      f"peak RSS {peak.mb:6.1f} MB", file=sys.stderr)
    finally:
        ours.stop()
        nginx.stop()
    return figures


# -- TFTP --------------------------------------------------------------------------------------------------

def tftp_rounds(out: Path, runs: int, clients: int, loss: float) -> tuple[dict[str, dict[str, list[float]]], str]:
    files = ["undionly.kpxe", "boot.ipxe"]
    tree = DATA / "load-tftp"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    tree.chmod(0o755)  # tftpd-hpa drops to user nobody
    figures: dict[str, dict[str, list[float]]] = {"netboot": {}, "tftpd-hpa": {}}
    with Lan("nbload") as lan:
        host = lan.host("storm", "192.0.2.10/24")
        ours_port, hpa_port, http_port = http_bench.free_port(), http_bench.free_port(), http_bench.free_port()
        ours = host.popen(netboot_serve(out, "--tftp", f"127.0.0.1:{ours_port}", "--http", f"127.0.0.1:{http_port}"),
                          cwd=ROOT, stderr=subprocess.PIPE, text=True)
        # netboot's boot.ipxe, fetched over its own TFTP, is what tftpd-hpa serves too.
        deadline = time.monotonic() + 20
        while host.run(["curl", "-sf", "-o", str(tree / "boot.ipxe"), f"tftp://127.0.0.1:{ours_port}/boot.ipxe"]
                       ).returncode != 0:
            if time.monotonic() > deadline or ours.poll() is not None:
                sys.exit("bench: netboot serve did not answer TFTP in the namespace")
            time.sleep(0.2)
        shutil.copy("/usr/lib/ipxe/undionly.kpxe", tree / "undionly.kpxe")
        for f in tree.iterdir():
            f.chmod(0o644)
        hpa = host.popen([need("in.tftpd"), "-L", "-a", f"127.0.0.1:{hpa_port}", "-s", str(tree)],
                         stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while host.run(["curl", "-sf", "-o", "/dev/null", f"tftp://127.0.0.1:{hpa_port}/boot.ipxe"]).returncode:
            if time.monotonic() > deadline:
                sys.exit("bench: tftpd-hpa did not answer in the namespace")
            time.sleep(0.2)
        host.drop_udp(loss)
        servers = {"netboot": (ours, ours_port), "tftpd-hpa": (hpa, hpa_port)}
        for run in range(runs):
            order = list(servers) if run % 2 == 0 else list(reversed(servers))
            for name in order:
                proc, port = servers[name]
                dropped = host.dropped_udp()
                with PeakRss(proc.pid) as peak:
                    done = host.run([sys.executable, str(HERE / "storm.py"), "tftp", "--port", str(port),
                                     "--clients", str(clients), "--files", ",".join(files), "--expect", str(tree)],
                                    capture_output=True, text=True, check=True)
                result = json.loads(done.stdout)
                f = figures[name]
                f.setdefault("seconds", []).append(result["seconds"])
                f.setdefault("failures", []).append(len(result["failures"]))
                f.setdefault("dropped", []).append(host.dropped_udp() - dropped)
                f.setdefault("rss", []).append(peak.mb)
                print(f"  tftp storm {name:<9} {result['seconds']:6.2f} s  failures {len(result['failures'])}  "
                      f"dropped {f['dropped'][-1]}  peak RSS {peak.mb:6.1f} MB", file=sys.stderr)
                for failure in result["failures"][:5]:
                    print(f"    {failure}", file=sys.stderr)
        stop(ours)
        log = ours.stderr.read() if ours.stderr else ""
    return figures, log


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def row(label: str, ours: list[float], theirs: list[float], unit: str, digits: int = 2, *,
        bold: bool = False, with_ratio: bool = True) -> str:
    med = statistics.median
    r = f"{ratio(ours, theirs):.2f}x" if with_ratio else ""
    r = f"**{r}**" if bold and r else r
    return f"| {label} | {med(ours):.{digits}f}{unit} | {med(theirs):.{digits}f}{unit} | {r} |"


def report(http: dict, tftp: dict, args: argparse.Namespace, out: Path) -> str:
    n, h = http["netboot"], http["nginx"]
    t, hpa = tftp["netboot"], tftp["tftpd-hpa"]
    kernel, initrd = (out / "bzImage").stat().st_size, (out / "initrd").stat().st_size
    undionly = Path("/usr/lib/ipxe/undionly.kpxe").stat().st_size
    gb = statistics.median(n["gb"])
    http_rows = "\n".join([
        row(f"wall time, {args.machines} machines", n["seconds"], h["seconds"], " s", bold=True),
        row("per-MAC script latency, p99", n["p99"], h["p99"], " ms", 1),
        row("per-MAC script latency, median", n["median"], h["median"], " ms", 1),
        row("peak RSS", n["rss"], h["rss"], " MB", 0, with_ratio=False),
        "| failed machines, all runs | 0 | 0 | |",
    ])
    tftp_rows = "\n".join([
        row(f"wall time, {args.clients} clients x 2 files", t["seconds"], hpa["seconds"], " s", bold=True),
        f"| failed clients, all runs | {sum(t['failures']):.0f} | {sum(hpa['failures']):.0f} | |",
        row("datagrams dropped per storm", t["dropped"], hpa["dropped"], "", 0, with_ratio=False),
        row("peak RSS", t["rss"], hpa["rss"], " MB", 1, with_ratio=False),
    ])
    return f"""{SECTION}

Measured by `python3 bench/load_bench.py --runs {args.runs} --machines {args.machines} --clients {args.clients} \
--loss {args.loss:g}` (`make bench-load`) on {time.strftime('%Y-%m-%d')}; the servers took turns within each of
{args.runs} runs. Figures are medians; ratios are the median of each run's netboot / reference; peak RSS is
the server with all its processes (netboot's TFTP workers, nginx's workers; tftpd-hpa forks one process per
transfer), sampled every 50 ms. Both servers ran with their default settings.

HTTP: {args.machines} simulated iPXE machines at once on loopback, each on one keep-alive connection fetching
boot.ipxe, its per-MAC script, the kernel ({kernel / 1e6:.1f} MB) and the initrd ({initrd / 1e6:.1f} MB): \
{gb:.1f} GB per storm. nginx serves the same files statically, every /machine/<mac>/boot.ipxe
mapped to one copy of a script netboot rendered (`bench/storm.py http`).

| HTTP storm | netboot serve | nginx | ratio |
|---|---:|---:|---:|
{http_rows}

TFTP: {args.clients} curl clients from {args.clients} loopback addresses at once, each fetching undionly.kpxe
({undionly / 1e3:.0f} kB) then boot.ipxe at blksize 1432, in a network namespace whose input hook drops \
{args.loss:g}% of UDP datagrams at random (`nft ... meta l4proto udp numgen random mod 10000 < \
{round(args.loss * 100)} drop`). curl is run with `--connect-timeout 5`, which makes it ask for timeout=1 and
retransmit every second, and `--max-time 120`: a client its server gave up on fails instead of waiting an hour.
Every download is compared with the file served. Under loss the wall time is the slowest of 200 clients, the
one whose packets were lost several times in a row: it varies from run to run far more than between servers.

| TFTP storm, {args.loss:g}% loss | netboot serve | tftpd-hpa | ratio |
|---|---:|---:|---:|
{tftp_rows}

Servers: `netboot serve --dir {out.relative_to(ROOT)} -q --http 127.0.0.1:PORT [--no-tftp | --tftp \
127.0.0.1:PORT]`; nginx (`worker_processes auto`, sendfile, access log off; bench/data/load-nginx/nginx.conf);
`in.tftpd -L -a 127.0.0.1:PORT -s bench/data/load-tftp`.
"""


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__)
    p.add_argument("--machines", type=int, default=1000)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--loss", type=float, default=2.0)
    args = p.parse_args(argv)
    need("curl")
    out = build.small_out()
    print("bench: TFTP storm", file=sys.stderr)
    tftp, _log = tftp_rounds(out, args.runs, args.clients, args.loss)
    print("bench: HTTP storm", file=sys.stderr)
    http = http_rounds(out, args.runs, args.machines)
    text = report(http, tftp, args, out)
    return publish(SECTION, text, args.update)


if __name__ == "__main__":
    main()
