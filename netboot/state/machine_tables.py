"""Machines written through the status API, in the site's database: every server serves them.

With `netboot serve --database`, a machine added, changed or removed through any server's write API is a row of
the table `machine` (its MAC, its table as JSON, or NULL: removed), not a line of that server's machines file. Each
server keeps its machines file (its profiles name its own directories) and lays the database's tables over it: a
machine in both is the database's, and one removed through the API is gone from every server's view.

A write is told to the other servers by NOTIFY on CHANNEL at its commit; a server that hears it reads the table
again, whole (a few hundred bytes a machine), and reloads if anything differs. Notifications are not replayed to a
server that was not listening, so the table is also read every RESYNC seconds and when the database comes back.
While the database is away, the servers keep what they read last; a write is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from netboot.core.errors import NetbootError
from netboot.state import database

log = logging.getLogger("netboot.serve")

CHANNEL = "netboot_machines"
RESYNC = 30.0  # seconds between reads of the whole table, besides those a notification asks for

Tables = dict[str, dict[str, Any] | None]  # MAC -> its table, or None: removed through the API

_ROWS = "SELECT mac, tbl FROM machine"
_WRITE = """
INSERT INTO machine AS m (mac, tbl, server) VALUES ($1, $2, $3)
ON CONFLICT (mac) DO UPDATE SET tbl = excluded.tbl, server = excluded.server, changed = nextval('machine_changes')
"""


class Unreachable(NetbootError):
    """The database cannot be reached now: nothing was written."""


class MachineTables:
    def __init__(self, link: database.Link, name: str, tables: Tables, changed: Callable[[], None]) -> None:
        """`changed`: called when another server's write (or the database's return) changed `tables`."""
        self.name = name
        self.tables = tables
        self._changed = changed
        self._link = link
        link.on_back.append(self._back)
        self._reading: asyncio.Task | None = None
        self._again = False
        self._synced = time.monotonic()
        self._resyncing = asyncio.get_running_loop().create_task(self._resync())

    @classmethod
    async def open(cls, link: database.Link, name: str, changed: Callable[[], None]) -> MachineTables:
        """Listening on the link's connection, the table read."""
        assert link.connection is not None
        tables = cls(link, name, await _read(link.connection), changed)
        await link.connection.add_listener(CHANNEL, tables._notified)
        return tables

    @property
    def reachable(self) -> bool:
        return self._link.reachable

    async def put(self, mac: str, table: dict[str, Any] | None) -> None:
        """Write a machine's table (None: removed) for every server; Unreachable if the database is away."""
        connection = self._link.connection
        if connection is None or connection.is_closed():
            raise Unreachable(f"{self._link.name} cannot be reached: nothing was written")
        try:
            async with self._link.turn, connection.transaction():
                await connection.execute(_WRITE, mac, None if table is None else json.dumps(table), self.name)
                await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, mac)
        except database.GONE as e:
            self._link.away(e)
            raise Unreachable(f"{self._link.name} cannot be reached: nothing was written") from None
        self.tables = {**self.tables, mac: table}

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        self.heard()

    def heard(self) -> None:
        """Read the table again (once more if a notification arrives while it is read)."""
        if self._reading is not None:
            self._again = True
            return
        self._reading = asyncio.get_running_loop().create_task(self._read_again())

    async def _read_again(self) -> None:
        try:
            while True:
                self._again = False
                connection = self._link.connection
                if connection is None or connection.is_closed():
                    return
                try:
                    async with self._link.turn:
                        tables = await _read(connection)
                except database.GONE as e:
                    self._link.away(e)
                    return
                except asyncpg.PostgresError as e:
                    log.warning("machines: cannot read the database's machines: %s", database.line(e))
                    return
                self._synced = time.monotonic()
                self._take(tables)
                if not self._again:
                    return
        finally:
            self._reading = None

    def _take(self, tables: Tables) -> None:
        if tables != self.tables:
            self.tables = tables
            self._changed()

    async def _back(self, connection: asyncpg.Connection) -> None:
        tables = await _read(connection)
        await connection.add_listener(CHANNEL, self._notified)
        self._take(tables)

    async def _resync(self) -> None:
        while not self._link.closed:
            await asyncio.sleep(1.0)
            if not self._link.reachable:
                continue
            if time.monotonic() - self._synced >= RESYNC:
                self._synced = time.monotonic()
                self.heard()

    def close(self) -> None:
        """Stops reading (the link is its opener's to close)."""
        self._resyncing.cancel()
        if self._reading is not None:
            self._reading.cancel()


async def _read(connection: asyncpg.Connection) -> Tables:
    found: Tables = {}
    for record in await connection.fetch(_ROWS):
        table = None if record["tbl"] is None else json.loads(record["tbl"])
        found[record["mac"]] = table if isinstance(table, dict) or table is None else None
    return found
