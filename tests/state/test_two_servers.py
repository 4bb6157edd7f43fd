"""Two `netboot serve --dhcp RANGE --database URL` on one namespace LAN and one PostgreSQL: every address to one
client, each server renewing the other's leases, one of them killed (SIGKILL) mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lan_support import LanServer, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import fake_out

from devtools.lan import Host, Lan
from devtools.postgres import Cluster

DORA = Path(__file__).resolve().parent.parent / "dhcp" / "dora.py"
RANGE = "192.0.2.100-192.0.2.199"
A, B, CLIENT = "192.0.2.10", "192.0.2.11", "192.0.2.50"

pytestmark = pytest.mark.root


def start(lan: Lan, name: str, address: str, out: Path, cluster: Cluster) -> LanServer:
    server = serve_in(lan.host(name, f"{address}/24"), "--dir", out, "--no-tftp", "--status", "none",
                      "--dhcp", RANGE, "--database", cluster.url, "--name", name)
    deadline = time.monotonic() + 20
    while "dhcp: DHCP server for" not in server.log:
        assert server.proc.poll() is None and time.monotonic() < deadline, f"netboot serve:\n{server.log}"
        time.sleep(0.05)
    return server


def dora(client: Host, server: str, first: int, count: int, *extra: str) -> dict[str, str]:
    """MAC -> address ACKed, for `count` machines from number `first`, relayed to `server`."""
    out = client.run(
        [sys.executable, DORA, "--server", server, "--relay", CLIENT, "--first", str(first), "--count", str(count),
         "--timeout", "1", "--tries", "3", *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {mac: address for mac, address, *_ in (line.split() for line in out.stdout.splitlines())}


def test_two_servers_share_a_range_and_survive_a_kill(lan: Lan, postgres: Cluster, tmp_path: Path) -> None:
    out = fake_out(tmp_path / "out")
    a, b = start(lan, "a", A, out, postgres), start(lan, "b", B, out, postgres)
    client = lan.host("client", f"{CLIENT}/24")
    try:
        # 90 machines, a third through each relay target in turn: each hears only its own third.
        got = {**dora(client, A, 0, 30), **dora(client, B, 30, 30), **dora(client, A, 60, 30)}
        assert "-" not in got.values(), got
        assert len(set(got.values())) == 90
        held = postgres.psql("SELECT count(*), count(DISTINCT address), count(DISTINCT mac) FROM lease4 "
                             "WHERE state = 0")
        assert held == "90|90|90"
        assert set(postgres.psql("SELECT DISTINCT server FROM lease4").split()) == {"a", "b"}

        # a dies mid-stream: what it ACKed stays; b acknowledges every machine its own address again (b knows
        # a's leases from the database), and new machines get addresses nobody holds.
        stream = client.popen(
            [sys.executable, DORA, "--server", A, "--relay", CLIENT, "--first", "90", "--count", "5",
             "--timeout", "0.3", "--tries", "1"], stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(stream.stdout))
        reader.start()
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        stream.wait(timeout=60)
        reader.join()
        got.update({mac: address for mac, address, *_ in (line.split() for line in lines) if address != "-"})
        time.sleep(1.5)  # b follows the table's changes every half second
        again = dora(client, B, 0, 95)
        assert {mac: again[mac] for mac in got} == got
        fresh = dora(client, B, 95, 5)
        assert "-" not in fresh.values() and not set(fresh.values()) & set(again.values())
        assert postgres.psql("SELECT count(*) FROM (SELECT address FROM lease4 GROUP BY address "
                             "HAVING count(DISTINCT mac) > 1) t") == "0"
    finally:
        for server in (a, b):
            if server.proc.poll() is None:
                server.stop()


def test_the_database_stopped_under_two_servers(lan: Lan, postgres: Cluster, tmp_path: Path) -> None:
    """The database stopped for 10 s under two servers: known machines keep getting their scripts, no address is
    granted (so none twice), and new leases resume within seconds of its start, with no restart of netboot."""
    out = fake_out(tmp_path / "out")
    a, b = start(lan, "a", A, out, postgres), start(lan, "b", B, out, postgres)
    client = lan.host("client", f"{CLIENT}/24")
    try:
        before = {**dora(client, A, 0, 10), **dora(client, B, 10, 10)}
        assert "-" not in before.values() and len(set(before.values())) == 20
        postgres.stop()
        stopped = time.monotonic()
        try:
            while time.monotonic() - stopped < 10:
                for server in (A, B):
                    mac = next(iter(before)).replace(":", "-")
                    fetched = client.run(["curl", "-sf", f"http://{server}:8080/machine/{mac}/boot.ipxe"],
                                         capture_output=True, text=True, timeout=30)
                    assert fetched.returncode == 0 and fetched.stdout.startswith("#!ipxe"), fetched.stderr
                during = dora(client, A, 20, 3, "--timeout", "0.5", "--tries", "1")
                assert set(during.values()) == {"-"}, during
        finally:
            postgres.start()
        started = time.monotonic()
        while "-" in dora(client, B, 30, 1, "--timeout", "0.5", "--tries", "1").values():
            assert time.monotonic() - started < 15, b.log
        print(f"a new lease {time.monotonic() - started:.1f} s after the database started again")
        after = {**dora(client, A, 31, 10), **dora(client, B, 41, 10)}
        assert "-" not in after.values()
        assert not set(after.values()) & set(before.values())
        assert postgres.psql("SELECT count(*) FROM (SELECT address FROM lease4 GROUP BY address "
                             "HAVING count(DISTINCT mac) > 1) t") == "0"
        for server in (a, b):
            assert server.log.count("dhcp: the database") == 2, server.log  # away, back
    finally:
        for server in (a, b):
            server.stop()
