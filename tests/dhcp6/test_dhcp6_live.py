"""`netboot serve --dhcp6` as a real process on an IPv6-only namespace LAN, against real clients: a socket sending
firmware's messages from its link-local address to ff02::1:2, and ISC's perfdhcp -6 (Debian's kea-admin)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from dhcp6_support import ADVERTISE, INFORMATION_REQUEST, REPLY, REQUEST, edk2, ipxe, read
from lan_support import LanServer, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import cli, fake_out, need

from devtools.lan import Host, Lan
from devtools.postgres import Cluster
from netboot.dhcp import journal
from netboot.dhcp6.leases import KIND

PROBE = Path(__file__).with_name("probe6.py")
SERVER = "2001:db8::10/64"
RANGE = "2001:db8::1000-2001:db8::1fff"
NODE1 = "52:54:00:00:06:01"


def probe(host: Host, *datagrams: bytes, wait: float = 2.0, expect: int = 0) -> list[tuple[str, bytes]]:
    host.link_local()  # nothing can be sent from a tentative address
    proc = host.run([sys.executable, PROBE, "--wait", str(wait), "--expect", str(expect),
                     *(d.hex() for d in datagrams)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [(line.split()[0], bytes.fromhex(line.split()[1])) for line in proc.stdout.splitlines()]


def wait_for(server: LanServer, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log:
        assert server.proc.poll() is None, f"netboot serve exited:\n{server.log}"
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log}"
        time.sleep(0.05)


def start(lan: Lan, tmp_path: Path, mode: str, *extra: str) -> tuple[Host, LanServer]:
    host = lan.host("netboot", SERVER)
    host.link_local()
    out = fake_out(tmp_path / "out")
    server = serve_in(host, "--dir", out, "--dhcp6", mode, "--state-dir", tmp_path / "state",
                      "--http", "[::]:8080", "--tftp", "[::]:69", "--status", "none", *extra)
    wait_for(server, "dhcp6: ")
    return host, server


def test_edk2_gets_an_address_and_its_loader_and_ipxe_its_script(lan: Lan, tmp_path: Path) -> None:
    _, server = start(lan, tmp_path, RANGE)
    client = lan.host("client", "2001:db8::50/64")
    replies = probe(client, edk2(mac=NODE1), expect=1)
    assert len(replies) == 1, server.log
    source, data = replies[0]
    assert source.startswith("[fe80::") and source.endswith("]:547")
    advertise = read(data)
    assert advertise.type == ADVERTISE
    [(iaid, address, preferred, valid)] = advertise.addresses
    assert (iaid, address, preferred, valid) == (1, "2001:db8::1000", 3600, 3600)
    assert advertise.one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    server_id = advertise.one(2)
    [(_, data)] = probe(client, edk2(REQUEST, mac=NODE1, server=server_id, addresses=(address,)), expect=1)
    reply = read(data)
    assert reply.type == REPLY and [a[1] for a in reply.addresses] == [address]
    wait_for(server, f"dhcp6: {NODE1} uefi-x64-pxe REPLY address={address} boot=tftp://[2001:db8::10]/ipxe.efi")
    # Then iPXE, from the same machine: its Information-Request gets the script.
    [(_, data)] = probe(client, ipxe(INFORMATION_REQUEST, mac=NODE1, ia=False), expect=1)
    assert read(data).one(59) == b"http://[2001:db8::10]:8080/boot.ipxe"
    server.stop()
    leases, _ = journal.read(tmp_path / "state", KIND)
    assert [lease.ip for lease in leases.values()] == [address]
    # The server's DUID survives a restart (RFC 8415 §11).
    _, again = start_again(lan, tmp_path)
    [(_, data)] = probe(client, edk2(mac=NODE1), expect=1)
    assert read(data).one(2) == server_id and read(data).addresses[0][1] == address
    again.stop()


def start_again(lan: Lan, tmp_path: Path) -> tuple[Host, LanServer]:
    host = lan.hosts["netboot"]
    server = serve_in(host, "--dir", tmp_path / "out", "--dhcp6", RANGE, "--state-dir", tmp_path / "state",
                      "--http", "[::]:8080", "--tftp", "[::]:69", "--status", "none")
    wait_for(server, "dhcp6: ")
    return host, server


def test_stateless_answers_boot_clients_only(lan: Lan, tmp_path: Path) -> None:
    _, server = start(lan, tmp_path, "stateless")
    client = lan.host("client", "2001:db8::50/64")
    # iPXE's address request is the site server's; its Information-Request gets the script.
    replies = probe(client, ipxe(mac=NODE1), ipxe(INFORMATION_REQUEST, mac=NODE1, ia=False), expect=1)
    assert [read(d).type for _, d in replies] == [REPLY], server.log
    assert read(replies[0][1]).one(59) == b"http://[2001:db8::10]:8080/boot.ipxe"
    # EDK2's: a proxy offer (no address), then its boot server discovery on port 4011, answered from there.
    [(_, data)] = probe(client, edk2(mac=NODE1), expect=1)
    assert read(data).type == ADVERTISE and 3 not in read(data).options and read(data).one(16)[6:] == b"PXEClient"
    client.link_local()
    proc = client.run([sys.executable, PROBE, "--to", SERVER.split("/")[0], "--server-port", "4011", "--port",
                       "4012", "--expect", "1", edk2(REQUEST, mac=NODE1, ia=False, server=b"\0\3\0\1site!!").hex()],
                      capture_output=True, text=True, timeout=60)
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"[{SERVER.split('/')[0]}]:4011 ")
    assert read(bytes.fromhex(line.split()[1])).one(59) == b"tftp://[2001:db8::10]/ipxe.efi"
    assert not (tmp_path / "state" / KIND.name).exists()
    server.stop()


def test_garbage_costs_bounded_log_lines(lan: Lan, tmp_path: Path) -> None:
    import random

    _, server = start(lan, tmp_path, RANGE)
    client = lan.host("client", "2001:db8::50/64")
    rng = random.Random(6)
    valid = edk2(mac=NODE1)
    garbage = [rng.randbytes(rng.randrange(1, 1200)) for _ in range(300)]
    garbage += [valid[:cut] + rng.randbytes(rng.randrange(0, 20)) for cut in range(1, len(valid))]
    garbage += [bytes([12, 0]) * 17 * 40]  # Relay-Forward headers, nothing inside
    probe(client, *garbage, wait=1)
    [(_, data)] = probe(client, valid, expect=1)
    assert read(data).type == ADVERTISE
    dropped = [ln for ln in server.lines if "dhcp6: dropped a datagram" in ln]
    assert 1 <= len(dropped) <= 2, dropped
    assert all(len(ln) < 400 for ln in dropped)
    assert "Traceback" not in server.log
    assert server.proc.poll() is None
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("relayed", [False, True], ids=["direct", "relayed"])
def test_perfdhcp_many_clients_no_address_twice(lan: Lan, tmp_path: Path, relayed: bool) -> None:
    need("perfdhcp")
    _, server = start(lan, tmp_path, RANGE)
    client = lan.host("client", "2001:db8::50/64")
    client.link_local()
    # 2,000 clients at 500 a second, each Solicit → Advertise → Request → Reply; relayed: perfdhcp wraps each
    # message in a Relay-Forward (-A 1), and takes only Relay-Replies back.
    proc = client.run(["perfdhcp", "-6", "-l", "eth0", "-r", "500", "-n", "2000", "-R", "2000", "-p", "10",
                       *(["-A", "1"] if relayed else [])],
                      capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr  # 3: some packets were dropped
    replies = re.search(r"Statistics for: REQUEST-REPLY\*+\nsent packets: \d+\nreceived packets: (\d+)", proc.stdout)
    assert replies is not None, proc.stdout
    assert re.findall(r"non unique addresses: (\d+)", proc.stdout) == ["0", "0"], proc.stdout
    server.stop()
    leases, _ = journal.read(tmp_path / "state", KIND)
    addresses = [lease.ip for lease in leases.values()]
    assert len(addresses) == len(set(addresses)), "an address leased twice"
    # Every Reply perfdhcp received is a lease in the journal (durable before it was sent).
    assert len(addresses) >= int(replies.group(1)) >= 1900, (len(addresses), proc.stdout)


@pytest.mark.slow
def test_two_servers_on_one_database_lease_each_address_once(lan: Lan, tmp_path: Path, postgres: Cluster) -> None:
    """Two `netboot serve --dhcp6 RANGE --database URL` on one link: both hear every Solicit; perfdhcp -6 takes the
    first Advertise of each; every address is leased once, in the shared table lease6."""
    need("perfdhcp")
    out = fake_out(tmp_path / "out")
    servers = []
    for name, address in (("a", SERVER), ("b", "2001:db8::11/64")):
        host = lan.host(name, address)
        host.link_local()
        servers.append(serve_in(host, "--dir", out, "--dhcp6", RANGE, "--database", postgres.url, "--name", name,
                                "--state-dir", tmp_path / name, "--http", "[::]:8080", "--no-tftp",
                                "--status", "none"))
    for server in servers:
        wait_for(server, "dhcp6: DHCPv6 server for")
    client = lan.host("client", "2001:db8::50/64")
    client.link_local()
    proc = client.run(["perfdhcp", "-6", "-l", "eth0", "-r", "200", "-n", "1000", "-R", "1000", "-p", "10"],
                      capture_output=True, text=True, timeout=120)
    for server in servers:
        server.stop()
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    replies = re.search(r"Statistics for: REQUEST-REPLY\*+\nsent packets: \d+\nreceived packets: (\d+)", proc.stdout)
    assert replies is not None and int(replies.group(1)) >= 950, proc.stdout
    held = postgres.psql("SELECT count(*), count(DISTINCT address), count(DISTINCT server) FROM lease6 "
                         "WHERE state = 0").split("|")
    assert held[0] == held[1] and int(held[0]) >= int(replies.group(1)), (held, replies.group(1))
    assert held[2] == "2", "both servers granted leases"
    assert "leases in lease6 of the database" in servers[0].log


@pytest.mark.parametrize(("args", "message"), [
    (["--dhcp6", "bogus"], "--dhcp6 'bogus': expected stateless or a range START-END of IPv6 addresses"),
    (["--dhcp6", "2001:db8::9-2001:db8::1"], "START <= END"),
    (["--dhcp6", "fe80::1-fe80::9"], "expected a range of global (or unique local) unicast addresses"),
    (["--dhcp6", "::ffff:0:1-::ffff:0:9"], "expected a range of global (or unique local) unicast addresses"),
    (["--dhcp6-interface", "eth0"], "--dhcp6-interface needs --dhcp6"),
    (["--dhcp6-lease-time", "600"], "--dhcp6-lease-time needs --dhcp6"),
    (["--dhcp6", "stateless", "--dhcp6-lease-time", "600"], "--dhcp6-lease-time is for --dhcp6 START-END"),
    (["--dhcp6", RANGE, "--dhcp6-lease-time", "5"], "--dhcp6-lease-time 5: expected 60"),
    (["--dhcp6", "2001:db8:77::1-2001:db8:77::9"],
     "--dhcp6 2001:db8:77::1-2001:db8:77::9: no interface has an address in a prefix holding this whole range"),
    (["--dhcp6", "stateless", "--dhcp6-interface", "nosuch0"], "--dhcp6-interface nosuch0: no such network"),
])
def test_bad_dhcp6_options(tmp_path: Path, args: list[str], message: str) -> None:
    proc = cli("serve", "--dir", fake_out(tmp_path / "out"), "--http", "127.0.0.1:0", "--no-tftp", "--status",
               "none", "--state-dir", tmp_path / "state", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("netboot: error: ") and message in last, proc.stderr


def test_dhcp6_interface_limits_where_it_answers(lan: Lan, tmp_path: Path) -> None:
    _, elsewhere = start(lan, tmp_path, "stateless", "--dhcp6-interface", "lo")
    client = lan.host("client", "2001:db8::50/64")
    assert probe(client, ipxe(INFORMATION_REQUEST, mac=NODE1, ia=False), wait=1) == []
    elsewhere.stop()
    here = serve_in(lan.hosts["netboot"], "--dir", tmp_path / "out", "--dhcp6", "stateless", "--dhcp6-interface",
                    "eth0", "--state-dir", tmp_path / "state", "--http", "[::]:8080", "--tftp", "[::]:69",
                    "--status", "none")
    wait_for(here, "dhcp6: boot information (stateless) on eth0, port 547")
    assert [read(d).type for _, d in probe(client, ipxe(INFORMATION_REQUEST, mac=NODE1, ia=False), expect=1)] == [
        REPLY]
    here.stop()
