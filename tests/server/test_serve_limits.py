"""HTTP connection caps of a real `netboot serve`: a few addresses holding idle connections up to the caps never
lock booting machines out; at a cap, the idle connections of the heaviest addresses are closed, oldest first."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

from support import ServerProcess, closed_by_server, fake_out

from netboot.core.clients import client_of


def idle_keepalive(address: str, port: int) -> socket.socket:
    """A connection from `address` that fetched boot.ipxe and keeps the connection open, idle."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(address, 0))
    s.sendall(b"GET /boot.ipxe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    header, body = head.split(b"\r\n\r\n", 1)
    lines = header.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    s.setblocking(False)
    return s


def test_idle_connections_of_four_addresses_never_lock_a_fifth_out(tmp_path: Path, many_files: None) -> None:
    out = fake_out(tmp_path / "out", "direct", initrd_size=48 << 20)
    server = ServerProcess("--dir", out, "--http", "127.0.0.1:0", "--no-tftp", "--status", "none",
                           "--http-max-connections", "64", "--http-max-per-address", "16",
                           "--http-idle-timeout", "120")
    held: list[socket.socket] = []
    try:
        # One connection busy with the initrd, which its client does not read: the server is mid-response.
        busy = socket.create_connection(("127.0.0.1", server.http_port), timeout=10, source_address=("127.0.0.1", 0))
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        busy.sendall(b"GET /initrd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # Four addresses hold the rest of both caps with idle keep-alive connections: 4 x 16 = 64 in all.
        for i in range(63):
            held.append(idle_keepalive(f"127.0.0.{1 + (i + 1) // 16}", server.http_port))
        time.sleep(0.3)
        assert not any(closed_by_server(s) for s in held) and not closed_by_server(busy)
        # A machine booting from a fifth address: every fetch succeeds.
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10,
                                              source_address=("127.0.0.5", 0))
            conn.request("GET", "/boot.ipxe")
            response = conn.getresponse()
            assert response.status == 200 and b"chain" in response.read()
            conn.close()
        # Room was made by closing idle connections, one each, of the heaviest addresses.
        time.sleep(0.3)
        closed = [s for s in held if closed_by_server(s)]
        assert 1 <= len(closed) <= 20
        # The busy connection was not one of them: its client gets the whole initrd.
        busy.settimeout(30)
        data = b""
        while len(data) < (48 << 20):
            chunk = busy.recv(1 << 20)
            assert chunk, "the busy connection was closed"
            data += chunk
        assert data.split(b"\r\n\r\n", 1)[1] == (out / "initrd").read_bytes()[: len(data.split(b"\r\n\r\n", 1)[1])]
        assert "connection limits reached" in server.log and "idle connections closed" in server.log
    finally:
        for s in held:
            s.close()
        server.stop()


def test_one_address_at_its_cap_gets_room_from_its_own_oldest_idle_connection(tmp_path: Path) -> None:
    out = fake_out(tmp_path / "out", "direct")
    server = ServerProcess("--dir", out, "--http", "127.0.0.1:0", "--no-tftp", "--status", "none",
                           "--http-max-per-address", "4", "--http-idle-timeout", "120")
    try:
        first = [idle_keepalive("127.0.0.7", server.http_port) for _ in range(4)]
        other = idle_keepalive("127.0.0.8", server.http_port)
        newest = idle_keepalive("127.0.0.7", server.http_port)
        time.sleep(0.3)
        assert [closed_by_server(s) for s in first] == [True, False, False, False]  # the oldest
        assert not closed_by_server(newest) and not closed_by_server(other)  # another address is not touched
        for s in (*first, other, newest):
            s.close()
    finally:
        server.stop()


def test_ipv6_clients_count_per_64() -> None:
    assert client_of("2001:db8:1:2:aaaa::1") == client_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_of("2001:db8:1:3::1") != client_of("2001:db8:1:2::1")
    assert client_of("::ffff:192.0.2.7") == "192.0.2.7" == client_of("192.0.2.7")
    assert client_of("fe80::1%eth0") == "fe80::/64"
