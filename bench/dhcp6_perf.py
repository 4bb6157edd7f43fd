#!/usr/bin/env python3
"""`make bench-dhcp`: netboot's DHCPv6 server (`--dhcp6 START-END`) against ISC Kea's kea-dhcp6, side by side.

On an IPv6-only LAN in network namespaces, a server host (2001:db8::1/64) runs either `kea-dhcp6` (memfile
leases, persisted to its CSV file) or `netboot serve --dhcp6`, on the same range and lifetimes; a client host
(2001:db8::2/64) runs ISC's `perfdhcp -6` on its interface, as clients do: Solicits from its link-local address
to ff02::1:2, each from a new DUID, at each rate for 20 s. Reported: exchanges completed (Solicit → Advertise →
Request → Reply: Requests answered), the average delays Solicit→Advertise and Request→Reply as perfdhcp counts
them, and netboot / Kea as ratios. The range is 2001:db8::1:0-2001:db8::f:ffff (983,040 addresses: room for
every new client of the fastest run).

    python3 bench/dhcp6_perf.py [--runs 1] [--rates 1000] [--seconds 20] [--update]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build  # noqa: E402
from dhcp_perf import Perf, Server, load, need, perf_row, run_perfdhcp  # noqa: E402
from report import arguments, publish  # noqa: E402

from devtools.lan import Host, Lan  # noqa: E402

SECTION = "## DHCPv6: perfdhcp -6 against Kea"
SERVER, CLIENT = "2001:db8::1", "2001:db8::2"
RANGE = ("2001:db8::1:0", "2001:db8::f:ffff")
LEASE_TIME = 3600


class Server6(Server):
    """kea-dhcp6 or netboot serve --dhcp6 in the server host, on RANGE, with a fresh lease store."""

    def __init__(self, kind: str, host: Host, work: Path) -> None:
        self.kind = kind
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
        self.log = self.dir / "log"
        if kind == "kea":
            config = {"Dhcp6": {
                "interfaces-config": {"interfaces": ["eth0"]},
                "data-directory": str(self.dir),
                "lease-database": {"type": "memfile", "persist": True, "name": str(self.dir / "leases6.csv"),
                                   "lfc-interval": 3600},
                "preferred-lifetime": LEASE_TIME, "valid-lifetime": LEASE_TIME,
                "renew-timer": LEASE_TIME // 2, "rebind-timer": LEASE_TIME * 4 // 5,
                "subnet6": [{"subnet": "2001:db8::/64", "interface": "eth0",
                             "pools": [{"pool": f"{RANGE[0]}-{RANGE[1]}"}]}],
                "loggers": [{"name": "kea-dhcp6", "output_options": [{"output": str(self.log)}],
                             "severity": "WARN"}],
            }}
            (self.dir / "kea.json").write_text(json.dumps(config))
            env = {**os.environ, "KEA_PIDFILE_DIR": str(self.dir), "KEA_LOCKFILE_DIR": str(self.dir)}
            argv = [need("kea-dhcp6"), "-c", str(self.dir / "kea.json")]
        else:
            env = dict(os.environ)
            argv = [sys.executable, "-m", "netboot", "serve", "--dir", str(build.small_out()), "--no-tftp",
                    "--http", "127.0.0.1:0", "--status", "127.0.0.1:0", "--dhcp6", f"{RANGE[0]}-{RANGE[1]}",
                    "--dhcp6-lease-time", str(LEASE_TIME), "--state-dir", str(self.dir / "state")]
        self._start(host, argv, env, 547)


def perfdhcp6(client: Host, rate: int, seconds: int) -> Perf:
    perf, text = run_perfdhcp(client, ["-6", "-l", "eth0", "-r", str(rate)], seconds,
                              ("SOLICIT-ADVERTISE", "REQUEST-REPLY"))
    if any(n != "0" for n in re.findall(r"non unique addresses: (\d+)", text)):
        raise RuntimeError(f"an address given twice:\n{text[-3000:]}")
    return perf


def main(argv: list[str] | None = None) -> str:
    p = arguments(__doc__, runs=1)
    p.add_argument("--rates", default="1000")
    p.add_argument("--seconds", type=int, default=20)
    args = p.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    build.small_out()
    results: dict[tuple[str, int], list[Perf]] = {}
    run_loads: dict[tuple[int, int], str] = {}
    with tempfile.TemporaryDirectory(prefix="dhcp6-perf-") as tmp, Lan("nbperf6") as lan:
        work = Path(tmp)
        server_host = lan.host("server", f"{SERVER}/64")
        client = lan.host("perf", f"{CLIENT}/64")
        server_host.link_local()
        client.link_local()  # perfdhcp -6 sends from it; the servers answer to it
        for run in range(args.runs):
            for rate in rates:
                run_loads[(rate, run)] = load().split()[0]
                for kind in ("kea", "netboot") if run % 2 == 0 else ("netboot", "kea"):
                    server = Server6(kind, server_host, work)
                    try:
                        before = server.cpu()
                        result = perfdhcp6(client, rate, args.seconds)
                        result.cpu = server.cpu() - before
                    finally:
                        server.stop()
                    results.setdefault((kind, rate), []).append(result)
                    print(f"{kind} {rate}/s: {result}", flush=True)

    def med(kind: str, rate: int, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[(kind, rate)])

    def row(label: str, kea: Perf | None, nb: Perf | None, rate: int) -> str:
        get = (lambda kind, field: med(kind, rate, field)) if kea is None or nb is None else (
            lambda kind, field: getattr(kea if kind == "kea" else nb, field))
        return perf_row(label, get)

    lines = [
        SECTION,
        "",
        f"ISC's `perfdhcp -6` (Debian's kea-admin) on an IPv6-only LAN in network namespaces, as clients send: "
        f"Solicits from its link-local address to ff02::1:2, each from a new DUID (drawn from a million), at each "
        f"rate for {args.seconds} s; against `kea-dhcp6` (Debian's kea-dhcp6-server; memfile leases persisted to "
        f"its CSV file, not fsynced) and against `netboot serve --dhcp6` (journal fdatasynced before each Reply "
        f"that grants a lease, the Replies of one burst sharing one fdatasync), on the same range "
        f"{RANGE[0]}-{RANGE[1]}, lifetimes {LEASE_TIME} s; taking turns, {args.runs} run(s). Completed: Requests "
        f"answered by a Reply. Delays are perfdhcp's averages; CPU is what the server used in the run. The machine "
        f"(2 cores) is shared with other test runs and with perfdhcp itself, so every run is shown with the load "
        f"average (1 minute) before it, then the medians.",
        "",
        "| rate, run | completed: Kea | netboot | ratio | Solicit->Advertise: Kea | netboot | Request->Reply: Kea | "
        "netboot | CPU: Kea | netboot |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        for run in range(args.runs):
            lines.append(row(f"{rate}/s, run {run + 1} (load {run_loads[(rate, run)]})",
                             results[("kea", rate)][run], results[("netboot", rate)][run], rate))
        if args.runs > 1:
            lines.append(row(f"**{rate}/s, median**", None, None, rate))
    lines += [
        "",
        f"Command: `python3 bench/dhcp6_perf.py --runs {args.runs} --rates {args.rates}` (`make bench-dhcp`); each "
        f"perfdhcp run is `perfdhcp -6 -l eth0 -r RATE -p {args.seconds} -R 1000000 -W 1000000`.",
        "",
    ]
    return publish(SECTION, "\n".join(lines), args.update)


if __name__ == "__main__":
    main()
