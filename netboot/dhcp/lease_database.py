"""Leases in the site's PostgreSQL database, shared by every server of the site (`netboot serve --database`).

The database decides who gets an address: its key is the address (netboot.state.database), and every claim (an
offer, a lease, a decline) is an insert that, on a conflict, takes the row over only when the row is the same
client's or has expired. A claim not taken over was won by another server: it is reported lost, the server does
not answer with it, and the allocator chooses again with the winner's row in view (Kea, several servers on one
lease database: a duplicate key sends the allocator to another address).

Each server keeps the lease table in memory as well (netboot.dhcp.leases), to choose without asking: the
database is asked once per group of claims (the same group commit as the journal's), never scanned per packet.
That view is fed by this server's claims, by the rows that beat them, by the rows any server changed since it
last looked (every FOLLOW seconds: each write takes a number from one sequence), and by a full read at start,
every RESYNC seconds and when the database comes back. A stale view costs a lost claim, never a duplicate.

When the database cannot be reached, no claim is made: no address is granted, nothing can be given twice, and the
store tries again every second (database.Link); one log line when it goes away, one when it is back.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from netboot.dhcp.leases import Lease, to_int, to_text
from netboot.state import database

log = logging.getLogger("netboot.dhcp")

LEASED, OFFERED, DECLINED = 0, 1, 2
RESYNC = 30.0  # seconds between full reads of the lease table
FOLLOW = 0.5  # seconds between reads of the rows changed since the last (by any server)
QUIET = 10.0  # seconds between log lines about failed claims

# An offer to the client that holds the address already is won and leaves its lease as it is: a server that heard
# the DISCOVER late must not turn another server's ACKed lease into its own offer, which its release of that offer
# (the client took the other server's: unoffered, in _WRITE) would then delete, freeing an address a client holds.
_KEEP = "excluded.state = 1 AND l.state = 0 AND l.expires > $8"
_SET = ", ".join(f"{column} = CASE WHEN {_KEEP} THEN l.{column} ELSE excluded.{column} END"
                 for column in ("client_id", "expires", "state", "hostname", "server"))
# (In the statements below, {table} is the lease table and {cast} its address column's type: Table.)
# One statement, one round trip and its own transaction, for a whole group of claims and releases: row locks are
# held for that statement alone, never across round trips while this server's loop is busy (the other servers'
# claims of the same rows wait on them). Rows not returned were lost: another client holds them.
# Released: a client's other offers from this server end when it takes a lease, and its lease ends where it moved
# or declined. Unoffered: the client took another server's offer, so this server's offers to it end (the winner's
# row may be the same row: both offered it the same address; it is the winner's then). Each server ends only its
# own offers (the other's, when it hears the REQUEST; else they lapse): two servers' statements deleting each
# other's rows in different orders would wait on each other. Neither touches the addresses claimed now (a row is
# changed once in one statement).
_WRITE = """
WITH wanted AS (
    SELECT * FROM unnest($1::{cast}[], $2::text[], $3::bytea[], $4::float8[], $5::int2[], $6::text[])
        AS w(address, mac, client_id, expires, state, hostname)
), claimed AS (
    INSERT INTO {table} AS l (address, mac, client_id, expires, state, hostname, server)
    SELECT address, mac, client_id, expires, state, hostname, $7 FROM wanted ORDER BY address
    ON CONFLICT (address) DO UPDATE SET mac = excluded.mac, {set}, changed = nextval('{table}_changes')
    WHERE l.mac = excluded.mac OR l.expires <= $8
    RETURNING l.address
), released AS (
    DELETE FROM {table} WHERE mac = ANY($9::text[]) AND NOT (address = ANY($1::{cast}[]))
        AND ((state = 1 AND server = $7) OR (state = 0 AND mac = ANY($10::text[])))
), unoffered AS (
    DELETE FROM {table} WHERE mac = ANY($11::text[]) AND state = 1 AND server = $7
        AND NOT (address = ANY($1::{cast}[]))
)
SELECT address FROM claimed
"""


@dataclass(frozen=True)
class Table:
    """A lease table and how its addresses are spelled there."""

    name: str
    cast: str  # the address column's type
    encode: Callable[[str], Any]  # an address as the view spells it -> as the table has it (in address order)
    decode: Callable[[Any], str]

    @functools.cached_property
    def statements(self) -> dict[str, str]:
        rows = f"SELECT address, mac, client_id, expires, state, hostname, changed FROM {self.name}"
        return {"write": _WRITE.format(table=self.name, cast=self.cast, set=_SET), "rows": rows,
                "rows_at": rows + f" WHERE address = ANY($1::{self.cast}[])",
                "changed": rows + " WHERE changed > $1 ORDER BY changed LIMIT 4096"}


LEASE4 = Table("lease4", "bigint", to_int, to_text)
# DHCPv6's (netboot.dhcp6.leases): `mac` is the lease's key there, the client's DUID and the IA's IAID.
LEASE6 = Table("lease6", "inet", ipaddress.IPv6Address, str)


@dataclass(frozen=True)
class Row:
    """A row of a lease table as the view learns it."""

    lease: Lease
    state: int


@dataclass
class Batch:
    claims: dict[str, Row] = field(default_factory=dict)  # address -> the claim (the last one for it)
    released: set[str] = field(default_factory=set)  # MACs whose offers (and leases elsewhere) end
    unoffered: set[str] = field(default_factory=set)  # MACs that took another server's offer

    def __bool__(self) -> bool:
        return bool(self.claims or self.released or self.unoffered)


class LeaseDatabase:
    """A LeaseStore whose writes are claims that can be lost (see the module's docstring)."""

    claims_offers = True  # offers are claimed too: an OFFER waits for its claim, as an ACK for its lease

    def __init__(self, url: str, name: str, records: list[asyncpg.Record], connection: asyncpg.Connection,
                 table: Table = LEASE4) -> None:
        self.url = url
        self.name = name
        self._table = table
        self._sql = table.statements
        self._rows = self._rows_of(records)
        self._link = database.Link(url, connection, log, "dhcp", "no address is granted until it is back",
                                   "granting addresses again")
        self._link.on_back.append(self._back)
        self._batch = Batch()
        self._synced = time.monotonic()
        self._seen = max((r["changed"] for r in records), default=0)  # the last change read
        self._following = asyncio.get_running_loop().create_task(self._follow())
        self._failed_logged = -QUIET
        self.learn: Callable[[list[Row]], None] | None = None  # the view's (Leases.learn), set by it
        self.closed = False

    @classmethod
    async def open(cls, url: str, name: str, table: Table = LEASE4) -> LeaseDatabase:
        """Connected, the schema ready, the table read; a one-line NetbootError if the database cannot be used."""
        connection = await database.connect(url)
        try:
            await database.prepare(connection)
            records = await connection.fetch(table.statements["rows"])
        except BaseException:
            await connection.close()
            raise
        log.info("dhcp: leases in %s of the database %s (%d rows), as server %s", table.name, database.shown(url),
                 len(records), name)
        return cls(url, name, records, connection, table)

    @property
    def reachable(self) -> bool:
        return self._link.reachable

    # LeaseStore

    def load(self) -> list[Lease]:
        return [row.lease for row in self._rows if row.state == LEASED]

    def held(self) -> list[Row]:
        """The offers and declines at start (another server's), for the view."""
        rows, self._rows = [row for row in self._rows if row.state != LEASED], []
        return rows

    def record(self, lease: Lease) -> None:
        self._batch.claims[lease.ip] = Row(lease, LEASED)
        self._batch.released.add(lease.mac)

    def offer(self, lease: Lease) -> None:
        self._batch.claims[lease.ip] = Row(lease, OFFERED)

    def decline(self, lease: Lease) -> None:
        self._batch.claims[lease.ip] = Row(lease, DECLINED)
        self._batch.released.add(lease.mac)

    def forget(self, mac: str) -> None:
        self._batch.released.add(mac)

    def release_offer(self, mac: str) -> None:
        self._batch.unoffered.add(mac)

    def take(self) -> Batch | None:
        batch, self._batch = self._batch, Batch()
        return batch or None

    async def write(self, batch: Batch) -> set[str]:
        """Make the claims; returns the addresses whose claims were lost (every one, when the database cannot be
        reached), with the rows that hold them told to the view."""
        connection = self._link.connection
        if connection is None or connection.is_closed():
            self._link.away(None)
            return set(batch.claims)
        # In address order, as every server's: transactions that lock rows in one order do not deadlock.
        encode = self._table.encode
        addresses = sorted(encode(ip) for ip in batch.claims)
        claims = [batch.claims[self._table.decode(a)] for a in addresses]
        now = time.time()
        leased_macs = [r.lease.mac for r in claims if r.state != OFFERED]
        try:
            async with self._link.turn:
                got = await connection.fetch(
                    self._sql["write"], addresses, [r.lease.mac for r in claims], [r.lease.client_id for r in claims],
                    [r.lease.expires for r in claims], [r.state for r in claims],
                    [r.lease.hostname for r in claims], self.name, now, sorted(batch.released), leased_macs,
                    sorted(batch.unoffered))
                won = {self._table.decode(r[0]) for r in got}
                lost = set(batch.claims) - won
                winners = (self._rows_of(await connection.fetch(self._sql["rows_at"], [encode(ip) for ip in lost]))
                           if lost else [])
                # A claim lost says the view is behind: what changed since it last looked, before the retries.
                changed = await connection.fetch(self._sql["changed"], self._seen) if lost else []
        except database.GONE as e:
            self._link.away(e)
            return set(batch.claims)
        except (asyncpg.PostgresError, ValueError) as e:
            # A deadlock or a serialization failure between servers, or a value the database refuses (a hostname
            # that is not Unicode): nothing was made; the clients ask again.
            self._failed(e)
            return set(batch.claims)
        if winners and self.learn is not None:
            self.learn(winners)
        self._learn(changed)
        return lost

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._failed_logged >= QUIET:
            log.warning("dhcp: claims not made, their clients will ask again: %s", database.line(error))
            self._failed_logged = now

    def restore(self, batch: object) -> None:
        """Nothing to restore: a claim not made is lost, and its client asks again."""

    def close(self) -> None:
        self.closed = True
        self._following.cancel()
        self._link.close()

    async def _back(self, connection: asyncpg.Connection) -> None:
        """The database is back: the whole table into the view."""
        self._learn(await connection.fetch(self._sql["rows"]))
        self._synced = time.monotonic()

    async def _follow(self) -> None:
        """Every FOLLOW seconds, the rows changed since the last look (by any server) into the view; every RESYNC
        seconds the whole table, for a change whose number was taken before one already read but committed after
        it (sequence numbers are not commit order)."""
        while not self.closed:
            await asyncio.sleep(FOLLOW)
            connection = self._link.connection
            if connection is None or connection.is_closed():
                continue
            whole = time.monotonic() - self._synced >= RESYNC
            try:
                async with self._link.turn:
                    records = await connection.fetch(*((self._sql["rows"],) if whole
                                                       else (self._sql["changed"], self._seen)))
            except database.GONE as e:
                self._link.away(e)
                continue
            except asyncpg.PostgresError as e:
                self._failed(e)
                continue
            if whole:
                self._synced = time.monotonic()
            self._learn(records)

    def _learn(self, records: list[asyncpg.Record]) -> None:
        if records:
            self._seen = max(self._seen, max(r["changed"] for r in records))
            if self.learn is not None:
                self.learn(self._rows_of(records))


    def _rows_of(self, records: list[asyncpg.Record]) -> list[Row]:
        decode = self._table.decode
        return [Row(Lease(r["mac"], decode(r["address"]), r["expires"], r["hostname"], bytes(r["client_id"])),
                    r["state"]) for r in records]
