"""Leases in PostgreSQL (netboot.dhcp.lease_database), against a real throwaway cluster: the schema and its
version, and several servers' responders allocating from one range at once, each address to one client."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import asyncpg
import pytest
from dhcp_support import DISCOVER, NAK, REQUEST, ip, parse_reply, plain
from support import ROOT, fake_out

from devtools.postgres import Cluster
from netboot.core.errors import NetbootError
from netboot.core.machines import Machines
from netboot.dhcp import boot
from netboot.dhcp.exchange import Answer, Arrival, Responder
from netboot.dhcp.lease_database import LeaseDatabase
from netboot.dhcp.leases import Lease, Leases, Pool, to_text
from netboot.state import database

NET = IPv4Network("192.0.2.0/24")


async def check(url: str) -> None:
    """What a server does first with --database: its connection made, the schema brought up to date."""
    (await database.Link.open(url, logging.getLogger("test"), "site", "away", "back")).close()


def pool(first: str = "192.0.2.100", last: str = "192.0.2.199") -> Pool:
    return Pool(IPv4Address(first), IPv4Address(last), NET, 600)


class Site:
    """One netboot server's DHCP side on a shared database: its responder and its store, answering datagrams
    as DhcpServer does (an answer whose claim is lost is answered again, with the winner in view)."""

    def __init__(self, store: LeaseDatabase, address: str, p: Pool) -> None:
        self.store = store
        self.address = address
        self.leases = Leases(p, store)
        machines = Machines({}, {})
        self.responder = Responder(lambda: boot.Offerings(frozenset(), 8080, True), lambda: machines, self.leases)

    async def answer(self, data: bytes) -> Answer | None:
        for _ in range(3):
            result = self.responder.handle(Arrival(data, ("0.0.0.0", 68), 67, 1,
                                                   IPv4Interface(f"{self.address}/24")))
            if not isinstance(result, Answer):
                return None
            batch = self.store.take()
            lost = await self.store.write(batch) if batch is not None else set()
            if result.claim is None or result.claim[1] not in lost:
                return result
            self.leases.lost(*result.claim)
        return None


async def open_site(cluster: Cluster, name: str, address: str, p: Pool | None = None) -> Site:
    return Site(await LeaseDatabase.open(cluster.url, name), address, p or pool())


def discover(mac: str) -> bytes:
    return plain(DISCOVER, mac)


def request(mac: str, address: str, server: str | None) -> bytes:
    """SELECTING (naming its server) or INIT-REBOOT (server None)."""
    return plain(REQUEST, mac, extra=[(50, ip(address)), *([(54, ip(server))] if server else [])])


def yiaddr(answer: Answer | None) -> str:
    assert answer is not None
    return parse_reply(answer.data).yiaddr


async def test_the_schema_is_made_once_and_a_newer_one_is_refused(postgres: Cluster) -> None:
    await check(postgres.url)
    await check(postgres.url)  # again: nothing to do
    assert postgres.psql("SELECT version FROM netboot_schema") == str(database.VERSION)
    postgres.psql(f"UPDATE netboot_schema SET version = {database.VERSION + 1}")
    with pytest.raises(NetbootError, match=f"schema is version {database.VERSION + 1}, newer than this netboot's "
                                           rf"\({database.VERSION}\)"):
        await check(postgres.url)


async def test_servers_starting_together_make_the_schema_once(postgres: Cluster) -> None:
    await asyncio.gather(*(check(postgres.url) for _ in range(6)))
    assert postgres.psql("SELECT count(*) FROM netboot_schema") == "1"


async def test_bad_urls_and_credentials_are_one_line_errors(postgres: Cluster) -> None:
    for url, fragment in ((postgres.url_for("netboot", password="wrong"), "refused the credentials"),
                          (postgres.url_for("nosuchdb"), "nosuchdb"),
                          ("postgresql:///netboot?host=/nonexistent", "cannot connect"),
                          ("mysql://db/netboot", "expected a PostgreSQL URL")):
        with pytest.raises(NetbootError, match=fragment) as e:
            await check(url)
        assert "\n" not in str(e.value) and "wrong" not in str(e.value)


def test_serve_with_a_bad_database_exits_2_with_one_line(postgres: Cluster, tmp_path: Path) -> None:
    out = fake_out(tmp_path / "out")
    for url, fragment in ((postgres.url_for("netboot", password="wrong"), "refused the credentials"),
                          ("nonsense", "expected a PostgreSQL URL")):
        done = subprocess.run([sys.executable, "-m", "netboot", "serve", "--dir", str(out), "--http",
                               "127.0.0.1:0", "--no-tftp", "--status", "none", "--database", url],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], done.stderr


async def test_two_servers_give_each_address_to_one_client(postgres: Cluster) -> None:
    """Two servers, each hearing only half of the clients (their views never see the other's offers), on a
    range of 100: 100 clients get 100 distinct addresses, and the database holds each once."""
    a, b = await open_site(postgres, "a", "192.0.2.2"), await open_site(postgres, "b", "192.0.2.3")
    macs = [f"52:54:00:12:{i // 256:02x}:{i % 256:02x}" for i in range(100)]
    got: dict[str, str] = {}
    for i, mac in enumerate(macs):
        site = (a, b)[i % 2]
        offer = await site.answer(discover(mac))
        ack = await site.answer(request(mac, yiaddr(offer), site.address))
        got[mac] = yiaddr(ack)
    assert len(set(got.values())) == 100
    rows = postgres.psql("SELECT count(*), count(DISTINCT mac) FROM lease4 WHERE state = 0")
    assert rows == "100|100"
    # The range is full: a stranger gets nothing from either.
    assert await a.answer(discover("52:54:00:12:ff:ff")) is None
    assert await b.answer(discover("52:54:00:12:ff:ff")) is None
    a.store.close()
    b.store.close()


async def test_a_lease_granted_by_one_server_is_renewed_by_the_other(postgres: Cluster) -> None:
    a = await open_site(postgres, "a", "192.0.2.2")
    mac = "52:54:00:12:00:01"
    offer = await a.answer(discover(mac))
    ip = yiaddr(await a.answer(request(mac, yiaddr(offer), a.address)))
    a.store.close()  # a is gone (its view with it)
    b = await open_site(postgres, "b", "192.0.2.3")
    # INIT-REBOOT (no server id) and RENEW (ciaddr) of a's lease: b acknowledges the same address.
    assert yiaddr(await b.answer(request(mac, ip, None))) == ip
    assert postgres.psql(f"SELECT server FROM lease4 WHERE mac = '{mac}'") == "b"
    # Another client asking for it is refused: a NAK, not a second lease.
    nak = await b.answer(request("52:54:00:12:00:02", ip, None))
    assert nak is not None and parse_reply(nak.data).type == NAK
    b.store.close()


async def test_an_offer_not_taken_is_released(postgres: Cluster) -> None:
    a, b = await open_site(postgres, "a", "192.0.2.2"), await open_site(postgres, "b", "192.0.2.3")
    mac = "52:54:00:12:00:03"
    offered_a, offered_b = yiaddr(await a.answer(discover(mac))), yiaddr(await b.answer(discover(mac)))
    # Both offers stand (each server chooses at random: most often two addresses, held for the one client).
    held = postgres.psql(f"SELECT count(*) FROM lease4 WHERE mac = '{mac}' AND state = 1")
    assert held == ("1" if offered_a == offered_b else "2")
    # It takes a's: b, seeing the REQUEST name a, releases its offer; a's claim is the lease.
    assert await b.answer(request(mac, offered_a, a.address)) is None
    await b.store.write(b.store.take())
    yiaddr(await a.answer(request(mac, offered_a, a.address)))
    assert postgres.psql(f"SELECT state, server FROM lease4 WHERE mac = '{mac}'") == "0|a"
    a.store.close()
    b.store.close()


async def test_a_late_offer_leaves_the_other_servers_lease(postgres: Cluster) -> None:
    """Both servers hear the DISCOVER; a answers and ACKs before b has made its offer's claim. b's offer, then its
    release when it sees the REQUEST name a, leave a's lease in the table: the address stays the client's."""
    a, b = await open_site(postgres, "a", "192.0.2.2"), await open_site(postgres, "b", "192.0.2.3")
    mac = "52:54:00:12:00:04"
    offered = yiaddr(await a.answer(discover(mac)))
    assert yiaddr(await a.answer(request(mac, offered, a.address))) == offered
    # (b does not know a's lease yet; the client asks for the address, as a client that had it does.)
    assert yiaddr(await b.answer(plain(DISCOVER, mac, extra=[(50, ip(offered))]))) == offered
    assert await b.answer(request(mac, offered, a.address)) is None
    await b.store.write(b.store.take())
    assert postgres.psql(f"SELECT address, state, server FROM lease4 WHERE mac = '{mac}'") == (
        f"{int(IPv4Address(offered))}|0|a")
    a.store.close()
    b.store.close()


async def test_many_concurrent_claims_never_hold_an_address_twice(postgres: Cluster) -> None:
    """Eight servers claim random addresses of a range of 64 for 1,280 clients at once, in groups: whatever the
    interleaving, no two clients ever won the same address (the leases never expire here), and what the database
    holds is what its winners were told."""
    stores = [await LeaseDatabase.open(postgres.url, f"s{i}") for i in range(8)]
    rng = random.Random(7)
    winners: dict[str, set[str]] = {}

    async def claims(store: LeaseDatabase, n: int) -> None:
        for k in range(40):  # (each client claims once: a client that moves frees its address for another)
            group = {f"192.0.2.{100 + rng.randrange(64)}": f"52:54:00:{n:02x}:{k:02x}:{i:02x}" for i in range(4)}
            for address, mac in group.items():
                store.record(Lease(mac, address, 4e9, "", b""))
            lost = await store.write(store.take())
            for address in group.keys() - lost:
                winners.setdefault(address, set()).add(group[address])

    await asyncio.gather(*(claims(s, n) for n, s in enumerate(stores)))
    assert winners and all(len(macs) == 1 for macs in winners.values()), winners
    connection = await asyncpg.connect(postgres.url)
    try:
        held = {database_row["address"]: database_row["mac"] for database_row in
                await connection.fetch("SELECT address, mac FROM lease4 WHERE state = 0")}
    finally:
        await connection.close()
    assert {to_text(a): m for a, m in held.items()}.items() <= {a: next(iter(m)) for a, m in winners.items()}.items()
    for s in stores:
        s.close()


async def test_the_database_away_grants_nothing_and_its_return_resumes_within_seconds(
        postgres: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    site = await open_site(postgres, "a", "192.0.2.2")
    assert yiaddr(await site.answer(discover("52:54:00:14:00:00")))
    postgres.stop()
    for i in range(1, 30):
        assert await site.answer(discover(f"52:54:00:14:00:{i:02x}")) is None
    away = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(away) == 1, [r.getMessage() for r in caplog.records]
    postgres.start()
    back = asyncio.get_running_loop().time()
    offer = None
    while offer is None and asyncio.get_running_loop().time() - back < 30:  # (it tries again every RETRY s)
        offer = await site.answer(discover("52:54:00:14:01:00"))
        await asyncio.sleep(0.1)
    assert offer is not None, "no address granted 30 s after the database came back"
    assert len([r for r in caplog.records if "is back" in r.getMessage()]) == 1
    site.store.close()
