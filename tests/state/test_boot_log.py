"""The site's boot record in PostgreSQL (netboot.state.boot_log), against a real throwaway cluster: one server's
rows reach another in order and whole, whatever text a client put in them, and a server's earlier rows are read
back at its start."""

from __future__ import annotations

import asyncio
import logging
import time

from devtools.postgres import Cluster
from netboot.state import database
from netboot.state.boot_log import BootLog

log = logging.getLogger("test")


def row(path: str, mac: str | None = "52:54:00:00:7b:01", facts: tuple = (), client: str = "192.0.2.5") -> tuple:
    return (time.time(), client, "http", path, "200", True, 100, mac, "rack", "b1", 0, facts, "")


async def link(cluster: Cluster) -> database.Link:
    return await database.Link.open(cluster.url, log, "site", "away", "back")


async def until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def test_rows_reach_the_other_server_in_order_whatever_their_text(postgres: Cluster) -> None:
    got_a: list[tuple] = []
    got_b: list[tuple] = []
    link_a, link_b = await link(postgres), await link(postgres)
    a = await BootLog.open(link_a, "a", got_a.extend)
    b = await BootLog.open(link_b, "b", got_b.extend)
    try:
        hostile = ["/machine/x/\udcff\udc80/boot.ipxe", "/nul\x00here", "/\ud800lone", "/fine/boot.ipxe"]
        a.add(row(p) for p in hostile)
        a.add([row("/facts", facts=(("serial", "S\x00N\udcfe"), ("uuid", "u")))])
        a.add(row(f"/{i}") for i in range(5000))  # more than one batch
        await until(lambda: len(got_b) == 5005)
        assert [r[3] for r in got_b[:4]] == ["/machine/x/\\udcff\\udc80/boot.ipxe", "/nul\\x00here", "/\\ud800lone",
                                             "/fine/boot.ipxe"]
        assert dict(got_b[4][11]) == {"serial": "S\\x00N\\udcfe", "uuid": "u"}
        assert [r[3] for r in got_b[5:]] == [f"/{i}" for i in range(5000)]
        assert {r[12] for r in got_b} == {"a"} and not got_a  # a is not told its own rows
    finally:
        for part in (a, b, link_a, link_b):
            part.close()
    # A server started again reads the site's last rows, its own earlier ones too, and numbers on from them.
    again: list[tuple] = []
    link_a = await link(postgres)
    a = await BootLog.open(link_a, "a", again.extend)
    try:
        assert len(again) == 5005 and again[-1][3] == "/4999"
        a.add([row("/after")])
        await until(lambda: postgres.psql("SELECT max(seq) FROM boot_event WHERE server = 'a'") == "5006")
    finally:
        a.close()
        link_a.close()
