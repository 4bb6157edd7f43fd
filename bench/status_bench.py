#!/usr/bin/env python3
"""What the status listener costs: per-MAC script requests per second with it on and off (a fleet of 1,000
machines asking again and again, and a new MAC at every request), and the server's memory after 100,000 and
200,000 distinct MACs asked for their scripts (the record must stay bounded).

Both servers serve the small test system (`--dir`, HTTP only), side by side, fresh for each run; wrk takes
turns between them, a Lua script naming the MACs.

    python3 bench/status_bench.py [--runs 5] [--update]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402
import http_bench  # noqa: E402
from report import arguments, publish  # noqa: E402

SECTION = "## Status listener"

# Each wrk thread counts through MACs of its own: new ones forever, or with FLEET, the same FLEET over and over.
LUA = r"""
local counter, base = 0, 0
local fleet = tonumber(os.getenv("FLEET") or "0")
local threads = {}
function setup(thread) thread:set("id", #threads); table.insert(threads, thread) end
function init(args) base = id * 16777216 end
function request()
  counter = counter + 1
  local n, b = base + (fleet > 0 and counter % fleet or counter), {}
  for i = 5, 1, -1 do b[i] = n % 256; n = math.floor(n / 256) end
  local mac = string.format("02-%02x-%02x-%02x-%02x-%02x", b[1], b[2], b[3], b[4], b[5])
  return wrk.format("GET", "/machine/" .. mac .. "/boot.ipxe")
end
"""
WORKLOADS = {"a fleet of 1,000 machines": 1000, "a new MAC every request": 0}  # FLEET for the wrk thread
TURNS, SECONDS = 3, 5  # per run and workload, each server measured this many times, taking turns


def wrk(port: int, lua: Path, seconds: int, fleet: int) -> float:
    """Requests per second with 100 connections, from one thread: the server (one thread) keeps a core."""
    out = subprocess.run(["wrk", "-t1", "-c100", f"-d{seconds}s", "-s", str(lua), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True, env={**os.environ, "FLEET": str(fleet)}).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return float(out.split("Requests/sec:")[1].split()[0])


async def _scripts(port: int, macs: range, connections: int = 20) -> None:
    """GET the script of each MAC in `macs`, over keep-alive connections."""
    numbers = iter(macs)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in numbers:
                mac = "-".join(f"{b:02x}" for b in (0x02, *n.to_bytes(5, "big")))
                writer.write(f"GET /machine/{mac}/boot.ipxe HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{mac}: {head[:40]!r}")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))


def scripts(port: int, first: int, count: int) -> None:
    asyncio.run(_scripts(port, range(first, first + count)))


def requests_seen(port: int) -> int:
    """Script requests the status listener counted (netboot_requests_total for HTTP 200)."""
    text = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True, text=True,
                          check=True).stdout
    for line in text.splitlines():
        if line.startswith('netboot_requests_total{protocol="http",status="200"}'):
            return int(float(line.split()[-1]))
    return 0


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__)
    args = p.parse_args(argv)
    out = build.small_out()
    ports = {"status on": http_bench.free_port(), "status off": http_bench.free_port()}
    status_port = http_bench.free_port()

    def servers() -> dict[str, http_bench.Netboot]:
        return {"status on": http_bench.Netboot(out, ports["status on"], "--status", f"127.0.0.1:{status_port}"),
                "status off": http_bench.Netboot(out, ports["status off"], "--status", "none")}

    rps: dict[str, dict[str, list[float]]] = {w: {name: [] for name in ports} for w in WORKLOADS}
    rss: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "macs.lua"
        lua.write_text(LUA)
        for run in range(args.runs):  # fresh servers each run: no one process's luck decides
            running = servers()
            try:
                for workload, fleet in WORKLOADS.items():
                    for port in ports.values():
                        wrk(port, lua, 2, fleet)  # warm up
                    turns: dict[str, list[float]] = {name: [] for name in ports}
                    for turn in range(TURNS):  # short turns: the machine's slow drifts hit both servers alike
                        order = list(ports) if (run + turn) % 2 == 0 else list(reversed(ports))
                        for name in order:
                            turns[name].append(wrk(ports[name], lua, SECONDS, fleet))
                    for name in ports:
                        rps[workload][name].append(statistics.median(turns[name]))
                        print(f"bench: run {run + 1}, {workload}: {name} {rps[workload][name][-1]:.0f} requests/s",
                              file=sys.stderr)
            finally:
                for server in running.values():
                    server.stop()
        # Memory: fresh servers, then 100,000 new MACs, then 100,000 more.
        running = servers()
        try:
            for name, server in running.items():
                rss[name] = [http_bench.rss_mb(server.proc.pid)]
                for first in (0, 100_000):
                    scripts(ports[name], first, 100_000)
                    rss[name].append(http_bench.rss_mb(server.proc.pid))
            counted = requests_seen(status_port)
        finally:
            for server in running.values():
                server.stop()
    rows = []
    for workload, by in rps.items():
        on, off = statistics.median(by["status on"]), statistics.median(by["status off"])
        cost = statistics.median(1 - a / b for a, b in zip(by["status on"], by["status off"], strict=True))
        rows.append(f"| {workload} | {on:,.0f} | {off:,.0f} | {cost * 100:.1f}% |")
    lines = [
        SECTION, "",
        f"Measured by `python3 bench/status_bench.py --runs {args.runs}` (`make bench-status`) on "
        f"{time.strftime('%Y-%m-%d')}: per-MAC script requests (`wrk -t1 -c100`, a Lua script naming the "
        "MACs) against two `netboot serve --dir` (the small test system, HTTP only), one with "
        "`--status 127.0.0.1:PORT` and one with `--status none` (nothing recorded); fresh servers for each run, "
        f"in which they take {TURNS} turns of {SECONDS} s each (a run's figure is the median of its turns). "
        "Every request is recorded: a boot event, its machine's state, the counters.", "",
        f"| script requests/s, median of {args.runs} runs | status on | status off | cost of the status listener |",
        "|---|---:|---:|---:|",
        *rows, "",
        "Resident memory of the server (fresh, then after 100,000 and 200,000 distinct MACs asked for their "
        "scripts; the record keeps at most 10,000 machines seen without being configured, 20 events each, "
        "and the last 1,000 events):", "",
        "| server | fresh | after 100,000 MACs | after 200,000 MACs |", "|---|---:|---:|---:|",
        *(f"| {name} | {r[0]:.0f} MB | {r[1]:.0f} MB | {r[2]:.0f} MB |" for name, r in rss.items()), "",
        f"The status listener counted {counted:,} script requests in the memory run.", "",
    ]
    text = "\n".join(lines)
    return publish(SECTION, text, args.update)


if __name__ == "__main__":
    main()
