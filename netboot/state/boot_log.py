"""The boot record of every server of a site, in its database: each server shows the boots the others served.

Each server writes its requests (and the facts DHCP noted) as rows of `boot_event`, numbered by itself: it is their
only writer, one batch after another, so its rows commit in the order of their numbers, and a reader that
remembers the last number it read of each server misses none (a sequence shared by the servers would not give
that: numbers are taken in one order and committed in another). Every FOLLOW seconds a server reads the rows
after those numbers, for every other server named in `netboot_server`, in one statement, and hands them to its
record.

At start a server reads the last START_ROWS rows of every server, its own earlier ones included, so that the page
shows what was booted before it started; it keeps KEEP rows of its own, the oldest deleted as it writes.

While the database is away, rows wait in memory (at most MAX_WAITING, the oldest dropped first), and are written
when it is back.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable, Iterable

import asyncpg

from netboot.state import database

log = logging.getLogger("netboot.serve")

FOLLOW = 0.5  # seconds between reads of the other servers' new rows
WRITE = 0.2  # seconds between writes of this server's rows (one batch each)
START_ROWS = 20_000  # rows of each server read at start
KEEP = 200_000  # rows of its own a server keeps in the table
MAX_WAITING = 100_000  # rows kept in memory while the database is away
BATCH = 4_096  # rows written or read in one statement, at most

# (time, client, protocol, path, status, ok, bytes, mac, profile, build, retransmissions, facts, server): what
# status.record's sink gives and its learn() takes (this package does not import it).
Row = tuple

_COLUMNS = "time, client, protocol, path, status, ok, bytes, mac, profile, build, retransmissions, facts, server, seq"
_WRITE = f"""
INSERT INTO boot_event ({_COLUMNS})
SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::int8[], $8::text[],
                     $9::text[], $10::text[], $11::int4[], $12::jsonb[], $13::text[], $14::int8[])
ON CONFLICT DO NOTHING
"""
_SERVER = """
INSERT INTO netboot_server (name, started) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET started = excluded.started
"""
_LAST = "SELECT coalesce(max(seq), 0) FROM boot_event WHERE server = $1"
# Each other server's rows after the last read of it (0 for a server not read yet), in one statement; its key
# (server, seq) is the index.
_AFTER = f"""
SELECT {_COLUMNS} FROM netboot_server s LEFT JOIN unnest($1::text[], $2::int8[]) AS k(name, last) ON k.name = s.name,
    LATERAL (SELECT * FROM boot_event WHERE server = s.name AND seq > coalesce(k.last, 0) ORDER BY seq
             LIMIT {BATCH}) e
WHERE s.name <> $3
"""
# The last rows of every server, at start.
_START = f"""
SELECT {_COLUMNS} FROM netboot_server s,
    LATERAL (SELECT * FROM boot_event WHERE server = s.name ORDER BY seq DESC LIMIT {START_ROWS}) e
"""
_TRIM = "DELETE FROM boot_event WHERE server = $1 AND seq <= $2"


# The columns a client's request decides (client, path, status, mac): text the database may refuse.
_CLIENT_TEXT = (1, 3, 4, 7)


def _text(text: str | None) -> str | None:
    """`text` as PostgreSQL takes it: what UTF-8 cannot encode (a path's undecodable bytes, kept as surrogates)
    and NUL, which no text column holds, written as escapes; a row refused would take its batch with it."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text.replace("\x00", "\\x00") if "\x00" in text else text


class BootLog:
    def __init__(self, link: database.Link, name: str, last: int, learn: Callable[[list[Row]], None]) -> None:
        """`last`: this server's last number in the table; `learn`: gets the other servers' rows."""
        self.name = name
        self._learn = learn
        self._link = link
        self._seq = last
        self._waiting: collections.deque[Row] = collections.deque(maxlen=MAX_WAITING)
        self._read: dict[str, int] = {}  # each other server: the last number read
        self._trimmed = max(0, last - KEEP)
        self._tasks = [asyncio.get_running_loop().create_task(self._write()),
                       asyncio.get_running_loop().create_task(self._follow())]

    @classmethod
    async def open(cls, link: database.Link, name: str, learn: Callable[[list[Row]], None]) -> BootLog:
        """This server named in the table, the last rows of every server given to `learn`."""
        connection = link.connection
        assert connection is not None
        await connection.execute(_SERVER, name, time.time())
        last = await connection.fetchval(_LAST, name)
        records = await connection.fetch(_START)
        log.info("record: %d boot events of the site read from %s, as server %s", len(records), link.name, name)
        boot_log = cls(link, name, last, learn)
        boot_log._take(sorted(records, key=lambda r: r["time"]), everyone=True)
        return boot_log

    def add(self, rows: Iterable[Row]) -> None:
        """This server's rows (the record's sink), written within WRITE seconds."""
        self._waiting.extend(rows)

    async def _write(self) -> None:
        while not self._link.closed:
            await asyncio.sleep(WRITE)
            connection = self._link.connection
            if not self._waiting or connection is None or connection.is_closed():
                continue
            rows = [self._waiting.popleft() for _ in range(min(BATCH, len(self._waiting)))]
            first = self._seq + 1
            columns = [list(c) for c in zip(*rows, strict=True)]
            for i in _CLIENT_TEXT:
                columns[i] = [_text(t) for t in columns[i]]
            columns[11] = [json.dumps({k: _text(v) for k, v in facts}) if facts else None for facts in columns[11]]
            columns[12] = [self.name] * len(rows)
            try:
                async with self._link.turn:
                    await connection.execute(_WRITE, *columns, list(range(first, first + len(rows))))
                    if self._seq - self._trimmed > KEEP + BATCH:
                        self._trimmed = self._seq - KEEP
                        await connection.execute(_TRIM, self.name, self._trimmed)
            except database.GONE as e:
                self._waiting.extendleft(reversed(rows))
                self._link.away(e)
                continue
            except (asyncpg.PostgresError, ValueError) as e:
                log.warning("record: %d rows not written: %s", len(rows), database.line(e))
                continue
            self._seq = first + len(rows) - 1

    async def _follow(self) -> None:
        while not self._link.closed:
            await asyncio.sleep(FOLLOW)
            connection = self._link.connection
            if connection is None or connection.is_closed():
                continue
            try:
                async with self._link.turn:
                    names = list(self._read)
                    records = await connection.fetch(_AFTER, names, [self._read[n] for n in names], self.name)
            except database.GONE as e:
                self._link.away(e)
                continue
            except asyncpg.PostgresError as e:
                log.warning("record: cannot read the other servers' boots: %s", database.line(e))
                continue
            self._take(records)

    def _take(self, records: list[asyncpg.Record], everyone: bool = False) -> None:
        """Rows read into the record; `everyone`: at start, this server's earlier ones too."""
        rows = []
        for r in records:
            server, seq = r["server"], r["seq"]
            if server == self.name and not everyone:
                continue
            if server != self.name and seq > self._read.get(server, 0):
                self._read[server] = seq
            facts = tuple(json.loads(r["facts"]).items()) if r["facts"] is not None else ()
            rows.append((r["time"], r["client"], r["protocol"], r["path"], r["status"], r["ok"], r["bytes"], r["mac"],
                         r["profile"], r["build"], r["retransmissions"], facts, server))
        if rows:
            self._learn(rows)

    def close(self) -> None:
        """Stops writing and reading (the link is its opener's to close)."""
        for task in self._tasks:
            task.cancel()
