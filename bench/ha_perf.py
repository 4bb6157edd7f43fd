#!/usr/bin/env python3
"""`make bench-ha`: two netboot servers against two Kea servers, each pair on one PostgreSQL, side by side in one run.

On a LAN in network namespaces, two server hosts (198.18.0.1/15 and 198.18.0.2/15) run either a pair of
`netboot serve --dhcp RANGE --database URL --name a|b` or a pair of `kea-dhcp4` with its PostgreSQL lease backend
(schema by `kea-admin db-init pgsql`), on the same range and lease time, each pair on a fresh database of one
throwaway PostgreSQL cluster (devtools/postgres.py: Debian's PostgreSQL, a Unix socket, fsync on). A client host
(198.18.0.3/15) runs ISC's `perfdhcp` on its interface, not as a relay: every DISCOVER is a broadcast that both
servers of the pair hear, perfdhcp takes the first OFFER of each exchange and REQUESTs with that server's
identifier, as a real client does, and the other server's offer is left untaken (perfdhcp counts it among its
"orphans"). `-B` sets the broadcast flag (RFC 2131 §4.1): both servers answer by broadcast, as netboot does
anyway, so that perfdhcp, simulating the clients' MACs (`-R`) on its one interface, hears every answer whatever
a server's way of reaching a client without an address. New clients at RATE four-way exchanges a second for
SECONDS.

Reported: exchanges completed (REQUEST answered by ACK), average DISCOVER->OFFER and REQUEST->ACK delays as
perfdhcp counts them, netboot / Kea as ratios, the leases each server of the pair granted, and, from each
database after the run, addresses held twice (by two rows; zero is the only right answer) and the leases held,
which must be as many as the exchanges completed (perfdhcp's clients are distinct MACs): an ACKed lease missing
from the table is an address another server may hand out again.

Debian's Kea (2.2) predates the "random" allocator that ISC recommends for servers sharing a lease database
(Kea 2.4); its pair runs the iterative allocator it has, each server checking its candidate against the database.
Each kea-dhcp4 runs multi-threaded (8 packet threads, each with its own PostgreSQL connection; the default of
Kea 2.4, off in 2.2): on this database it answered at 1,000/s with a fifth of the delays of its single thread.

    python3 bench/ha_perf.py [--runs 1] [--rate 1000] [--seconds 20] [--update]
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build  # noqa: E402
from dhcp_perf import Perf, load, need, run_perfdhcp  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools.lan import Host, Lan  # noqa: E402
from devtools.postgres import Cluster  # noqa: E402

SECTION = "## Two servers on one PostgreSQL: perfdhcp against a Kea pair"
SERVERS = {"a": "198.18.0.1", "b": "198.18.0.2"}
CLIENT = "198.18.0.3"
RANGE = ("198.18.0.10", "198.19.255.250")  # room for every new client of the run
LEASE_TIME = 3600
KEA_THREADS = 8  # kea-dhcp4's packet threads, each with its own PostgreSQL connection; 0: one thread
BAR_RATIO, BAR_MS = 0.95, 10.0  # the target: at least 0.95x Kea's exchanges, averages of at most 10 ms


@dataclass
class PairResult:
    perf: Perf
    granted: dict[str, int] = field(default_factory=dict)  # server name -> leases it granted (held at the end)
    held: int = 0  # leases in the table at the end
    twice: int = 0  # addresses held by more than one row
    cpu: dict[str, float] = field(default_factory=dict)  # server name -> CPU seconds in the run


class Pair:
    """Two servers of one kind, one on each server host, on a fresh database `database` of `cluster`."""

    def __init__(self, kind: str, hosts: dict[str, Host], cluster: Cluster, database: str, work: Path,
                 kea_threads: int = KEA_THREADS) -> None:
        self.kind = kind
        self.cluster = cluster
        self.database = database
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        if kind == "kea":
            password = secrets.token_urlsafe(16)
            cluster.psql(f"CREATE ROLE {database} LOGIN PASSWORD '{password}'", database="postgres")
            cluster.psql(f"CREATE DATABASE {database} OWNER {database}", database="postgres")
            init = subprocess.run([need("kea-admin"), "db-init", "pgsql", "-n", database, "-u", database,
                                   "-p", password, "-h", str(cluster.socket_dir)],
                                  capture_output=True, text=True, timeout=120)
            if init.returncode != 0:
                raise RuntimeError(f"kea-admin db-init pgsql failed:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        else:
            cluster.psql(f"CREATE DATABASE {database} OWNER netboot", database="postgres")
        for name, host in hosts.items():
            directory = work / f"{database}-{name}"
            directory.mkdir()
            self.logs[name] = directory / "log"
            if kind == "kea":
                config = {"Dhcp4": {
                    # Raw sockets: Kea's UDP sockets do not hear clients that have no address yet (Kea ARM,
                    # "Interface Configuration"); the broadcast DISCOVERs of perfdhcp are such.
                    "interfaces-config": {"interfaces": ["eth0"], "dhcp-socket-type": "raw"},
                    "lease-database": {"type": "postgresql", "name": database, "host": str(cluster.socket_dir),
                                       "port": cluster.port, "user": database, "password": password},
                    "valid-lifetime": LEASE_TIME, "renew-timer": LEASE_TIME // 2,
                    "rebind-timer": LEASE_TIME * 7 // 8,
                    "subnet4": [{"subnet": "198.18.0.0/15", "pools": [{"pool": f"{RANGE[0]} - {RANGE[1]}"}]}],
                    "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": str(self.logs[name])}],
                                 "severity": "WARN"}],
                    "multi-threading": {"enable-multi-threading": kea_threads > 0,
                                        "thread-pool-size": kea_threads, "packet-queue-size": 64},
                }}
                (directory / "kea.json").write_text(json.dumps(config))
                env = {**os.environ, "KEA_PIDFILE_DIR": str(directory), "KEA_LOCKFILE_DIR": str(directory)}
                argv = [need("kea-dhcp4"), "-c", str(directory / "kea.json")]
            else:
                env = dict(os.environ)
                argv = [sys.executable, "-m", "netboot", "serve", "--dir", str(build.small_out()), "--no-tftp",
                        "--http", "127.0.0.1:0", "--status", "none", "--dhcp", f"{RANGE[0]}-{RANGE[1]}",
                        "--dhcp-lease-time", str(LEASE_TIME), "--state-dir", str(directory / "state"),
                        "--database", cluster.url_for(database, "netboot", cluster.password), "--name", name]
            with self.logs[name].open("ab") as log:
                self.procs[name] = host.popen(argv, stdout=log, stderr=log, env=env, cwd=ROOT)
        for name, host in hosts.items():
            deadline = time.monotonic() + 60
            while not host.listening(67, self.procs[name].pid):
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{kind} {name} did not start:\n{self.logs[name].read_text()[-3000:]}")
                time.sleep(0.05)

    def cpu(self) -> dict[str, float]:
        """CPU seconds each server has used (user and system, its threads included)."""
        def seconds(pid: int) -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {name: seconds(proc.pid) for name, proc in self.procs.items()}

    def check(self) -> tuple[dict[str, int], int, int]:
        """From the database: leases held per server, leases held, addresses held by more than one row."""
        if self.kind == "kea":
            # Kea's lease4: state 0 is "default" (leased); hostname is empty, the server is not recorded.
            held = int(self.cluster.psql("SELECT count(*) FROM lease4 WHERE state = 0", self.database))
            per: dict[str, int] = {}
        else:
            rows = self.cluster.psql("SELECT server, count(*) FROM lease4 WHERE state = 0 GROUP BY server",
                                     self.database)
            per = {server: int(n) for server, n in (line.split("|") for line in rows.splitlines())}
            held = sum(per.values())
        twice = int(self.cluster.psql(
            "SELECT count(*) FROM (SELECT address FROM lease4 GROUP BY address HAVING count(*) > 1) t",
            self.database))
        return per, held, twice

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def perfdhcp(client: Host, rate: int, seconds: int) -> Perf:
    """perfdhcp on the client host's interface, broadcasting: new clients (MACs drawn from a million) at `rate`."""
    return run_perfdhcp(client, ["-4", "-l", client.ifname, "-B", "-r", str(rate)], seconds,
                        ("DISCOVER-OFFER", "REQUEST-ACK"))[0]


def run_pair(kind: str, hosts: dict[str, Host], client: Host, cluster: Cluster, database: str, work: Path,
             rate: int, seconds: int) -> PairResult:
    pair = Pair(kind, hosts, cluster, database, work)
    try:
        before = pair.cpu()
        perf = perfdhcp(client, rate, seconds)
        after = pair.cpu()
        per, held, twice = pair.check()
    finally:
        pair.stop()
    return PairResult(perf, per, held, twice, {name: after[name] - before[name] for name in after})


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__, runs=1)
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--seconds", type=int, default=20)
    args = p.parse_args(argv)
    build.small_out()
    results: dict[str, list[PairResult]] = {"kea": [], "netboot": []}
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ha-perf-") as tmp, Lan("nbha") as lan, Cluster() as cluster:
        os.chmod(tmp, 0o755)
        work = Path(tmp)
        hosts = {name: lan.host(name, f"{address}/15") for name, address in SERVERS.items()}
        client = lan.host("perf", f"{CLIENT}/15")
        for run in range(args.runs):
            loads.append(load().split()[0])
            for kind in ("kea", "netboot") if run % 2 == 0 else ("netboot", "kea"):
                result = run_pair(kind, hosts, client, cluster, f"{kind}{run + 1}", work, args.rate, args.seconds)
                results[kind].append(result)
                print(f"{kind} pair, run {run + 1}: {result}", flush=True)
        version = cluster.psql("SHOW server_version", "postgres").split()[0]
    kea_version = subprocess.run([need("kea-dhcp4"), "-v"], capture_output=True, text=True).stdout.strip()

    def row(label: str, kea: PairResult, nb: PairResult) -> str:
        ratio = nb.perf.completed / kea.perf.completed if kea.perf.completed else float("nan")
        return (f"| {label} | {kea.perf.completed} | {nb.perf.completed} | **{ratio:.2f}x** | "
                f"{kea.perf.offer_ms:.2f} ms | {nb.perf.offer_ms:.2f} ms | {kea.perf.ack_ms:.2f} ms | "
                f"{nb.perf.ack_ms:.2f} ms | {kea.twice} / {nb.twice} | "
                f"{sum(kea.cpu.values()):.1f} s | {sum(nb.cpu.values()):.1f} s |")

    lines = [
        SECTION,
        "",
        f"Two `netboot serve --dhcp RANGE --database URL --name a|b` against two `kea-dhcp4` ({kea_version}, "
        f"Debian's kea-dhcp4-server, PostgreSQL lease backend, schema by `kea-admin db-init pgsql`, multi-threaded "
        f"with {KEA_THREADS} packet threads, its iterative allocator: the \"random\" one ISC recommends for a "
        f"shared database came with Kea 2.4), each pair on a fresh database of one throwaway PostgreSQL {version} "
        f"cluster (devtools/postgres.py: a Unix socket, fsync on), on a LAN in network namespaces, the same range "
        f"{RANGE[0]}-{RANGE[1]} and lease time {LEASE_TIME} s. ISC's `perfdhcp` runs on the client host's "
        f"interface, not as a relay: each DISCOVER is a broadcast both servers of a pair hear (with the broadcast "
        f"flag, so that both answer by broadcast), perfdhcp takes the first OFFER and REQUESTs from its server, "
        f"the other offer goes untaken. New clients (MACs drawn from a million) at {args.rate} a second for "
        f"{args.seconds} s; the pairs take turns, {args.runs} run(s), each with the load average (1 minute) "
        f"before it: the machine (2 cores, the servers, PostgreSQL and perfdhcp on it together) is shared with "
        f"other work, so the numbers are noisy. Completed: REQUESTs answered by an ACK. Delays are perfdhcp's "
        f"averages. Held twice: addresses of more than one row of the pair's lease4 after the run (Kea / "
        f"netboot). CPU: both servers of the pair together, in the run.",
        "",
        "| run | completed: Kea pair | netboot pair | ratio | DISCOVER->OFFER: Kea | netboot | REQUEST->ACK: Kea | "
        "netboot | held twice | CPU: Kea | netboot |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in range(args.runs):
        lines.append(row(f"run {run + 1} (load {loads[run]})", results["kea"][run], results["netboot"][run]))
    lines.append("")
    for run in range(args.runs):
        kea, nb = results["kea"][run], results["netboot"][run]
        split = ", ".join(f"{name} {nb.granted.get(name, 0)}" for name in SERVERS)
        lines.append(f"Run {run + 1}: leases held after it, netboot {nb.held} ({split}), Kea {kea.held}; ACKed "
                     f"but not in the table: netboot {max(0, nb.perf.completed - nb.held)}, Kea "
                     f"{max(0, kea.perf.completed - kea.held)}; DISCOVERs sent: netboot {nb.perf.sent}, Kea "
                     f"{kea.perf.sent}.")
    kea_done = sorted(r.perf.completed for r in results["kea"])[args.runs // 2]
    nb_sorted = sorted(results["netboot"], key=lambda r: r.perf.completed)
    nb = nb_sorted[args.runs // 2]
    met = (kea_done and nb.perf.completed / kea_done >= BAR_RATIO and nb.perf.offer_ms <= BAR_MS
           and nb.perf.ack_ms <= BAR_MS)
    lines += [
        "",
        f"The target: at least {BAR_RATIO}x the Kea pair's exchanges, with averages of at most {BAR_MS:.0f} ms: "
        f"{'met' if met else 'not met'} in the median run.",
        "",
        f"Command: `python3 bench/ha_perf.py --runs {args.runs} --rate {args.rate} --seconds {args.seconds}` "
        f"(`make bench-ha`); each perfdhcp run is `perfdhcp -4 -l eth0 -B -r {args.rate} -p {args.seconds} "
        f"-R 1000000 -W 1000000`.",
        "",
    ]
    return publish(SECTION, "\n".join(lines), args.update)


if __name__ == "__main__":
    main()
