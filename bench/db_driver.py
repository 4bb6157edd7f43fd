#!/usr/bin/env python3
"""`make bench-db`: asyncpg against psycopg 3's async API on the DHCP path's statement, side by side in one run.

The PostgreSQL state backend claims addresses one round trip per burst of DHCP messages: one INSERT ... ON
CONFLICT DO UPDATE over unnest() of arrays, which takes the free addresses, renews a client's own and leaves an
address held by another client alone (its row is not returned). Both drivers run that statement prepared, on one
connection each, from one asyncio loop, on a throwaway cluster (devtools/postgres.py, Debian's PostgreSQL, Unix
socket, fsync on):

- single claims, one after the other: round trips a second, mean and 99th percentile latency;
- batches of 32 claims, one after the other: batches a second;
- two "servers", a connection each, claiming batches of 32 random addresses of one shared pool at the same time:
  claims a second together, and the conflicts (claims whose row was not returned: the other server held it).

Also the client's CPU per claim (this process only; the server's processes are not counted), as that is what a
driver costs the loop that answers DHCP. Each run does a share of every phase with both drivers, one after the
other on the same claims: on a shared machine a busy moment falls on both alike. `--update` replaces this section
of BENCHMARKS.md.

    python3 bench/db_driver.py [--runs 30] [--singles 200] [--batches 100] [--pool 16384] [--fsync off] [--update]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from report import arguments, publish  # noqa: E402

from devtools.postgres import Cluster  # noqa: E402

SECTION = "## PostgreSQL drivers on the DHCP path"
SCHEMA = """
CREATE TABLE lease4 (address bigint PRIMARY KEY, mac text NOT NULL, client_id bytea NOT NULL DEFAULT '',
                     expires double precision NOT NULL, state smallint NOT NULL, hostname text NOT NULL DEFAULT '',
                     server text NOT NULL);
CREATE INDEX lease4_mac ON lease4 (mac);
"""
# $1 addresses, $2 MACs, $3 client ids, $4 expiries, $5 states, $6 hostnames, $7 the server's name, $8 now.
CLAIM = """
WITH wanted AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::float8[], $5::int2[], $6::text[])
                AS w(address, mac, client_id, expires, state, hostname))
INSERT INTO lease4 AS l (address, mac, client_id, expires, state, hostname, server)
SELECT address, mac, client_id, expires, state, hostname, $7 FROM wanted
ON CONFLICT (address) DO UPDATE SET mac = excluded.mac, client_id = excluded.client_id, expires = excluded.expires,
    state = excluded.state, hostname = excluded.hostname, server = excluded.server
WHERE l.mac = excluded.mac OR l.expires <= $8
RETURNING l.address
"""
BATCH = 32
LEASE_TIME = 3600.0
BOUND = 2  # lease state: bound
FIRST = 0xC612_0000  # 198.18.0.0: the addresses claimed are FIRST + n

Claim = list[tuple[int, str, bytes, float, int, str]]  # (address, mac, client id, expires, state, hostname)
Claimer = Callable[[Claim, str, float], Awaitable[list[int]]]


def claims(addresses: Sequence[int], server: str, now: float) -> Claim:
    """One burst's claims, a client per address (its MAC says which server's clients it is among, so that the
    other server's claim of that address is a conflict), in address order: two transactions that upsert the same
    rows in different orders can deadlock, each holding a row the other waits for."""
    prefix = "02:00:00" if server == "a" else "06:00:00"
    rows = []
    for n in sorted(addresses):
        mac = f"{prefix}:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"
        rows.append((FIRST + n, mac, b"\x01" + bytes.fromhex(mac.replace(":", "")), now + LEASE_TIME, BOUND,
                     f"node-{n}"))
    return rows


# -- the drivers: connect, prepare, and a claim function returning the addresses granted


async def asyncpg_claimer(url: str) -> tuple[Claimer, Callable[[], Awaitable[None]]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    statement = await conn.prepare(CLAIM)

    async def claim(batch: Claim, server: str, now: float) -> list[int]:
        columns = list(zip(*batch, strict=True))
        rows = await statement.fetch(*columns, server, now)
        return [row[0] for row in rows]

    return claim, conn.close


# psycopg's placeholders: %b, a parameter in binary (arrays of bytea and float8 are not escaped to text and back).
PSYCOPG_CLAIM = re.sub(r"\$\d", "%b", CLAIM)
assert re.findall(r"\$(\d)", CLAIM) == [str(n) for n in range(1, 9)], "the parameters, in order, once each"


async def psycopg_claimer(url: str) -> tuple[Claimer, Callable[[], Awaitable[None]]]:
    import psycopg

    # Autocommit: each claim is its own transaction, as asyncpg's are (else a COMMIT is a second round trip).
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    cursor = conn.cursor(binary=True)

    async def claim(batch: Claim, server: str, now: float) -> list[int]:
        columns = [list(column) for column in zip(*batch, strict=True)]
        await cursor.execute(PSYCOPG_CLAIM, (*columns, server, now), prepare=True)
        return [row[0] for row in await cursor.fetchall()]

    return claim, conn.close


DRIVERS = {"asyncpg": asyncpg_claimer, "psycopg": psycopg_claimer}


# -- the measures


def sync_ms(directory: Path, count: int = 200) -> float:
    """The median time to write 8 kB and fdatasync it in `directory` (what a commit waits for, at least), in ms:
    with a fast sync the drivers' own costs show; on a disk that takes milliseconds to sync they matter less."""
    path = directory / "sync-probe"
    times = []
    with open(path, "wb", buffering=0) as f:
        for _ in range(count):
            start = time.perf_counter()
            f.write(b"\0" * 8192)
            os.fdatasync(f.fileno())
            times.append(time.perf_counter() - start)
    path.unlink()
    return statistics.median(times) * 1e3


@dataclass
class Tally:
    """One driver's figures of one phase, over every run."""

    seconds: float = 0.0
    cpu: float = 0.0
    claims: int = 0
    batches: int = 0
    granted: int = 0
    latencies: list[float] = field(default_factory=list)  # of each statement (s)
    rates: list[float] = field(default_factory=list)  # claims/s of each run

    def add(self, seconds: float, cpu: float, claims: int, batches: int, granted: int,
            latencies: list[float]) -> None:
        self.seconds += seconds
        self.cpu += cpu
        self.claims += claims
        self.batches += batches
        self.granted += granted
        self.latencies += latencies
        self.rates.append(claims / seconds)


async def timed(claim: Claimer, batches: list[Claim], server: str) -> tuple[list[float], int]:
    """Claim `batches` one after the other: the latency of each (s) and the claims granted."""
    latencies, granted = [], 0
    for batch in batches:
        start = time.perf_counter()
        got = await claim(batch, server, time.time())
        latencies.append(time.perf_counter() - start)
        granted += len(got)
    return latencies, granted


class Driver:
    """One driver's connections, each with the statement prepared, to a database of its own (the same claims
    then meet the same table): `a` alone for the single claims and batches, `a` and `b` for two servers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.servers: dict[str, tuple[Claimer, Callable[[], Awaitable[None]]]] = {}

    async def open(self, url: str) -> None:
        for server in ("a", "b"):
            claim, close = await DRIVERS[self.name](url)
            self.servers[server] = claim, close
            # Warm: PostgreSQL plans a prepared statement afresh for its first five executions, then settles.
            for n in range(10):
                await claim(claims([(1 << 23) + n], server, time.time()), server, time.time())

    async def close(self) -> None:
        for _, close in self.servers.values():
            await close()

    async def run(self, work: dict[str, list[Claim]]) -> tuple[float, float, list[float], int]:
        """Each server's batches one after the other, the servers at once: seconds, CPU seconds, latencies,
        claims granted."""
        cpu, start = time.process_time(), time.perf_counter()
        done = await asyncio.gather(*(timed(self.servers[server][0], batches, server)
                                      for server, batches in work.items()))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return seconds, cpu, [t for latencies, _ in done for t in latencies], sum(granted for _, granted in done)


PHASES = ("single", "batch", "pair")


async def measure(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, dict[str, Tally]]:
    """Each run does a share of every phase, and within it the drivers one after the other on the same claims, the
    first alternating: on a shared machine a busy moment then falls on both drivers' figures alike. New addresses
    for single claims and batches (from ranges of their own), for two servers a pool that fills as the runs go
    (so conflicts grow; both drivers' tables fill alike)."""
    rng = random.Random(1)
    fresh = iter(rng.sample(range(1 << 22), args.runs * (args.singles + args.batches * BATCH)))
    drivers = {name: Driver(name) for name in DRIVERS}
    tallies = {name: {phase: Tally() for phase in PHASES} for name in DRIVERS}
    for name, driver in drivers.items():
        await driver.open(urls[name])
    try:
        for run in range(args.runs):
            now = time.time()
            work = {
                "single": {"a": [claims([next(fresh)], "a", now) for _ in range(args.singles)]},
                "batch": {"a": [claims([next(fresh) for _ in range(BATCH)], "a", now) for _ in range(args.batches)]},
                "pair": {server: [claims(rng.sample(range(1 << 22, (1 << 22) + args.pool), BATCH), server, now)
                                  for _ in range(args.batches)] for server in ("a", "b")},
            }
            for i, phase in enumerate(PHASES):
                order = list(DRIVERS) if (run + i) % 2 == 0 else list(reversed(DRIVERS))
                for name in order:
                    seconds, cpu, latencies, granted = await drivers[name].run(work[phase])
                    batches = sum(map(len, work[phase].values()))
                    tallies[name][phase].add(seconds, cpu, sum(len(b) for w in work[phase].values() for b in w),
                                             batches, granted, latencies)
            print(f"bench: run {run + 1} of {args.runs}: " + ", ".join(
                f"{name} {phase} {tallies[name][phase].rates[-1]:,.0f}/s" for phase in PHASES for name in DRIVERS),
                file=sys.stderr)
    finally:
        for driver in drivers.values():
            await driver.close()
    for name in DRIVERS:
        for phase in ("single", "batch"):
            tally = tallies[name][phase]
            assert tally.granted == tally.claims, f"{name}: {tally.granted} of {tally.claims} new addresses granted"
    return tallies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def table(tallies: dict[str, dict[str, Tally]]) -> list[str]:
    def figures(t: dict[str, Tally]) -> list[float]:
        single, batch, pair = t["single"], t["batch"], t["pair"]
        conflicts = pair.claims - pair.granted
        return [
            single.claims / single.seconds, statistics.fmean(single.latencies) * 1e3, p99(single.latencies) * 1e3,
            single.cpu / single.claims * 1e6,
            batch.batches / batch.seconds, batch.claims / batch.seconds, p99(batch.latencies) * 1e3,
            batch.cpu / batch.claims * 1e6,
            pair.claims / pair.seconds, p99(pair.latencies) * 1e3, pair.cpu / pair.claims * 1e6,
            conflicts, conflicts / pair.claims,
        ]

    def spread(phase: str) -> str:
        """psycopg's claims/s over asyncpg's, run by run (the runs' lowest, median and highest)."""
        ratios = [p / a for a, p in zip(tallies["asyncpg"][phase].rates, tallies["psycopg"][phase].rates,
                                         strict=True)]
        return f"{min(ratios):.2f}, {statistics.median(ratios):.2f}, {max(ratios):.2f}"

    rows = [
        ("single claims: round trips/s", "{:,.0f}", spread("single")),
        ("single claims: mean latency (ms)", "{:.3f}", ""),
        ("single claims: p99 latency (ms)", "{:.3f}", ""),
        ("single claims: client CPU per round trip (µs)", "{:.0f}", ""),
        (f"batches of {BATCH}: batches/s", "{:,.0f}", spread("batch")),
        (f"batches of {BATCH}: claims/s", "{:,.0f}", ""),
        (f"batches of {BATCH}: p99 latency (ms)", "{:.3f}", ""),
        (f"batches of {BATCH}: client CPU per claim (µs)", "{:.1f}", ""),
        (f"two servers, batches of {BATCH}: claims/s together", "{:,.0f}", spread("pair")),
        ("two servers: p99 batch latency (ms)", "{:.3f}", ""),
        ("two servers: client CPU per claim (µs)", "{:.1f}", ""),
        ("two servers: conflicts (rows not returned)", "{:,.0f}", ""),
        ("two servers: conflicts, share of claims", "{:.1%}", ""),
    ]
    a, p = figures(tallies["asyncpg"]), figures(tallies["psycopg"])
    lines = ["| | asyncpg | psycopg | psycopg / asyncpg | run by run: lowest, median, highest |",
             "|---|---:|---:|---:|---:|"]
    for (label, fmt, runs), va, vp in zip(rows, a, p, strict=True):
        lines.append(f"| {label} | {fmt.format(va)} | {fmt.format(vp)} | {vp / va:.2f} | {runs} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__, runs=30)
    p.add_argument("--singles", type=int, default=200, help="single claims per run")
    p.add_argument("--batches", type=int, default=100, help="batches of 32 per run (and per server for two)")
    p.add_argument("--pool", type=int, default=16384, help="addresses the two servers share")
    p.add_argument("--fsync", choices=("on", "off"), default="on")
    args = p.parse_args(argv)
    import asyncpg
    import psycopg

    with Cluster(fsync=args.fsync == "on") as cluster:
        urls = {}
        for name in DRIVERS:
            cluster.psql(f"CREATE DATABASE {name} OWNER netboot", database="postgres")
            cluster.psql(f"{SCHEMA}; ALTER TABLE lease4 OWNER TO netboot", database=name)
            urls[name] = cluster.url_for(name, "netboot", cluster.password)
        version = cluster.psql("SHOW server_version").split()[0]
        sync = sync_ms(cluster.base)
        load = os.getloadavg()[0]
        tallies = asyncio.run(measure(args, urls))
        load_after = os.getloadavg()[0]
        for name in DRIVERS:
            # The database's word on the two servers: each address held by the server whose client holds it.
            wrong = cluster.psql("SELECT count(*) FROM lease4 WHERE (server = 'a') <> (mac LIKE '02:%')", name)
            assert wrong == "0", f"{name}: {wrong} leases held under another server's name"

    command = (f"python3 bench/db_driver.py --runs {args.runs} --singles {args.singles} --batches {args.batches} "
               f"--pool {args.pool} --fsync {args.fsync}")
    lines = [
        SECTION,
        "",
        "The statement that claims addresses on the DHCP path (one round trip per burst of DHCP messages: INSERT "
        "... ON CONFLICT DO UPDATE over unnest() of arrays, granting free and own addresses, returning the rows it "
        "took), prepared, on one connection per server, from one asyncio loop; asyncpg "
        f"{asyncpg.__version__} against psycopg {psycopg.__version__} (its async API, the C implementation "
        f"`{psycopg.pq.__impl__}`, binary parameters, autocommit). Server: Debian's PostgreSQL {version}, a "
        f"throwaway cluster (devtools/postgres.py) on a Unix socket, fsync {args.fsync}, on the same machine (whose "
        f"disk syncs 8 kB in {sync:.2f} ms, the median of 200 fdatasync calls). {args.runs} runs, each doing "
        f"{args.singles} single claims of new addresses, {args.batches} batches of {BATCH} new addresses, and two "
        f"servers at once each claiming {args.batches} batches of {BATCH} random addresses of a shared pool of "
        f"{args.pool:,} (a conflict: the other server's client held the address, so its row was not returned); "
        "in each, the drivers one after the other on the same claims, the first alternating, each on a database "
        "of its own. Rates are totals over the runs; the last column shows how much the ratio moved from run "
        f"to run (this machine is shared with other work: load average {load:.2f} before, {load_after:.2f} after). "
        "Client CPU: this process's, not the server's: what a "
        "driver costs the loop that answers DHCP. Batches are sorted by address (two servers upserting the same "
        "rows in different orders can deadlock).",
        "",
        *table(tallies),
        "",
        f"Command: `{command} --update` (`make bench-db`).",
        "",
    ]
    return publish(SECTION, "\n".join(lines), args.update)


if __name__ == "__main__":
    main()
