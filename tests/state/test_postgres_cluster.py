"""The tests' throwaway PostgreSQL cluster (devtools/postgres.py) does what the state backend's tests rely on: a URL
that connects, a password that is checked, a crash and a restart that keep what was committed, nothing left
behind."""

from __future__ import annotations

import os
import stat

import asyncpg
import pytest

from devtools.postgres import Cluster


async def test_url_connects_as_netboot_to_its_database(postgres: Cluster) -> None:
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchrow("SELECT current_user, current_database()") == ("netboot", "netboot")
        await conn.execute("CREATE TABLE t (n int)")  # the role owns the database's schema
    finally:
        await conn.close()
    assert postgres.psql("SHOW listen_addresses") == ""
    assert postgres.psql("SHOW fsync") == "on"
    assert postgres.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'netboot'") == "f"


async def test_wrong_or_no_password_is_refused(postgres: Cluster) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.url_for("netboot", password="not-" + postgres.password))
    # No password at all: asyncpg is asked for one and has none to give.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.url_for("netboot"))


async def test_kill_and_restart_keep_what_was_committed(postgres: Cluster) -> None:
    conn = await asyncpg.connect(postgres.url)
    await conn.execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
    postmaster = postgres.process.pid
    postgres.kill()
    assert not os.path.exists(f"/proc/{postmaster}")
    with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError, asyncpg.InterfaceError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    with pytest.raises(OSError):  # (nothing listens: the socket file is there, its server is not)
        await asyncpg.connect(postgres.url, timeout=5)

    postgres.start()
    conn = await asyncpg.connect(postgres.url)
    try:
        assert await conn.fetchval("SELECT n FROM t") == 1
    finally:
        await conn.close()
    postgres.restart()
    assert postgres.psql("SELECT count(*) FROM t") == "1"


def test_cluster_is_private_and_gone_after() -> None:
    with Cluster(fsync=False) as cluster:
        assert cluster.psql("SHOW fsync") == "off"
        pid = cluster.process.pid
        children = cluster.psql("SELECT pid FROM pg_stat_activity", database="postgres").split()
        assert oct(stat.S_IMODE(cluster.socket_dir.stat().st_mode)) == oct(0o700)
    assert not cluster.base.exists()
    for process in (pid, *children):
        assert not os.path.exists(f"/proc/{process}"), f"PostgreSQL's process {process} outlived its cluster"
