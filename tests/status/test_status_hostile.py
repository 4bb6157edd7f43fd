"""The status record and listener against hostile clients: names a client makes up are not attributed to MACs,
what is stored is cut short and bounded in bytes, /api/machines and the page come in pages built off the event
loop, the listener answers only for its own address without a token, and a token becomes a cookie."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, ServerProcess, fake_out, write_machines

from netboot.status.app import cookie_value
from netboot.status.record import MAX_PATH, BootRecord

KNOWN, MADE_UP = "52:54:00:00:0b:01", "02:00:00:00:0b:99"


def hyphens(mac: str) -> str:
    return mac.replace(":", "-")


@pytest.fixture
def machines_file(tmp_path: Path) -> Path:
    """One profile and no default: a made-up MAC matches nothing."""
    return write_machines(tmp_path / "machines.toml", {"p": fake_out(tmp_path / "out", "direct")}, {KNOWN: "p"})


def status_get(server: ServerProcess, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.status_port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def machines_api(server: ServerProcess, query: str = "") -> dict[str, Any]:
    status, _, body = status_get(server, "/api/machines" + query)
    assert status == 200, body
    return json.loads(body)


def http_status(server: ServerProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(server.url(path), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_made_up_names_are_not_attributed_to_macs(machines_file: Path) -> None:
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    try:
        for path in (f"machine/{hyphens(MADE_UP)}/garbage", f"machine/{hyphens(MADE_UP)}/{'x' * 7000}",
                     f"machine/{hyphens(MADE_UP)}/a/b/c/initrd", f"machine/{hyphens(MADE_UP)}/0123abcd/initrd"):
            assert http_status(server, path) == 404
        tftp = subprocess.run(["curl", "-sS", f"tftp://127.0.0.1:{server.tftp_port}/machine/{hyphens(MADE_UP)}/x/y"],
                              capture_output=True, timeout=60)
        assert tftp.returncode != 0
        time.sleep(0.5)
        found = {m["mac"]: m for m in machines_api(server)["machines"]}
        assert MADE_UP not in found, found.get(MADE_UP)
        # Names the server serves still are: a made-up MAC's script (it is told it is unknown), and a configured
        # machine's request for a build no longer served.
        assert http_status(server, f"machine/{hyphens(MADE_UP)}/boot.ipxe") == 200
        assert http_status(server, f"machine/{hyphens(KNOWN)}/0/initrd") == 404
        found = {m["mac"]: m for m in machines_api(server)["machines"]}
        assert found[MADE_UP]["state"] == "unknown-mac"
        assert found[KNOWN]["state"] == "failed" and found[KNOWN]["last"]["status"] == "404"
        # Every stored path is cut short, and so is every log line about one.
        events = json.loads(status_get(server, "/api/events")[2])["events"]
        assert events and all(len(e["path"].encode()) <= MAX_PATH for e in events)
        assert max(map(len, server.log.splitlines())) < 600
    finally:
        server.stop()


def test_the_record_is_bounded_in_bytes() -> None:
    record = BootRecord(max_bytes=2 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            mac = f"02:00:00:01:{i >> 8:02x}:{i & 0xFF:02x}"
            for k in range(1 + i % 20):  # machines of 1 to 20 events, with long paths
                record.record("192.0.2.1", "http", f"/machine/{hyphens(mac)}/{k:x}" + "z" * 7000, "404", False, 0,
                              mac, None)
            if i % 50 == 0:
                record.flush()
        record.flush()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert record.bytes <= 2 << 20
    # What the record counts is what it holds, near enough (its ring of recent events comes on top).
    assert grown < 2 * (2 << 20) + record.max_bytes // 2, grown
    machines = record.machines
    assert 200 < len(machines) < 20_000
    assert all(len(e[4].encode()) <= MAX_PATH for m in machines.values() for e in m.events)


def test_machines_come_in_pages_filtered_by_state_profile_and_mac(machines_file: Path) -> None:
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        for i in range(250):
            mac = f"52:54:00:01:{i >> 8:02x}:{i & 0xFF:02x}"
            http_status(server, f"machine/{hyphens(mac)}/boot.ipxe")  # none of them is configured: unknown-mac
        first = machines_api(server)
        assert len(first["machines"]) == 100 and first["total"] == 251 and first["next"]
        seen, page = [], first
        while True:
            seen += [m["mac"] for m in page["machines"]]
            if page["next"] is None:
                break
            page = machines_api(server, f"?after={page['next']}")
        assert seen == sorted(seen) and len(set(seen)) == 251
        unknown = machines_api(server, "?state=unknown-mac&limit=1000")
        assert unknown["total"] == 250 and unknown["next"] is None
        assert machines_api(server, "?state=configured")["machines"][0]["mac"] == KNOWN
        assert machines_api(server, "?profile=p")["total"] == 1
        for spelling in ("52:54:00:01:00", "52-54-00-01-00", "5254000100"):
            prefix = machines_api(server, f"?mac={spelling}&limit=7")
            assert prefix["total"] == 250 and len(prefix["machines"]) == 7
        assert machines_api(server, "?mac=52:54:00:01:00:0")["total"] == 16
        for bad in ("?limit=0", "?limit=5000", "?limit=x", "?mac=zz", "?state=bogus", "?after=nope"):
            assert status_get(server, "/api/machines" + bad)[0] == 400, bad
        page_text = status_get(server, "/?state=unknown-mac")[2].decode()
        assert "100 shown of 250" in page_text and 'id="next"' in page_text
    finally:
        server.stop()


def test_the_page_escapes_what_clients_and_the_machines_file_bring(tmp_path: Path) -> None:
    out = fake_out(tmp_path / "out", "direct")
    machines = tmp_path / "machines.toml"
    machines.write_text(f'[profiles."<b>x</b>"]\ndir = "{out}"\n[machines."{KNOWN}"]\nprofile = "<b>x</b>"\n')
    server = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        http_status(server, f"machine/{hyphens(KNOWN)}/boot.ipxe")
        http_status(server, f"machine/{hyphens(KNOWN)}/0/initrd%3Cscript%3Ealert(1)%3C%2Fscript%3E")
        page = status_get(server, "/")[2].decode()
        assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
        assert "<script>alert" not in page
    finally:
        server.stop()


def raw_status(port: int, host: str | None, path: str = "/api/machines", extra: str = "") -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "") + extra
        s.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode() + "\n\n" + body.decode(errors="replace")


def test_without_a_token_only_requests_for_the_listeners_own_address_are_answered(machines_file: Path) -> None:
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp",
                           "--status-name", "netboot.lab.example")
    port = server.status_port
    try:
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST", "netboot.lab.example",
                     f"netboot.lab.example:{port}"):
            assert raw_status(port, host)[0] == 200, host
        # A page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) gets nothing.
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1:{port + 1}", "127.0.0.2",
                     f"localhost.attacker.example:{port}", ""):
            for path in ("/", "/api/machines", "/api/events", "/api/events/stream", "/metrics"):
                status, text = raw_status(port, host, path)
                assert status == 421 and KNOWN not in text, (host, path, text)
    finally:
        server.stop()


def test_a_token_becomes_an_httponly_cookie_for_the_page(machines_file: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp",
                           "--status-token-file", token)
    try:
        status, headers, body = status_get(server, "/?token=s3cret")
        assert status == 200
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
        assert "Secure" not in cookie  # over plain HTTP a browser would drop a Secure cookie (test_status_tls.py)
        assert b"s3cret" not in body and b"token=" not in body.split(b"<script>")[0]
        value = cookie.split(";")[0]
        assert value == f"netboot_status={cookie_value('s3cret')}"
        # The page's own requests go by the cookie: its table, its event stream, the API.
        for path in ("/", "/api/machines", "/api/events", "/metrics"):
            assert status_get(server, path, {"Cookie": value})[0] == 200, path
            assert status_get(server, path, {"Cookie": "netboot_status=forged"})[0] == 401, path
        assert status_get(server, "/api/machines", {"Authorization": "Bearer s3cret"})[0] == 200
        # With a token, the token guards: the Host check is for listeners without one.
        assert raw_status(server.status_port, "attacker.example", extra="Authorization: Bearer s3cret\r\n")[0] == 200
    finally:
        server.stop()


def test_a_machine_page_opened_with_a_token_sets_the_cookie_its_requests_go_by(machines_file: Path,
                                                                             tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp",
                           "--status-token-file", token)
    try:
        status, headers, body = status_get(server, f"/machines/{KNOWN}?token=s3cret")
        assert status == 200 and KNOWN.encode() in body
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
        value = cookie.split(";")[0]
        assert value == f"netboot_status={cookie_value('s3cret')}"
        # What the machine page asks for next: itself (its live parts), the event stream, its machine's entry.
        for path in (f"/machines/{KNOWN}", f"/api/machines/{KNOWN}"):
            assert status_get(server, path, {"Cookie": value})[0] == 200, path
        with socket.create_connection(("127.0.0.1", server.status_port), timeout=30) as stream:
            stream.sendall(f"GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {value}\r\n\r\n".encode())
            assert stream.recv(4096).startswith(b"HTTP/1.1 200 OK")
        # The API's answers never set it: only a page a browser opens.
        assert "Set-Cookie" not in status_get(server, "/api/machines?token=s3cret")[1]
    finally:
        server.stop()


def test_a_401_says_how_to_give_the_token(machines_file: Path) -> None:
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp",
                           "--status-token", "s3cret")
    try:
        status, headers, body = status_get(server, f"/machines/{KNOWN}", {"Accept": "text/html,*/*;q=0.8"})
        assert status == 401 and headers["Content-Type"].startswith("text/html")
        assert b"/?token=TOKEN" in body and b"Authorization: Bearer TOKEN" in body
        status, headers, body = status_get(server, "/api/machines")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert body.decode().count("\n") == 1
        assert "/?token=TOKEN" in body.decode() and "Authorization: Bearer TOKEN" in body.decode()
    finally:
        server.stop()


def test_a_client_leaving_the_event_stream_leaves_no_traceback(machines_file: Path) -> None:
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        leaving = socket.create_connection(("127.0.0.1", server.status_port), timeout=30)
        leaving.sendall(b"GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in leaving.recv(4096)
        leaving.close()  # as `timeout 3 curl -N` does
        with socket.create_connection(("127.0.0.1", server.status_port), timeout=30) as staying:
            staying.sendall(b"GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"200 OK" in staying.recv(4096)
            # An event: each stream writes it, the left one to a closed connection.
            assert http_status(server, f"machine/{hyphens(KNOWN)}/boot.ipxe") == 200
            data = b""
            while b"data: " not in data:
                data += staying.recv(4096)
        assert server.logged(f"http /machine/{hyphens(KNOWN)}/boot.ipxe 200")
        assert status_get(server, "/api/events")[0] == 200  # the server still serves
        time.sleep(0.5)
    finally:
        server.stop()
    assert "Traceback" not in server.log and "Error handling request" not in server.log, server.log


def _fetch_boot_scripts(port: int, seconds: float) -> list[float]:
    """boot.ipxe fetched every 50 ms for `seconds`, each on a new connection: the latency of each fetch."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/boot.ipxe")
        response = conn.getresponse()
        assert response.status == 200 and b"chain" in response.read()
        conn.close()
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    return latencies


def test_reading_10000_machines_never_delays_a_boot_fetch_beyond_250ms(tmp_path: Path) -> None:
    out = fake_out(tmp_path / "out", "direct")
    argv = [sys.executable, str(ROOT / "tests/status_fleet.py"), "10000", "20", "--dir", str(out),
            "--http", "127.0.0.1:0", "--no-tftp", "--status", "127.0.0.1:0"]
    server = ServerProcess(command=argv)
    hammer = None
    try:
        assert machines_api(server, "?limit=1")["total"] == 10_000
        # What this machine adds by itself (other processes taking the cores), measured on the same server with
        # nobody reading: the bound is 250 ms beyond it, so that a loaded test machine does not decide the result.
        alone = _fetch_boot_scripts(server.http_port, 5)
        hammer = subprocess.Popen([sys.executable, "-c", _HAMMER, str(server.status_port)], stdout=subprocess.PIPE,
                                  text=True)
        latencies = _fetch_boot_scripts(server.http_port, 15)
    finally:
        done = ""
        if hammer is not None:
            hammer.terminate()
            done, _ = hammer.communicate(timeout=30)
        server.stop()
    counts = json.loads(done.strip().splitlines()[-1])
    print(f"boot.ipxe latency while reading: median {sorted(latencies)[len(latencies) // 2] * 1e3:.1f} ms, "
          f"max {max(latencies) * 1e3:.1f} ms over {len(latencies)} fetches (max {max(alone) * 1e3:.1f} ms with "
          f"no reader); reads: {counts}")
    # The reads were real and whole, and went on all along: pages of 1,000 machines of 20 events (a whole
    # record's work each), the page, /metrics.
    assert counts["machines"] >= 2 and counts["page"] >= 2 and counts["metrics"] >= 2 and not counts["errors"], counts
    assert len(latencies) > 100
    assert max(latencies) < 0.25 + max(alone), (sorted(latencies)[-5:], max(alone))


# Readers hammering the status listener, four at once, until terminated; then how many reads each kind made.
_HAMMER = r"""
import json, signal, sys, threading, urllib.request
port = int(sys.argv[1])
counts = {"machines": 0, "page": 0, "metrics": 0, "errors": 0}
paths = {"machines": "/api/machines?limit=1000&state=handed-over", "page": "/?limit=1000", "metrics": "/metrics"}
stop = threading.Event()
def read(kind):
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{paths[kind]}", timeout=60) as r:
                body = r.read()
            if kind == "machines":
                data = json.loads(body)
                assert data["total"] == 10000 and len(data["machines"]) == 1000
                assert len(data["machines"][0]["events"]) == 20
            counts[kind] += 1
        except Exception as e:
            counts["errors"] += 1
            print(repr(e), file=sys.stderr)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
threads = [threading.Thread(target=read, args=(k,), daemon=True) for k in ("machines", "machines", "page", "metrics")]
for t in threads:
    t.start()
signal.sigwait([signal.SIGTERM])
stop.set()
print(json.dumps(counts), flush=True)
"""
