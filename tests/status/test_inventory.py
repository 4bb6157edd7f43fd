"""The status listener's write API against a real `netboot serve`: the token, the machines file kept as it was
around each change, writes checked as a load checks them and served at once, concurrent writers and a hand
edit, and what the machines say of themselves (facts) over HTTP and TFTP."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import ServerProcess, fake_out, need

TOKEN = "s3cret-token"
NEW, OTHER = "52:54:00:00:0e:01", "52:54:00:00:0e:02"
FILE = """\
# Our lab. Keep this comment.
[profiles.rack]
dir = "rack"      # the rack's build
overlay = "overlay"

[profiles.spare]
dir = "spare"

# node1 is the database: do not move it
[machines."52-54-00-00-0e-a1"]
profile = "rack"   # pinned
hostname = "node1"
role = "db"
"""


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    fake_out(tmp_path / "rack")
    fake_out(tmp_path / "spare", "direct", "gzip", 6)
    (tmp_path / "overlay/etc").mkdir(parents=True)
    # Slow for a machine whose role is "slow": a check that renders it takes a while (see the hand edit's test).
    (tmp_path / "overlay/etc/hostname.j2").write_text(
        "{% if role == 'slow' %}{% for i in range(100000) %}{% for j in range(4) %}{% endfor %}{% endfor %}"
        "{% endif %}{{ hostname }}\n")
    f = tmp_path / "machines.toml"
    f.write_text(FILE)
    return f


@pytest.fixture
def server(lab: Path):
    s = ServerProcess("--machines", lab, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0", "--status-token", TOKEN)
    yield s
    s.stop()


def call(server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{server.status_port}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def script(server: ServerProcess, mac: str, facts: str = "") -> str:
    with urllib.request.urlopen(server.url(f"machine/{mac.replace(':', '-')}/{facts}boot.ipxe"), timeout=30) as r:
        return r.read().decode()


def test_put_and_delete_keep_the_file_as_it_was_around_the_machine(server: ServerProcess, lab: Path) -> None:
    assert "no [profiles.default]" in script(server, NEW)
    # Without the token: refused, and nothing written.
    assert call(server, "PUT", f"/api/machines/{NEW}", {"profile": "rack"}, token=None)[0] == 401
    assert call(server, "PUT", f"/api/machines/{NEW}", {"profile": "rack"}, token="wrong")[0] == 401
    assert lab.read_text() == FILE

    status, body = call(server, "PUT", f"/api/machines/{NEW.replace(':', '-')}",
                        {"profile": "rack", "hostname": "node7", "ip": "192.0.2.77", "vars": {"role": "web"}})
    assert status == 201, body
    assert json.loads(body) == {"mac": NEW, "added": True, "table": {"profile": "rack", "hostname": "node7",
                                                                     "ip": "192.0.2.77", "role": "web"}}
    assert lab.read_text() == FILE + (f'\n[machines."{NEW}"]\nprofile = "rack"\nhostname = "node7"\n'
                                      'ip = "192.0.2.77"\nrole = "web"\n')
    # In effect once answered: its script, its entry.
    assert "boots profile rack" in script(server, NEW)
    status, body = call(server, "GET", f"/api/machines/{NEW}")
    entry = json.loads(body)
    assert status == 200 and (entry["configured"], entry["profile"]) == (True, "rack")

    # Replaced: the same table, changed in place; the listed machine in another spelling keeps its comments.
    status, _ = call(server, "PUT", "/api/machines/525400000ea1", {"profile": "rack", "hostname": "db1",
                                                                    "role": "db"})
    assert status == 200
    assert lab.read_text().startswith(FILE.replace('hostname = "node1"', 'hostname = "db1"'))
    # A key added to it goes after its last key, in the newest tomlkit as in the oldest; then taken out again.
    status, _ = call(server, "PUT", "/api/machines/525400000ea1", {"profile": "rack", "hostname": "db1",
                                                                    "role": "db", "row": "b"})
    assert status == 200
    assert lab.read_text().startswith(FILE.replace('hostname = "node1"\nrole = "db"\n',
                                                   'hostname = "db1"\nrole = "db"\nrow = "b"\n'))
    status, _ = call(server, "PUT", "/api/machines/525400000ea1", {"profile": "rack", "hostname": "db1",
                                                                    "role": "db"})
    assert status == 200

    # A write the file would not load with: 400 with the reason, and the file untouched.
    before, inode = lab.read_text(), os.stat(lab).st_ino
    for change, reason in (({"profile": "nope"}, "profile 'nope' is not defined"),
                           ({"profile": "spare", "role": "db"}, "unknown key 'role'"),
                           ({"profile": "rack", "ip": "192.0.2.77"}, "ip 192.0.2.77 is already reserved"),
                           ({"profile": "rack", "ipxe_binary": "x.efi"}, "ipxe_binary 'x.efi' is not one of"),
                           ({"profile": "rack", "hostname": None}, "hostname: null has no TOML spelling"),
                           ({"profile": "rack", "vars": {"role": "\udfff"}}, "role: a string with a lone surrogate"),
                           ({"profile": "rack", **{f"k{i}": i for i in range(600)}}, "more than 512 keys"),
                           ([1, 2], "the body must be a JSON object")):
        status, body = call(server, "PUT", f"/api/machines/{OTHER}", change)
        assert (status, reason in body.decode()) == (400, True), (change, body)
    assert call(server, "PUT", f"/api/machines/{OTHER}", raw=b"{not json")[0] == 400
    assert call(server, "PUT", "/api/machines/52:54:00:0e", {"profile": "rack"})[0] == 400
    assert call(server, "PUT", f"/api/machines/{OTHER}", raw=b"[" + b"0," * 40_000 + b"0]")[0] == 413
    assert (lab.read_text(), os.stat(lab).st_ino) == (before, inode)

    # Deleted: gone from the file (with nothing else), and from what is served.
    assert call(server, "DELETE", f"/api/machines/{NEW}") == (200, b'{\n "mac": "52:54:00:00:0e:01",\n '
                                                                   b'"deleted": true\n}\n')
    assert lab.read_text() == FILE.replace('hostname = "node1"', 'hostname = "db1"')
    assert "no [profiles.default]" in script(server, NEW)
    status, body = call(server, "DELETE", f"/api/machines/{NEW}")
    assert status == 404 and b"has no table in the machines file" in body
    assert server.logged(f"machines file: {NEW} removed")


def test_changes_are_refused_without_a_token(lab: Path) -> None:
    server = ServerProcess("--machines", lab, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        for method, path in (("PUT", f"/api/machines/{NEW}"), ("DELETE", f"/api/machines/{NEW}"),
                             ("POST", f"/api/machines/{NEW}/wake")):
            status, body = call(server, method, path, {"profile": "rack"}, token=None)
            assert (status, body) == (403, b"changes need a token: start netboot serve with --status-token or "
                                           b"--status-token-file\n")
        assert call(server, "GET", "/api/machines", token=None)[0] == 200
        assert lab.read_text() == FILE
    finally:
        server.stop()


def test_a_server_of_one_directory_has_no_file_to_write(tmp_path: Path) -> None:
    server = ServerProcess("--dir", fake_out(tmp_path / "out"), "--http", "127.0.0.1:0", "--no-tftp",
                           "--status-token", TOKEN)
    try:
        status, body = call(server, "PUT", f"/api/machines/{NEW}", {"profile": "default"})
        assert status == 409 and b"has no machines file to write" in body
    finally:
        server.stop()


def test_concurrent_puts_and_a_hand_edit_lose_nothing(server: ServerProcess, lab: Path) -> None:
    macs = [f"52:54:00:00:0f:{i:02x}" for i in range(10)]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda mac: call(server, "PUT", f"/api/machines/{mac}",
                                                 {"profile": "spare", "hostname": mac.replace(":", "")}), macs))
    assert [status for status, _ in results] == [201] * 10, results
    # A hand edit saved while a write is being checked (a slow template makes the check take a while): the
    # write is made again on it, and neither is lost.
    slow = threading.Thread(target=lambda: results.append(call(server, "PUT", f"/api/machines/{OTHER}",
                                                               {"profile": "rack", "role": "slow"})))
    slow.start()
    time.sleep(0.3)
    by_hand = lab.parent / "machines.toml.by-hand"
    by_hand.write_text(lab.read_text() + '\n[machines."52:54:00:00:0e:0f"]  # added by hand\nprofile = "spare"\n')
    by_hand.rename(lab)
    slow.join()
    assert results[-1][0] == 201, results[-1]
    text = lab.read_text()
    assert text.startswith(FILE) and "# added by hand" in text
    assert {*macs, OTHER, "52:54:00:00:0e:0f"} <= set(tomllib.loads(text)["machines"])
    # And all of it is served, the hand edit too (read at once by the write, or by the reload that follows).
    deadline = time.monotonic() + 30
    while "boots profile spare" not in script(server, "52:54:00:00:0e:0f") and time.monotonic() < deadline:
        time.sleep(0.2)
    for mac in (*macs, OTHER, "52:54:00:00:0e:0f"):
        assert "boots profile" in script(server, mac), mac


def test_facts_travel_over_http_and_tftp_and_are_kept_short(server: ServerProcess) -> None:
    need("curl")
    script(server, NEW, "uuid=4c4c4544-0042-3510-8052-b4c04f4d3532/serial=SN%2F1/manufacturer=QEMU/"
                        f"product={'x' * 300}/buildarch=i386/platform=pcbios/")
    proc = subprocess.run(["curl", "-sS", f"tftp://127.0.0.1:{server.tftp_port}/machine/{OTHER.replace(':', '-')}/"
                           "uuid=00000000-0000-0000-0000-0000000000aa/serial=/platform=efi/buildarch=x86_64/boot.ipxe"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and b"no [profiles.default]" in proc.stdout, proc.stderr
    machines = {m["mac"]: m for m in json.loads(call(server, "GET", "/api/machines")[1])["machines"]}
    assert machines[NEW]["facts"] == {"uuid": "4c4c4544-0042-3510-8052-b4c04f4d3532", "serial": "SN/1",
                                      "manufacturer": "QEMU", "product": "x" * 64, "buildarch": "i386",
                                      "platform": "pcbios"}
    assert machines[OTHER]["facts"] == {"uuid": "00000000-0000-0000-0000-0000000000aa", "buildarch": "x86_64",
                                        "platform": "efi"}
    # Unknown machines, both; the name recorded and logged without the facts.
    assert machines[NEW]["state"] == machines[OTHER]["state"] == "unknown-mac"
    assert machines[OTHER]["last"]["path"] == f"/machine/{OTHER.replace(':', '-')}/boot.ipxe"
    assert server.logged(f"mac={OTHER} profile=- tftp /machine/{OTHER.replace(':', '-')}/boot.ipxe complete")

    # The pages show them: the table's row, and the machine's own page (404 for a machine never seen).
    status, page = call(server, "GET", "/")
    assert status == 200 and "QEMU " + "x" * 64 + " #SN/1" in page.decode()
    status, own = call(server, "GET", f"/machines/{NEW}")
    assert status == 200 and '<dd data-fact="serial">SN/1</dd>' in own.decode()
    assert call(server, "GET", "/machines/52:54:00:00:0e:99")[0] == 404
    assert call(server, "GET", "/api/machines/52:54:00:00:0e:99")[0] == 404
