#!/usr/bin/env python3
"""`make bench-dhcp` (with dhcp_bench.py): netboot's authoritative DHCP against ISC Kea, side by side in one run.

On a LAN in network namespaces, a server host (198.18.0.1/15) runs either `kea-dhcp4` (memfile leases,
persisted to its CSV file) or `netboot serve --dhcp`, on the same range and lease time; a client host
(198.18.0.2/15) runs ISC's `perfdhcp` as a relay (giaddr, port 67), so that it can simulate any number of
clients: new clients at 500, 1,000 and 2,000 four-way exchanges a second for 20 s. Reported: exchanges
completed (REQUEST answered by ACK) and the average delays DISCOVER->OFFER and REQUEST->ACK, as perfdhcp counts
them, and netboot / Kea as ratios.

Then the lease table's weight: 4,000 leases are taken in an 8,192-address range (tests/dhcp/dora.py, a Python
client relaying machine after machine), and 500 more exchanges are timed one by one at that client, from DISCOVER
sent to ACK received: average and 99th percentile, for both servers.

    python3 bench/dhcp_perf.py [--runs 1] [--rates 500,1000,2000] [--seconds 20] [--update]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools.lan import Host, Lan  # noqa: E402

SECTION = "## DHCP: perfdhcp against Kea"
SERVER, CLIENT = "198.18.0.1", "198.18.0.2"
BIG = ("198.18.0.10", "198.19.255.250")  # room for every new client of the fastest run
HELD = ("198.18.0.10", "198.18.32.9")  # 8,192 addresses
LEASE_TIME = 3600
DORA = ROOT / "tests" / "dhcp" / "dora.py"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench: {tool} not found (make bench-dhcp installs kea-dhcp4-server and kea-admin)")
    return path


@dataclass
class Perf:
    completed: int  # REQUEST->ACK received
    offer_ms: float  # average DISCOVER->OFFER
    ack_ms: float  # average REQUEST->ACK
    sent: int  # DISCOVERs sent
    cpu: float = 0.0  # CPU seconds the server used during the run


class Server:
    """kea-dhcp4 or netboot serve in the server host, on a range, with a fresh lease store."""

    def __init__(self, kind: str, host: Host, work: Path, first: str, last: str) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
        self.log = self.dir / "log"
        if kind == "kea":
            config = {"Dhcp4": {
                "interfaces-config": {"interfaces": ["eth0"], "dhcp-socket-type": "udp"},
                "lease-database": {"type": "memfile", "persist": True, "name": str(self.dir / "leases4.csv"),
                                   "lfc-interval": 3600},
                "valid-lifetime": LEASE_TIME, "renew-timer": LEASE_TIME // 2, "rebind-timer": LEASE_TIME * 7 // 8,
                "subnet4": [{"subnet": "198.18.0.0/15", "pools": [{"pool": f"{first} - {last}"}]}],
                "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": str(self.log)}],
                             "severity": "WARN"}],
            }}
            (self.dir / "kea.json").write_text(json.dumps(config))
            env = {**os.environ, "KEA_PIDFILE_DIR": str(self.dir), "KEA_LOCKFILE_DIR": str(self.dir)}
            argv = [need("kea-dhcp4"), "-c", str(self.dir / "kea.json")]
        else:
            env = dict(os.environ)
            argv = [sys.executable, "-m", "netboot", "serve", "--dir", str(build.small_out()), "--no-tftp",
                    "--http", "127.0.0.1:0", "--status", "127.0.0.1:0", "--dhcp", f"{first}-{last}",
                    "--dhcp-lease-time", str(LEASE_TIME), "--state-dir", str(self.dir / "state")]
        self._start(host, argv, env, 67)

    def _start(self, host: Host, argv: list[str], env: dict[str, str], port: int) -> None:
        """Run `argv` in `host`, logging to self.log, until it listens on UDP `port`."""
        with self.log.open("ab") as log:
            self.proc = host.popen(argv, stdout=log, stderr=log, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not host.listening(port, self.proc.pid):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds the server has used (user and system, its threads included)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_perfdhcp(client: Host, args: list[str], seconds: int, exchanges: tuple[str, str],
                 server: tuple[str, ...] = ()) -> tuple[Perf, str]:
    """ISC's perfdhcp with `args` in the client host for `seconds` (to `server`, given last: perfdhcp reads its
    options before it), and what it reports of its two `exchanges`
    (e.g. DISCOVER-OFFER and REQUEST-ACK): the second's replies received, both averages, the first's sent; and
    the whole report."""
    out = client.run([need("perfdhcp"), *args, "-p", str(seconds), "-R", "1000000", "-W", "1000000", *server],
                     capture_output=True, text=True, timeout=seconds + 120)
    text = out.stdout
    if out.returncode not in (0, 3):  # 3: some exchanges were lost (drops), a result like any other
        raise RuntimeError(f"perfdhcp failed ({out.returncode}):\n{text[-3000:]}\n{out.stderr[-2000:]}")

    def part(name: str) -> str:
        found = re.search(rf"\*\*\*Statistics for: {name}\*\*\*(.*?)(\*\*\*|\Z)", text, re.S)
        if found is None:
            raise RuntimeError(f"no {name} statistics in perfdhcp's report:\n{text[-3000:]}")
        return found.group(1)

    def number(section: str, label: str) -> float:
        found = re.search(rf"^{label}: ([0-9.]+)", section, re.M)
        return float(found.group(1)) if found else float("nan")

    first, second = part(exchanges[0]), part(exchanges[1])
    return Perf(int(number(second, "received packets")), number(first, "avg delay"), number(second, "avg delay"),
                int(number(first, "sent packets"))), text


def perf_row(label: str, get: Callable[[str, str], float]) -> str:
    """A row of a perfdhcp table: Kea's and netboot's exchanges completed, their ratio, delays and CPU, each
    value `get(kind, field)`."""
    done = get("kea", "completed"), get("netboot", "completed")
    return (f"| {label} | {done[0]:.0f} | {done[1]:.0f} | **{done[1] / max(done[0], 1):.2f}x** | "
            f"{get('kea', 'offer_ms'):.2f} ms | {get('netboot', 'offer_ms'):.2f} ms | "
            f"{get('kea', 'ack_ms'):.2f} ms | {get('netboot', 'ack_ms'):.2f} ms | "
            f"{get('kea', 'cpu'):.1f} s | {get('netboot', 'cpu'):.1f} s |")


def perfdhcp(client: Host, rate: int, seconds: int) -> Perf:
    """perfdhcp as a relay from the client host: new clients (MACs drawn from a million) at `rate` a second."""
    return run_perfdhcp(client, ["-4", "-l", CLIENT, "-r", str(rate)], seconds, ("DISCOVER-OFFER", "REQUEST-ACK"),
                        (SERVER,))[0]


def held(client: Host, server: Server, fill: int, timed: int) -> tuple[float, float, float, float]:
    """Take `fill` leases, then time `timed` more exchanges one by one: (fill seconds, average ms, p99 ms, and the
    average ms of their DISCOVER->OFFER part)."""
    def dora(first: int, count: int) -> list[tuple[float, float]]:
        out = client.run([sys.executable, DORA, "--server", SERVER, "--relay", CLIENT, "--first", str(first),
                          "--count", str(count)], capture_output=True, text=True, timeout=1800)
        times = [(float(line.split()[2]), float(line.split()[3])) for line in out.stdout.splitlines()
                 if " - " not in line]
        if out.returncode != 0 or len(times) != count:
            raise RuntimeError(f"{server.kind}: {count - len(times)} of {count} exchanges not answered: "
                               f"{out.stderr[-2000:]}")
        return times

    start = time.monotonic()
    dora(0, fill)
    filled = time.monotonic() - start
    timings = dora(100_000, timed)
    times = sorted(t for t, _ in timings)
    return (filled, statistics.fmean(times) * 1e3, times[int(len(times) * 0.99) - 1] * 1e3,
            statistics.fmean(o for _, o in timings) * 1e3)


def fdatasync_ms(directory: Path, times: int = 200) -> tuple[float, float]:
    """A line appended and fdatasynced, as the journal does for each group: (average, median) in ms. The floor of
    an exchange whose lease is on disk before its ACK."""
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    took = []
    try:
        for _ in range(times):
            os.write(fd, b"x" * 80 + b"\n")
            start = time.perf_counter()
            os.fdatasync(fd)
            took.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.fmean(took) * 1e3, statistics.median(took) * 1e3


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__, runs=1)
    p.add_argument("--rates", default="500,1000,2000")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--fill", type=int, default=4000)
    p.add_argument("--timed", type=int, default=500)
    args = p.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    build.small_out()
    results: dict[tuple[str, int], list[Perf]] = {}
    heavy: dict[str, list[tuple[float, float, float, float]]] = {"kea": [], "netboot": []}
    run_loads: dict[tuple[int, int], str] = {}
    held_loads: dict[tuple[str, int], str] = {}
    floors: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="dhcp-perf-") as tmp, Lan("nbperf") as lan:
        work = Path(tmp)
        server_host = lan.host("server", f"{SERVER}/15")
        client = lan.host("perf", f"{CLIENT}/15")
        for run in range(args.runs):
            for rate in rates:
                run_loads[(rate, run)] = load().split()[0]
                for kind in ("kea", "netboot") if run % 2 == 0 else ("netboot", "kea"):
                    server = Server(kind, server_host, work, *BIG)
                    try:
                        before = server.cpu()
                        result = perfdhcp(client, rate, args.seconds)
                        result.cpu = server.cpu() - before
                    finally:
                        server.stop()
                    results.setdefault((kind, rate), []).append(result)
                    print(f"{kind} {rate}/s: {result}", flush=True)
            for kind in ("kea", "netboot"):
                held_loads[(kind, run)] = load().split()[0]
                server = Server(kind, server_host, work, *HELD)
                try:
                    heavy[kind].append(held(client, server, args.fill, args.timed))
                finally:
                    server.stop()
                print(f"{kind} with {args.fill} leases: {heavy[kind][-1]}", flush=True)
            floors.append(fdatasync_ms(work))

    def med(kind: str, rate: int, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[(kind, rate)])

    def row(label: str, kea: Perf | None, nb: Perf | None, rate: int) -> str:
        get = (lambda kind, field: med(kind, rate, field)) if kea is None or nb is None else (
            lambda kind, field: getattr(kea if kind == "kea" else nb, field))
        return perf_row(label, get)

    lines = [
        SECTION,
        "",
        f"ISC's load generator `perfdhcp` (Debian's kea-admin) as a relay on a LAN in network namespaces, new "
        f"clients (MACs drawn from a million) at each rate for {args.seconds} s, against `kea-dhcp4` (Debian's "
        f"kea-dhcp4-server; memfile leases persisted to its CSV file, which it writes before answering but does not "
        f"fsync) and against `netboot serve --dhcp` (journal fdatasynced before each ACK, ACKs of one burst "
        f"sharing one fdatasync), on the same range {BIG[0]}-{BIG[1]}, lease time {LEASE_TIME} s; taking turns, "
        f"{args.runs} run(s). Completed: REQUESTs answered by an ACK. Delays are perfdhcp's averages; CPU is what "
        f"the server used in the run. The machine (2 cores) is shared with other test runs, so every run is shown "
        f"with the load average (1 minute) before it, then the medians.",
        "",
        "| rate, run | completed: Kea | netboot | ratio | DISCOVER->OFFER: Kea | netboot | REQUEST->ACK: Kea | "
        "netboot | CPU: Kea | netboot |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        for run in range(args.runs):
            lines.append(row(f"{rate}/s, run {run + 1} (load {run_loads[(rate, run)]})",
                             results[("kea", rate)][run], results[("netboot", rate)][run], rate))
        lines.append(row(f"**{rate}/s, median**", None, None, rate))
    def shares(kind: str) -> str:
        return ", ".join(f"{med(kind, r, 'cpu') / args.seconds:.0%}" for r in rates)

    lines += [
        "",
        f"CPU share of one core, medians at {', '.join(f'{r}/s' for r in rates)}: netboot {shares('netboot')}, "
        f"Kea {shares('kea')}. netboot answers from one event loop on one core: as that core nears saturation "
        f"(here at {max(rates)}/s) every exchange still completes, but requests queue and the delays grow.",
    ]
    kea_h = [statistics.median(x[i] for x in heavy["kea"]) for i in range(4)]
    nb_h = [statistics.median(x[i] for x in heavy["netboot"]) for i in range(4)]
    lines += [
        "",
        f"With {args.fill:,} leases held in an 8,192-address range ({HELD[0]}-{HELD[1]}), taken first by a Python "
        f"client relaying machine after machine (tests/dhcp/dora.py), then {args.timed} more exchanges timed one "
        f"by one at that client, DISCOVER sent to ACK received; each run, then the medians:",
        "",
        f"| server | taking {args.fill:,} leases | one exchange: average | 99th percentile | of which "
        f"DISCOVER->OFFER |",
        "|---|---|---|---|---|",
    ]
    for kind, name in (("netboot", "netboot"), ("kea", "Kea")):
        for run, h in enumerate(heavy[kind]):
            lines.append(f"| {name}, run {run + 1} (load {held_loads[(kind, run)]}) | {h[0]:.1f} s | {h[1]:.2f} ms | "
                         f"{h[2]:.2f} ms | {h[3]:.2f} ms |")
    lines += [
        f"| **netboot, median** | {nb_h[0]:.1f} s | {nb_h[1]:.2f} ms (**{nb_h[1] / kea_h[1]:.1f}x**) | "
        f"{nb_h[2]:.2f} ms | {nb_h[3]:.2f} ms |",
        f"| **Kea, median** | {kea_h[0]:.1f} s | {kea_h[1]:.2f} ms | {kea_h[2]:.2f} ms | {kea_h[3]:.2f} ms |",
        "",
        f"An fdatasync of one appended line in the same directory took "
        f"{', '.join(f'{f[0]:.2f}' for f in floors)} ms on average in each run (medians "
        f"{', '.join(f'{f[1]:.2f}' for f in floors)} ms): the floor of an exchange whose lease is on disk before "
        f"its ACK, which Kea's memfile does not wait for.",
        "",
        f"Command: `python3 bench/dhcp_perf.py --runs {args.runs}` (`make bench-dhcp`); each perfdhcp run is "
        f"`perfdhcp -4 -l {CLIENT} -r RATE -p {args.seconds} -R 1000000 -W 1000000 {SERVER}`.",
        "",
    ]
    return publish(SECTION, "\n".join(lines), args.update)


if __name__ == "__main__":
    main()
