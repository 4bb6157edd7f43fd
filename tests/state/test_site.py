"""Two `netboot serve --database URL` on loopback sharing one PostgreSQL: machines written through either server's
API served by both (the database's table over each server's machines file), the boots of each shown by the other,
and the database stopped and started again under them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import ServerProcess, fake_out

from devtools.postgres import Cluster

TOKEN = "site-token"
FILED, WRITTEN, ONLY_A = "52:54:00:00:5e:01", "52:54:00:00:5e:02", "52:54:00:00:5e:03"
FILE = f"""\
[profiles.rack]
dir = "rack"

[profiles.spare]
dir = "spare"
{{extra}}
[machines."{FILED}"]
profile = "rack"
append = "from=file"
"""


def serve(base: Path, name: str, cluster: Cluster, extra: str = "") -> ServerProcess:
    base.mkdir()
    fake_out(base / "rack")
    fake_out(base / "spare", "direct", "gzip", 6)
    if extra:
        fake_out(base / "extra")
    (base / "machines.toml").write_text(FILE.format(extra=extra))
    return ServerProcess("--machines", base / "machines.toml", "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0",
                         "--status-token", TOKEN, "--database", cluster.url, "--name", name,
                         "--state-dir", base / "state")


@pytest.fixture
def pair(tmp_path: Path, postgres: Cluster):
    a = serve(tmp_path / "a", "a", postgres, '[profiles.extra]\ndir = "extra"\n')
    b = serve(tmp_path / "b", "b", postgres)
    yield a, b
    a.stop()
    b.stop()


def call(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.status_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def script(server: ServerProcess, mac: str) -> str:
    with urllib.request.urlopen(server.url(f"machine/{mac.replace(':', '-')}/boot.ipxe"), timeout=30) as r:
        return r.read().decode()


def unknown(server: ServerProcess, mac: str) -> bool:
    """Whether `server` answers `mac` with the script of a machine it has no profile for."""
    return "there is no [profiles.default]" in script(server, mac)


def until(check, timeout: float = 5.0) -> float:
    """Seconds until `check()` is true (polled every 20 ms); fails after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        time.sleep(0.02)
    return time.monotonic() - started


def machine(server: ServerProcess, mac: str) -> dict[str, Any]:
    status, body = call(server, "GET", f"/api/machines/{mac}")
    assert status == 200, body
    return body


def test_machines_written_through_one_server_are_served_by_the_other(pair: tuple[ServerProcess, ServerProcess],
                                                                      postgres: Cluster, tmp_path: Path) -> None:
    a, b = pair
    assert unknown(b, WRITTEN)  # (there is no default profile)
    status, body = call(a, "PUT", f"/api/machines/{WRITTEN}", {"profile": "spare", "append": "written=1"})
    assert status == 201, body
    took = until(lambda: "written=1" in script(b, WRITTEN))
    print(f"a machine PUT to a was served by b after {took:.3f} s")
    assert machine(b, WRITTEN)["source"] == "database"
    assert machine(b, FILED)["source"] == "file"
    # Nothing of it went into either machines file.
    assert (tmp_path / "b/machines.toml").read_text() == FILE.format(extra="")
    # A machine of the files, changed through b: the database's wins, on both.
    status, body = call(b, "PUT", f"/api/machines/{FILED}", {"profile": "spare", "append": "from=database"})
    assert status == 200, body
    for server in (a, b):
        until(lambda s=server: "from=database" in script(s, FILED))
        assert machine(server, FILED)["source"] == "database"
    # Removed through b: gone from both, the one of the files as well.
    for mac in (WRITTEN, FILED):
        status, body = call(b, "DELETE", f"/api/machines/{mac}")
        assert status == 200, body
        until(lambda m=mac: unknown(a, m))
        assert unknown(b, mac)
    assert call(a, "DELETE", f"/api/machines/{WRITTEN}")[0] == 404
    assert postgres.psql("SELECT count(*) FROM machine WHERE tbl IS NULL") == "2"
    assert (tmp_path / "b/machines.toml").read_text() == FILE.format(extra="")


def test_a_table_one_server_cannot_load_is_left_out_there_alone(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    # Profile "extra" is a's alone: b refuses it as a write of its own, and leaves it out when a writes it.
    status, body = call(b, "PUT", f"/api/machines/{ONLY_A}", {"profile": "extra"})
    assert status == 400 and "profile 'extra' is not defined" in body, body
    assert call(a, "PUT", f"/api/machines/{ONLY_A}", {"profile": "extra"})[0] == 201
    assert b.logged(f"machines: not served here: the database: machines.'{ONLY_A}': profile 'extra' is not defined")
    assert not unknown(a, ONLY_A) and unknown(b, ONLY_A)
    assert call(b, "PUT", f"/api/machines/{WRITTEN}", {"profile": "rack"})[0] == 201
    until(lambda: not unknown(a, WRITTEN))
    assert b.log.count("not served here") == 1


def test_each_server_shows_the_boots_of_the_other(pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    assert "from=file" in script(a, FILED)
    seen = until(lambda: machine(b, FILED)["state"] == "booting")
    print(f"a boot served by a was shown by b after {seen:.3f} s")
    entry = machine(b, FILED)
    assert entry["events"][0]["server"] == "a" and entry["events"][0]["path"].endswith("/boot.ipxe")
    status, events = call(b, "GET", "/api/events")
    assert status == 200 and [e["server"] for e in events["events"]] == ["a"]
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{b.status_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        metrics = r.read().decode()
    assert 'netboot_boots_started_total{profile="rack"} 1.0' in metrics
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{b.status_port}/machines/{FILED}", headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        page = r.read().decode()
    assert "<td>a</td>" in page  # the server that served it, on the machine's page
    # b's own request shows on a, and a's own record has its own request once.
    assert "from=file" in script(b, FILED)
    until(lambda: [e["server"] for e in machine(a, FILED)["events"]] == ["b", "a"])


def test_the_database_away_and_back(pair: tuple[ServerProcess, ServerProcess], postgres: Cluster) -> None:
    a, b = pair
    assert call(a, "PUT", f"/api/machines/{WRITTEN}", {"profile": "spare", "append": "before=1"})[0] == 201
    until(lambda: "before=1" in script(b, WRITTEN))
    postgres.stop()
    try:
        # Every machine known keeps its script on both; a write is refused, and nothing changes.
        for server in (a, b):
            assert "before=1" in script(server, WRITTEN)
            assert "from=file" in script(server, FILED)
        status, body = call(b, "PUT", f"/api/machines/{WRITTEN}", {"profile": "rack"})
        assert status == 503 and "cannot be reached: nothing was written" in body, body
        assert "before=1" in script(a, WRITTEN)
        until(lambda: "site: the database" in a.log and "cannot be reached" in a.log)
    finally:
        postgres.start()
    # Back without a restart: writes go through again, and boots are shown across again.
    until(lambda: call(b, "PUT", f"/api/machines/{WRITTEN}", {"profile": "rack", "append": "after=1"})[0] == 200,
          timeout=10)
    until(lambda: "after=1" in script(a, WRITTEN))
    assert "after=1" in script(b, WRITTEN)
    until(lambda: any(e["server"] == "b" for e in machine(a, WRITTEN)["events"]))
    for server in (a, b):
        assert server.log.count("site: the database") == 2, server.log  # away, back: one line each
