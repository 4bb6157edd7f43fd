"""The status listener of a real `netboot serve`: the machines API, boot events, Prometheus metrics, the page and
its token, driven by real HTTP and TFTP clients."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess, cli, need, write_machines

from netboot.status.record import BootRecord

HTTP_MAC, TFTP_MAC, ABORT_MAC, IDLE_MAC, STRANGER = (
    "52:54:00:00:0a:01", "52:54:00:00:0a:02", "52:54:00:00:0a:03", "52:54:00:00:0a:04", "52:54:00:00:0f:0f")


def hyphens(mac: str) -> str:
    return mac.replace(":", "-")


@pytest.fixture
def machines_file(outs: dict[str, Path], tmp_path: Path) -> Path:
    """Profiles without a default, so that a stranger's MAC matches none."""
    return write_machines(tmp_path / "machines.toml", {"squash": outs["squashfs"], "direct": outs["direct"]},
                          {HTTP_MAC: "squash", TFTP_MAC: "direct", ABORT_MAC: "squash", IDLE_MAC: "direct"})


@pytest.fixture
def server(machines_file: Path):
    s = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    yield s
    s.stop()


def get(server: ServerProcess, path: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{server.status_port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.read()


def api(server: ServerProcess, path: str) -> Any:
    return json.loads(get(server, path))


def by_mac(server: ServerProcess) -> dict[str, dict[str, Any]]:
    return {m["mac"]: m for m in api(server, "/api/machines")["machines"]}


def boot_paths(script: str) -> list[str]:
    """The kernel and initrd a machine script names (absolute paths under /machine/...)."""
    return re.findall(r"(/machine/\S+/(?:bzImage|initrd))", script)


def http_boot(server: ServerProcess, mac: str) -> tuple[int, int]:
    """What iPXE does over HTTP: boot.ipxe, the machine's script, its kernel and initrd. Returns the bytes of
    boot.ipxe and those of the machine's own files."""
    with urllib.request.urlopen(server.url("boot.ipxe"), timeout=30) as r:
        chain = len(r.read())
    with urllib.request.urlopen(server.url(f"machine/{hyphens(mac)}/boot.ipxe"), timeout=30) as r:
        script = r.read()
    total = len(script)
    for path in boot_paths(script.decode()):
        with urllib.request.urlopen(server.url(path), timeout=60) as r:
            total += len(r.read())
    return chain, total


def tftp_get(server: ServerProcess, path: str) -> bytes:
    need("curl")
    proc = subprocess.run(["curl", "-sS", "--tftp-blksize", "1432", f"tftp://127.0.0.1:{server.tftp_port}/{path}"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tftp_boot(server: ServerProcess, mac: str) -> tuple[int, int]:
    chain = len(tftp_get(server, "boot.ipxe"))
    script = tftp_get(server, f"machine/{hyphens(mac)}/boot.ipxe")
    total = len(script)
    for path in boot_paths(script.decode()):
        total += len(tftp_get(server, path.lstrip("/")))
    return chain, total


def eventually(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 30) -> Any:
    """What `read()` gives once `done` says so, or after `timeout` seconds (for the assertion to show)."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def metrics(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(get(server, "/metrics").decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_machines_events_and_metrics_follow_boots_over_http_and_tftp(server: ServerProcess,
                                                                        outs: dict[str, Path]) -> None:
    assert by_mac(server)[IDLE_MAC]["state"] == "configured"
    http_chain, http_bytes = http_boot(server, HTTP_MAC)
    tftp_chain, tftp_bytes = tftp_boot(server, TFTP_MAC)
    with urllib.request.urlopen(server.url(f"machine/{hyphens(STRANGER)}/boot.ipxe"), timeout=30) as r:
        stranger_bytes = len(r.read())

    machines = by_mac(server)
    http, tftp = machines[HTTP_MAC], machines[TFTP_MAC]
    assert (http["state"], http["profile"], http["last"]["protocol"]) == ("handed-over", "squash", "http")
    assert (tftp["state"], tftp["profile"], tftp["last"]["protocol"]) == ("handed-over", "direct", "tftp")
    squash_manifest = json.loads((outs["squashfs"] / "manifest.json").read_text())
    assert http["system"] == squash_manifest["system"] and http["build"]
    assert http["last"]["path"].endswith("/initrd") and http["client"] == "127.0.0.1"
    # The machine's own bytes: its script, kernel and initrd (boot.ipxe names no machine).
    squash = outs["squashfs"]
    assert http["bytes"] == http_bytes and tftp["bytes"] == tftp_bytes
    assert http["first_request"] <= http["last_request"]
    assert [e["path"].rsplit("/", 1)[-1] for e in http["events"]] == ["initrd", "bzImage", "boot.ipxe"]
    assert machines[STRANGER]["state"] == "unknown-mac" and machines[STRANGER]["profile"] is None
    assert machines[IDLE_MAC]["state"] == "configured"
    assert api(server, "/api/machines?state=handed-over&profile=direct")["machines"][0]["mac"] == TFTP_MAC

    events = api(server, "/api/events")
    seqs = [e["seq"] for e in events["events"]]
    assert seqs == sorted(seqs, reverse=True) and events["last"] == seqs[0]
    newer = api(server, f"/api/events?since={seqs[2]}")["events"]
    assert [e["seq"] for e in newer] == seqs[:2]

    m = metrics(server)
    assert m["netboot_sent_bytes_total", (("protocol", "http"), ("status", "200"))] == (
        http_chain + http_bytes + stranger_bytes)
    assert m["netboot_sent_bytes_total", (("protocol", "tftp"), ("status", "complete"))] == tftp_chain + tftp_bytes
    assert m["netboot_requests_total", (("protocol", "http"), ("status", "200"))] == 5
    assert m["netboot_requests_total", (("protocol", "tftp"), ("status", "complete"))] == 4
    initrd, kernel = (squash / "initrd").stat().st_size, (squash / "bzImage").stat().st_size
    assert http_bytes > initrd + kernel
    assert m["netboot_boots_started_total", (("profile", "squash"),)] == 1
    assert m["netboot_boots_handed_over_total", (("profile", "direct"),)] == 1
    assert m["netboot_machines", (("state", "handed-over"),)] == 2
    assert m["netboot_transfers_in_flight", (("protocol", "tftp"),)] == 0
    info = [k for k in m if k[0] == "netboot_build_info"]
    assert {dict(labels)["profile"] for _, labels in info} == {"squash", "direct"}
    assert m["netboot_reloads_total", ()] == 0


def test_aborted_transfers_are_failed(server: ServerProcess, outs: dict[str, Path]) -> None:
    with urllib.request.urlopen(server.url(f"machine/{hyphens(ABORT_MAC)}/boot.ipxe"), timeout=30) as r:
        initrd = next(p for p in boot_paths(r.read().decode()) if p.endswith("initrd"))
    # A client that stops mid-initrd: it reads the headers and a little, then resets the connection.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        s.sendall(f"GET {initrd} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
    machine = eventually(lambda: by_mac(server)[ABORT_MAC], lambda m: m["state"] == "failed")
    assert machine["state"] == "failed", machine
    assert machine["last"]["status"] == "aborted" and machine["last"]["path"] == initrd
    assert 0 <= machine["last"]["bytes"] < (outs["squashfs"] / "initrd").stat().st_size

    # Over TFTP: the client answers the initrd's first block with an ERROR.
    from tftp.rawtftp import Peer

    script = tftp_get(server, f"machine/{hyphens(TFTP_MAC)}/boot.ipxe").decode()
    initrd = next(p for p in boot_paths(script) if p.endswith("initrd"))
    with Peer() as peer:
        peer.request(server.tftp_port, initrd.lstrip("/"))
        _, port = peer.receive()
        peer.send(b"\0\5\0\0stop\0", port)
    machine = eventually(lambda: by_mac(server)[TFTP_MAC], lambda m: m["state"] == "failed")
    assert machine["state"] == "failed" and machine["last"]["status"] == "aborted by client", machine
    # A file that does not exist (a build no longer served) is an error sent: failed too.
    proc = subprocess.run(["curl", "-sS", f"tftp://127.0.0.1:{server.tftp_port}/machine/{hyphens(IDLE_MAC)}/0/initrd"],
                          capture_output=True, timeout=60)
    assert proc.returncode != 0
    machine = eventually(lambda: by_mac(server)[IDLE_MAC], lambda m: m["state"] == "failed")
    assert machine["state"] == "failed" and machine["last"]["status"] == "ERROR 1", machine
    assert metrics(server)["netboot_tftp_refused_total", ()] == 1


def test_the_event_stream_sends_each_boot_event(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.status_port), timeout=30) as s:
        s.sendall(b"GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = s.recv(4096).decode()
        assert "200 OK" in head and "text/event-stream" in head
        with urllib.request.urlopen(server.url(f"machine/{hyphens(HTTP_MAC)}/boot.ipxe"), timeout=30):
            pass
        data = b""
        while b"\n\n" not in data.split(b"data: ", 1)[-1]:
            data += s.recv(4096)
    event = json.loads(data.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert event["mac"] == HTTP_MAC and event["path"] == f"/machine/{hyphens(HTTP_MAC)}/boot.ipxe"


def test_the_page_without_javascript(server: ServerProcess) -> None:
    http_boot(server, HTTP_MAC)
    page = get(server, "/").decode()
    assert "<script src" not in page and "http://" not in page.split("<script>")[0]  # no external assets
    assert re.search(rf'<tr id="m-{HTTP_MAC}" data-state="handed-over" data-profile="squash">', page)
    assert re.search(rf'<tr id="m-{IDLE_MAC}" data-state="configured"', page)
    # Counts by state at the top, the last hour's chart drawn by the server, the boot's duration and relative times.
    counts = dict(re.findall(r'<li class="count [^"]+" data-state="([^"]+)">.*?<b>(\d+)</b>', page))
    assert counts == {"configured": "3", "booting": "0", "handed-over": "1", "failed": "0", "unknown-mac": "0"}
    chart = re.search(r'<svg id="chart".*?</svg>', page, re.S)
    assert chart is not None and 'data-started="1" data-handed-over="1"' in chart.group(0)
    assert len(re.findall(r'<rect class="started"', chart.group(0))) == 1
    assert len(re.findall(r'<rect class="handed-over"', chart.group(0))) == 1
    row = page.split(f'<tr id="m-{HTTP_MAC}"', 1)[1].split("</tr>", 1)[0]
    assert re.search(r'<td class="num">\d+\.\d s</td>', row), row
    assert re.search(r'data-ago>(now|\d+ s ago)</time>', row), row
    only_idle = get(server, "/?state=configured").decode()
    assert IDLE_MAC in only_idle and HTTP_MAC not in only_idle


def test_a_token_guards_every_route(machines_file: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp",
                           "--status", "127.0.0.1:0", "--status-token-file", token)
    try:
        for path in ("/", "/api/machines", "/api/events", "/api/events/stream", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as e:
                get(server, path)
            assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")
            with pytest.raises(urllib.error.HTTPError):
                get(server, path, {"Authorization": "Bearer wrong"})
        machines = json.loads(get(server, "/api/machines", {"Authorization": "Bearer s3cret"}))
        assert IDLE_MAC in {m["mac"] for m in machines["machines"]}
        assert b"netboot: machines" in get(server, "/?token=s3cret")
    finally:
        server.stop()


def test_status_listener_errors(machines_file: Path, tmp_path: Path) -> None:
    args = ("serve", "--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp")
    public = cli(*args, "--status", "0.0.0.0:0", timeout=30)
    assert public.returncode != 0 and "--status-token" in public.stderr and "--status-public" in public.stderr
    assert len(public.stderr.strip().splitlines()) == 1, public.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    no_token = cli(*args, "--status-token-file", empty, timeout=30)
    assert no_token.returncode != 0 and "holds no token" in no_token.stderr
    bad = cli(*args, "--status", "localhost:x", timeout=30)
    assert bad.returncode != 0 and "--status" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli(*args, "--status", f"127.0.0.1:{taken.getsockname()[1]}", timeout=30)
    assert busy.returncode != 0 and "cannot listen for the status page" in busy.stderr


def test_no_status_listener(machines_file: Path) -> None:
    server = ServerProcess("--machines", machines_file, "--http", "127.0.0.1:0", "--no-tftp", "--status", "none")
    try:
        assert server.status_port == 0 and "status:" not in server.log
        with urllib.request.urlopen(server.url(f"machine/{hyphens(HTTP_MAC)}/boot.ipxe"), timeout=30) as r:
            assert r.status == 200
    finally:
        server.stop()


def test_the_record_stays_bounded() -> None:
    record = BootRecord(max_machines=100, per_machine=5, recent=50)
    record.configure({IDLE_MAC: "p"})
    for i in range(10_000):
        mac = f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}"
        for _ in range(3):
            record.record("192.0.2.1", "http", f"/machine/{hyphens(mac)}/boot.ipxe", "200", True, 10, mac, None)
    record.flush()
    assert len(record.machines) == 101 and IDLE_MAC in record.machines
    assert len(record.events_since(0)) == 50 and all(len(m.events) <= 5 for m in record.machines.values())
    newest = f"02:00:00:00:{9999 >> 8:02x}:{9999 & 0xFF:02x}"
    assert newest in record.machines  # the least recently active were forgotten, not the newest


def test_a_machine_active_again_outlives_one_that_was_not() -> None:
    """Beyond max_machines the least recently active goes: B, though A came first, as A asked again."""
    a, b, c, d = (f"02:00:00:00:00:0{i}" for i in range(1, 5))
    record = BootRecord(max_machines=2)
    for mac in (a, b, a, c):
        record.record("192.0.2.1", "http", f"/machine/{hyphens(mac)}/boot.ipxe", "200", True, 10, mac, None)
    record.flush()
    assert set(record.machines) == {a, c}
    # A machine that keeps asking outlives a flood of others that ask once.
    record = BootRecord(max_machines=100)
    for i in range(2_000):
        for mac in (d, f"02:00:00:01:{i >> 8:02x}:{i & 0xFF:02x}"):
            record.record("192.0.2.1", "http", f"/machine/{hyphens(mac)}/boot.ipxe", "200", True, 10, mac, None)
        if i % 7 == 0:
            record.flush()
    record.flush()
    assert d in record.machines and len(record.machines) == 100


def test_reloads_are_counted_and_the_machines_follow_the_file(server: ServerProcess, machines_file: Path,
                                                              outs: dict[str, Path]) -> None:
    http_boot(server, HTTP_MAC)
    good = machines_file.read_text()
    machines_file.write_text(good + "\n[machines.oops\n")  # a syntax error: refused, the previous one kept
    m = eventually(lambda: metrics(server), lambda m: m.get(("netboot_reload_failures_total", ())) == 1)
    assert m["netboot_reload_failures_total", ()] == 1 and m["netboot_reloads_total", ()] == 1
    assert IDLE_MAC in by_mac(server)
    # Without IDLE_MAC (never seen: gone from the list) and HTTP_MAC (seen: kept, no longer configured).
    write_machines(machines_file, {"squash": outs["squashfs"], "direct": outs["direct"]},
                   {TFTP_MAC: "direct", ABORT_MAC: "squash"})
    eventually(lambda: metrics(server), lambda m: m.get(("netboot_reloads_total", ())) == 2)
    machines = by_mac(server)
    assert IDLE_MAC not in machines and machines[HTTP_MAC]["configured"] is False
    assert machines[HTTP_MAC]["state"] == "handed-over" and machines[TFTP_MAC]["configured"] is True
