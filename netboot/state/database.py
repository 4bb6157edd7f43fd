"""The connection to the site's PostgreSQL database, and its schema: created and upgraded at start, under a lock.

The driver is asyncpg (asyncio, the binary protocol, statements prepared and cached by default): on the DHCP
path's claim statement it cost the event loop 1.3-1.8x less CPU per claim than psycopg 3's async API, with single
round trips about 15% faster and batches about even (bench/db_driver.py, BENCHMARKS.md).

The schema has a version (table netboot_schema). A server upgrades an older schema at start, one step at a time,
inside one transaction holding the advisory lock SCHEMA_LOCK, so that servers starting together neither race
nor see half an upgrade; a newer schema than it knows is a one-line error naming both versions: an older server
never writes into a newer layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable

import asyncpg

from netboot.core.errors import NetbootError

log = logging.getLogger("netboot.state")

# Every advisory lock netboot takes, by name (as MAAS's locks.py): contention is visible in one place.
SCHEMA_LOCK = 0x6E62_0001  # creating or upgrading the schema

CONNECT_TIMEOUT = 5.0
RETRY = 1.0  # seconds between attempts to reach the database again
# What says the connection is gone (the server stopped or restarted, the network cut), rather than one statement
# failing.
GONE = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)


def _lease_table(name: str, address: str) -> str:
    """A lease table (lease4, and lease6 with the same layout), its address column of type `address`. Steps 1 and 2
    make theirs with it: a change to the layout is a step of its own, never a change here."""
    return f"""
    CREATE SEQUENCE {name}_changes;
    CREATE TABLE {name} (
        address {address} PRIMARY KEY,
        mac text NOT NULL,
        client_id bytea NOT NULL DEFAULT '',
        expires double precision NOT NULL,
        state smallint NOT NULL,
        hostname text NOT NULL DEFAULT '',
        server text NOT NULL,
        changed bigint NOT NULL DEFAULT nextval('{name}_changes')
    );
    CREATE INDEX {name}_mac ON {name} (mac);
    CREATE INDEX {name}_changed ON {name} (changed);
    """


# Step n takes a schema of version n - 1 to version n.
_STEPS: tuple[str, ...] = (
    # 1: leases. The address is the key: the database, not timing, keeps an address to one client (as Kea's
    # lease4). state: 0 leased, 1 offered, 2 declined (set aside); expires in seconds since the epoch.
    # `changed` numbers every write from one sequence, so that each server reads what changed since it last looked.
    _lease_table("lease4", "bigint"),
    # 2: the write API's machines, the boot record of every server, and DHCPv6's leases (lease4's layout, the
    # address an inet; `mac` holds the lease's key there: the client's DUID and the IA's IAID).
    # machine: a table written through one server's API, served by all; tbl NULL: removed through the API (it
    # hides the machine from every server's machines file). `changed`, as lease4's, numbers every write.
    # boot_event: each server's events, numbered by the server itself (one writer per server, so a server's
    # rows commit in the order of their numbers and a reader that remembers the last number misses none); a row
    # with protocol '' carries only facts that DHCP noted. server: every server that wrote, and when.
    """
    CREATE SEQUENCE machine_changes;
    CREATE TABLE machine (
        mac text PRIMARY KEY,
        tbl jsonb,
        server text NOT NULL,
        changed bigint NOT NULL DEFAULT nextval('machine_changes')
    );
    CREATE TABLE boot_event (
        server text NOT NULL,
        seq bigint NOT NULL,
        time double precision NOT NULL,
        client text NOT NULL,
        protocol text NOT NULL,
        path text NOT NULL,
        status text NOT NULL,
        ok boolean NOT NULL,
        bytes bigint NOT NULL,
        mac text,
        profile text,
        build text,
        retransmissions integer NOT NULL,
        facts jsonb,
        PRIMARY KEY (server, seq)
    );
    CREATE TABLE netboot_server (
        name text PRIMARY KEY,
        started double precision NOT NULL
    );
    """ + _lease_table("lease6", "inet"),
)
VERSION = len(_STEPS)


def check_url(url: str) -> str:
    """A libpq URL (postgresql://…); anything else is a one-line error naming the flag."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise NetbootError(f"--database {url!r}: expected a PostgreSQL URL, e.g. postgresql://netboot@db/netboot "
                           "or postgresql:///netboot?host=/run/postgresql")
    return url


def shown(url: str) -> str:
    """The URL as a log line shows it: without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


async def connect(url: str) -> asyncpg.Connection:
    """A connection, or a one-line NetbootError saying why not (unreachable, refused, bad credentials)."""
    try:
        return await asyncpg.connect(check_url(url), timeout=CONNECT_TIMEOUT)
    except asyncpg.InvalidPasswordError:
        raise NetbootError(f"--database {shown(url)}: the database refused the credentials") from None
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError) as e:
        raise NetbootError(f"--database {shown(url)}: {line(e)}") from None  # (no such role, no such database)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as e:
        raise NetbootError(f"--database {shown(url)}: cannot connect: {line(e) or type(e).__name__}") from None


async def prepare(connection: asyncpg.Connection) -> int:
    """Bring the schema to VERSION (from nothing, or from an older version); returns the version found."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await connection.execute("CREATE TABLE IF NOT EXISTS netboot_schema (version integer NOT NULL)")
        found = await connection.fetchval("SELECT max(version) FROM netboot_schema")
        found = 0 if found is None else found
        if found > VERSION:
            raise NetbootError(f"the database's schema is version {found}, newer than this netboot's "
                               f"({VERSION}): upgrade netboot")
        for step in _STEPS[found:]:
            await connection.execute(step)
        if found < VERSION:
            await connection.execute("DELETE FROM netboot_schema")
            await connection.execute("INSERT INTO netboot_schema (version) VALUES ($1)", VERSION)
            log.info("database: schema %s version %d", "created at" if found == 0 else f"upgraded from {found} to",
                     VERSION)
    return found


Back = Callable[[asyncpg.Connection], Awaitable[None]]


class Link:
    """A connection kept to the database: when it is lost (closed under it, or `away` when a statement finds it
    gone), one log line, then a new connection every RETRY seconds; once every `on_back(connection)` has run on the
    new one without an error (reading what changed meanwhile), one line more. Statements take `turn`, one at a time
    on the connection."""

    def __init__(self, url: str, connection: asyncpg.Connection, logger: logging.Logger, part: str, away: str,
                 back: str) -> None:
        """`part`: the log lines' first word ("dhcp"); `away`, `back`: what they say besides the database's name
        (what is and is not done meanwhile)."""
        self.url = url
        self.connection: asyncpg.Connection | None = None
        self.turn = asyncio.Lock()
        self.closed = False
        self.on_back: list[Back] = []
        self._log = logger
        self._part = part
        self._away_text, self._back_text = away, back
        self._reconnecting: asyncio.Task | None = None
        self._use(connection)

    @classmethod
    async def open(cls, url: str, logger: logging.Logger, part: str, away: str, back: str) -> Link:
        """Connected, the schema ready; a one-line NetbootError if the database cannot be used."""
        connection = await connect(url)
        try:
            await prepare(connection)
        except BaseException:
            await connection.close()
            raise
        return cls(url, connection, logger, part, away, back)

    def _use(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        # The server going away closes an idle connection too: that is noticed at once, not at the next statement.
        connection.add_termination_listener(lambda closed: self.away(None) if closed is self.connection else None)

    @property
    def reachable(self) -> bool:
        return self.connection is not None and not self.connection.is_closed()

    def away(self, error: BaseException | None) -> None:
        if self._reconnecting is not None or self.closed:
            return
        why = f": {line(error) or type(error).__name__}" if error is not None else ""
        self._log.error("%s: %s cannot be reached%s; %s", self._part, self.name, why, self._away_text)
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.terminate()
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    @property
    def name(self) -> str:
        return f"the database {shown(self.url)}"

    async def _reconnect(self) -> None:
        try:
            while not self.closed:
                await asyncio.sleep(RETRY)
                with contextlib.suppress(Exception):
                    connection = await connect(self.url)
                    try:
                        for back in self.on_back:
                            await back(connection)
                    except BaseException:
                        connection.terminate()
                        raise
                    self._use(connection)
                    self._log.info("%s: %s is back; %s", self._part, self.name, self._back_text)
                    return
        finally:
            self._reconnecting = None

    def close(self) -> None:
        self.closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.terminate()


def line(error: BaseException) -> str:
    return str(error).splitlines()[0].strip() if str(error) else ""
