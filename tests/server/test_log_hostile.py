"""What clients send, in the log of a real `netboot serve`: escaped wherever it appears, so that no client forges a
line or rewrites the operator's terminal, and bounded under a flood of junk requests."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from support import ServerProcess, fake_out

from netboot.tftp import packets

MAC = "52-54-00-12-34-56"
TOKEN = "s3cret-token"
# Erase the line, go back to its start and write another: what a raw \r or ESC would do in a terminal.
FORGED = "\r\x1b[2Knetboot: 10.0.0.9 mac=- profile=- http /all-is-well 200"


def raw_characters(log: str) -> set[str]:
    """What of the log no client should have been able to put there: control characters other than its line ends,
    and lines that do not start as the server starts its lines."""
    found = {c for c in log if not c.isprintable() and c != "\n"}
    return found | {line[:60] for line in log.splitlines() if not line.startswith("netboot: ")}


def http_get(port: int, path: str) -> int:
    """GET `path` as it is on the wire (percent escapes left for the server to decode)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def tftp_ask(port: int, name: str | bytes) -> packets.Packet:
    """One RRQ for `name` (bytes: exactly those), and the first answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(30)
        raw = name if isinstance(name, bytes) else name.encode()
        s.sendto(b"\0\1" + raw + b"\0octet\0", ("127.0.0.1", port))
        data, _ = s.recvfrom(70000)
        return packets.parse(data)


@pytest.fixture
def server(tmp_path: Path):
    s = ServerProcess("--dir", fake_out(tmp_path / "out", "direct"), "--http", "127.0.0.1:0", "--tftp", "127.0.0.1:0")
    yield s
    s.stop()


def test_control_characters_in_an_http_path_are_escaped_in_the_log(server: ServerProcess) -> None:
    assert http_get(server.http_port, "/%0D%1B[2Knetboot:%20forged%0Aline%5Cx41%E2%80%AE%C3%A9") == 404
    # Each is one \xNN (\u for a character beyond ASCII: a right-to-left override), a backslash is doubled so that
    # none reads as an escape, and printable text beyond ASCII stays as it is.
    assert server.logged(r"http /\x0d\x1b[2Knetboot: forged\x0aline\\x41\u202eé 404"), server.log
    # What iPXE says of itself (${buildarch}) goes into the refusal of a machine of another architecture.
    assert http_get(server.http_port, f"/machine/{MAC}/buildarch=arm%0D%1B[2Kx86_64/boot.ipxe") == 200
    assert server.logged(r"this machine is arm\x0d\x1b[2Kx86_64"), server.log
    server.stop()
    assert not raw_characters(server.log), server.log


def test_a_tftp_name_with_blanks_around_its_mac_is_refused_and_logged_escaped(server: ServerProcess) -> None:
    for name in (f"machine/ {MAC}/boot.ipxe", f"machine/{MAC}\t/boot.ipxe", f"machine/{MAC}\r\n/boot.ipxe"):
        answer = tftp_ask(server.tftp_port, name)
        assert isinstance(answer, packets.Error) and "invalid MAC address" in answer.message, (name, answer)
    assert server.logged(r"'machine/ 52-54-00-12-34-56/boot.ipxe': refused, invalid MAC address ' 52-54-00-12-34-56'")
    assert server.logged(r"'machine/52-54-00-12-34-56\x0d\x0a/boot.ipxe': refused, invalid MAC address "
                         r"'52-54-00-12-34-56\x0d\x0a' (ERROR 0)"), server.log
    assert server.logged(r"'machine/52-54-00-12-34-56\x09/boot.ipxe': refused"), server.log
    # Bytes that are not UTF-8 are shown as the bytes they are.
    answer = tftp_ask(server.tftp_port, b"\xff\x1b[2K" + FORGED.encode())
    assert isinstance(answer, packets.Error) and answer.code == packets.ErrorCode.FILE_NOT_FOUND, answer
    assert server.logged(r"'\xff\x1b[2K\x0d\x1b[2Knetboot: 10.0.0.9"), server.log
    # The one name parser serves HTTP too.
    assert http_get(server.http_port, f"/machine/%20{MAC}/boot.ipxe") == 400
    server.stop()
    assert not raw_characters(server.log), server.log


def test_a_machines_table_written_over_the_api_is_logged_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "overlay/etc").mkdir(parents=True)  # (a profile with an overlay: a machine's other keys are its
    (tmp_path / "overlay/etc/hostname.j2").write_text("{{ hostname }}\n")  # variables)
    machines = tmp_path / "machines.toml"
    machines.write_text(f'[profiles.p]\ndir = "{fake_out(tmp_path / "out", "direct")}"\noverlay = "overlay"\n')
    server = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp", "--status-token", TOKEN)
    try:
        body = json.dumps({"profile": "p", f"role{FORGED}\n": f"db{FORGED}", "hostname": "node1"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{server.status_port}/api/machines/{MAC}", data=body,
                                         method="PUT", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 201
        assert server.logged(r"machines file: 52:54:00:12:34:56 added (profile='p', role\x0d\x1b[2Knetboot: "), \
            server.log
        line = next(line for line in server.log.splitlines() if "machines file: 52:54:00:12:34:56 added" in line)
        assert r"\x0a" in line or "…" in line, line
    finally:
        server.stop()
    assert not raw_characters(server.log), server.log


def test_2000_junk_tftp_requests_write_a_bounded_number_of_lines(server: ServerProcess) -> None:
    """Refusals are logged one by one up to a hundred a second; beyond, one line a second counts the rest. Every
    request is answered (a few at a time, so that none is lost to a full socket buffer) and every refusal is in
    the log, one by one or counted."""
    junk = [f"junk/{i}/{'x' * (i % 50)}" for i in range(2000)]
    before = len(server.log.splitlines())
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(30)
        answered = 0
        for first in range(0, len(junk), 50):
            for name in junk[first:first + 50]:
                s.sendto(packets.build_request(name, "octet", ()), ("127.0.0.1", server.tftp_port))
            for _ in junk[first:first + 50]:
                assert isinstance(packets.parse(s.recvfrom(70000)[0]), packets.Error)
                answered += 1
    took = time.monotonic() - started
    assert answered == len(junk)

    def accounted() -> tuple[list[str], list[int]]:
        lines = server.log.splitlines()[before:]
        one_by_one = [line for line in lines if "'junk/" in line and "refused" in line]
        counted = [int(m.group(1)) for line in lines if (m := re.search(r"and (\d+) more requests refused", line))]
        return one_by_one, counted

    deadline = time.monotonic() + 30  # the last count comes a second after the first request it counts
    while (found := accounted()) and len(found[0]) + sum(found[1]) < len(junk) and time.monotonic() < deadline:
        time.sleep(0.1)
    one_by_one, counted = accounted()
    print(f"{len(junk)} junk requests in {took:.2f} s: {len(one_by_one)} lines one by one, {len(counted)} counting "
          f"{sum(counted)}")
    assert len(one_by_one) + sum(counted) == len(junk)
    # At most a hundred a second, and a line counting the rest of each second that had more.
    assert len(one_by_one) <= 100 * (len(counted) + 1), (len(one_by_one), counted)
    assert len(one_by_one) + len(counted) <= 101 * (took + 2), (len(one_by_one), counted, took)
