"""`netboot serve --dhcp` as a real process in a namespace LAN, with a real client socket on the other side."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhcp_support import ACK, DISCOVER, OFFER, REQUEST, edk2, ip, ipxe, parse_reply, plain, request
from lan_support import DNSMASQ_PXE, LanServer, lan_fixture, serve_in  # noqa: F401  (lan_fixture: the `lan` fixture)
from support import cli, fake_out
from test_dhcp_message import HOSTILE

from devtools.lan import Host, Lan
from netboot.dhcp import journal
from netboot.dhcp.journal import JOURNAL, Journal
from netboot.dhcp.leases import Lease

PROBE = Path(__file__).with_name("probe.py")
DORA = Path(__file__).with_name("dora.py")
NODE1, OTHER = "52:54:00:00:03:01", "52:54:00:00:03:02"


def probe(host: Host, *datagrams: bytes, to: str = "255.255.255.255:67", port: int = 68,
          wait: float = 2.0, expect: int | None = None) -> list[tuple[str, object]]:
    """What comes back to `datagrams` sent from `host`: for `wait` seconds, or (`expect`) until that many replies
    and a short grace for one too many."""
    extra = ["--expect", str(expect)] if expect else []
    proc = host.run([sys.executable, PROBE, "--to", to, "--port", str(port), "--wait", str(wait), *extra,
                     *(d.hex() for d in datagrams)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return _replies(proc.stdout)


def _replies(printed: str) -> list[tuple[str, object]]:
    return [(line.split()[0], parse_reply(bytes.fromhex(line.split()[1]))) for line in printed.splitlines()]


@contextlib.contextmanager
def listening(host: Host, port: int = 68) -> Iterator[list[tuple[str, object]]]:
    """What reaches `host` on `port` while the block runs (port 68: every answer broadcast on the LAN), as
    `probe` gives it; filled in once the block ends. probe.py sending nothing, started before the block."""
    proc = host.popen([sys.executable, PROBE, "--port", str(port), "--wait", "3600"], stdout=subprocess.PIPE,
                      text=True)
    deadline = time.monotonic() + 30
    while not host.listening(port, proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "probe.py did not listen"
        time.sleep(0.05)
    heard: list[tuple[str, object]] = []
    try:
        yield heard
    finally:
        proc.terminate()
        printed, _ = proc.communicate(timeout=30)
        heard.extend(_replies(printed))


def wait_for(server: LanServer, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log:
        assert server.proc.poll() is None, f"netboot serve exited:\n{server.log}"
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log}"
        time.sleep(0.05)


def start(host: Host, *args: str | os.PathLike[str]) -> LanServer:
    server = serve_in(host, *args)
    wait_for(server, "dhcp: ")
    return server


def test_proxy_answers_pxe_clients_only_and_on_port_4011(lan: Lan, outs: dict[str, Path]) -> None:
    server = start(lan.host("netboot", "192.0.2.10/24"), "--dir", outs["direct"], "--dhcp", "proxy")
    client = lan.host("client", "192.0.2.50/24")
    replies = probe(client, edk2(mac=NODE1), plain(mac=OTHER), expect=1)
    assert len(replies) == 1, replies  # the ordinary client is left to the site's server
    source, offer = replies[0]
    assert source == "192.0.2.10:67"
    assert (offer.type, offer.mac, offer.yiaddr, offer.siaddr, offer.file) == (
        OFFER, NODE1, "0.0.0.0", "192.0.2.10", "ipxe.efi")
    assert offer.text(60) == "PXEClient" and offer.address(54) == "192.0.2.10"
    # Boot server discovery: the client, now configured, asks port 4011 and is answered there.
    replies = probe(client, edk2(REQUEST, mac=NODE1, ciaddr="192.0.2.50", flags=0), to="192.0.2.10:4011", expect=1)
    assert [(s, r.type, r.file) for s, r in replies] == [("192.0.2.10:4011", ACK, "ipxe.efi")]
    wait_for(server, f"{NODE1} uefi-x64-pxe ACK address=192.0.2.50 boot=tftp://192.0.2.10/ipxe.efi")
    assert f"dhcp: {NODE1} uefi-x64-pxe OFFER address=- boot=tftp://192.0.2.10/ipxe.efi" in server.log
    assert OTHER not in server.log
    server.stop()


def test_garbage_does_not_stop_a_live_server(lan: Lan, outs: dict[str, Path]) -> None:
    server = start(lan.host("netboot", "192.0.2.10/24"), "--dir", outs["direct"], "--dhcp", "proxy")
    client = lan.host("client", "192.0.2.50/24")
    rng = random.Random(8)
    valid = edk2(mac=NODE1)
    garbage = list(HOSTILE.values())
    garbage += [rng.randbytes(rng.randrange(0, 700)) for _ in range(200)]
    garbage += [valid[:cut] + rng.randbytes(rng.randrange(0, 40)) for cut in range(241, len(valid), 3)]
    garbage = [g for g in garbage if g and len(g) < 1400]  # empty datagrams are legal UDP but carry nothing
    answered = probe(client, *garbage, wait=1)
    assert all(r.mac == NODE1 for _, r in answered)  # only what parsed as a request of that machine
    replies = probe(client, valid)
    assert [(r.type, r.mac) for _, r in replies] == [(OFFER, NODE1)], server.log[-3000:]
    assert server.proc.poll() is None
    dropped = [ln for ln in server.lines if "dhcp: dropped a datagram" in ln]
    assert 1 <= len(dropped) <= 2, dropped  # one line, then quiet under a flood
    assert "Traceback" not in server.log
    server.stop()


def test_a_flood_of_pxe_clients_whose_architecture_is_not_a_number_costs_one_line_and_no_address(
        lan: Lan, outs: dict[str, Path], tmp_path: Path) -> None:
    """50 made-up machines whose option 60 says `PXEClient:Arch:²` (a digit to str.isdigit(), not to int()): once
    904 lines of tracebacks and 50 addresses held with no OFFER sent. Now one drop line and nothing held: the next
    machine gets the first address of the range."""
    server = start(lan.host("netboot", "192.0.2.10/24"), "--dir", outs["direct"], "--dhcp", "192.0.2.100-192.0.2.199",
                   "--state-dir", tmp_path / "state")
    client = lan.host("client", "192.0.2.50/24")
    before = len(server.lines)
    flood = [request(DISCOVER, f"52:54:00:00:05:{i:02x}", options=[(60, "PXEClient:Arch:²".encode())])
             for i in range(50)]
    assert probe(client, *flood, wait=1) == []
    assert dora(client, OTHER)[0] == "192.0.2.100"  # answered after the flood (one socket, in order)
    wait_for(server, f"{OTHER} uefi-x64-pxe ACK address=192.0.2.100 ")
    lines = server.lines[before:]
    assert [ln for ln in lines if OTHER not in ln] == [
        "netboot: dhcp: dropped a datagram from 192.0.2.50:68: option 60 'PXEClient:Arch:²': its Arch field is not a "
        "number\n"], lines
    server.stop()


def machines_file(d: Path, out: Path, node1_ip: str = "192.0.2.42") -> Path:
    f = d / "machines.toml"
    f.write_text(f"""
[profiles.default]
dir = "{out}"
[machines."{NODE1}"]
ip = "{node1_ip}"
hostname = "node1"
""")
    return f


def asked(address: str) -> list[tuple[int, bytes]]:
    """A REQUEST's options for `address`, offered by netboot (192.0.2.10)."""
    return [(50, ip(address)), (54, ip("192.0.2.10"))]


def dora(host: Host, mac: str) -> tuple[str, object]:
    (_, offer), = probe(host, edk2(DISCOVER, mac=mac), expect=1)
    assert offer.type == OFFER
    replies = probe(host, edk2(REQUEST, mac=mac, extra=asked(offer.yiaddr)), expect=1)
    (_, ack), = replies
    assert ack.type == ACK and ack.yiaddr == offer.yiaddr
    return ack.yiaddr, ack


def test_authoritative_reservations_and_leases_across_a_kill(lan: Lan, outs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    host = lan.host("netboot", "192.0.2.10/24")
    f = machines_file(tmp_path, outs["direct"])
    args = ("--machines", f, "--dhcp", "192.0.2.100-192.0.2.199", "--state-dir", tmp_path / "state",
            "--dhcp-router", "192.0.2.1", "--dhcp-dns", "192.0.2.1")
    server = start(host, *args)
    client = lan.host("client", "192.0.2.50/24")
    address, ack = dora(client, NODE1)
    assert address == "192.0.2.42" and ack.text(12) == "node1" and ack.file == "ipxe.efi"
    assert ack.address(3) == "192.0.2.1" and ack.address(1) == "255.255.255.0"
    other, _ = dora(client, OTHER)
    assert other == "192.0.2.100"
    # The same machine's iPXE next: its OFFER and ACK say no-pxedhcp (option 175 holding 176 = 1), so that it does
    # not wait for ProxyDHCP offers.
    (_, offer), = probe(client, ipxe(DISCOVER, mac=NODE1), expect=1)
    (_, ack), = probe(client, ipxe(REQUEST, mac=NODE1, extra=asked(offer.yiaddr)), expect=1)
    assert [(r.type, r.yiaddr, r.file, r.options.get(175)) for r in (offer, ack)] == [
        (kind, "192.0.2.42", "http://192.0.2.10:8080/boot.ipxe", bytes([176, 1, 1])) for kind in (OFFER, ACK)]
    # A reload whose reservation this server could not honour keeps the previous configuration.
    machines_file(tmp_path, outs["direct"], node1_ip="198.51.100.1")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(server, "reload: keeping the previous configuration")
    assert "198.51.100.1 is not an address of the DHCP subnet 192.0.2.0/24" in server.log
    # kill -9, then a new server: the same machine gets the same address, from the state file.
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    machines_file(tmp_path, outs["direct"])
    assert {OTHER, NODE1} <= set(journal.read(tmp_path / "state")[0])
    again = start(host, *args)
    assert dora(client, OTHER)[0] == other
    assert dora(client, "52:54:00:00:03:03")[0] == "192.0.2.101"
    again.stop()


def test_corrupt_lease_state_stops_the_start_and_is_left_alone(lan: Lan, outs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    host = lan.host("netboot", "192.0.2.10/24")
    (tmp_path / "state").mkdir()
    state = tmp_path / "state" / journal.LEGACY
    state.write_text('{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "52:54')
    proc = host.run([sys.executable, "-m", "netboot", "serve", "--dir", outs["direct"], "--http", "0.0.0.0:0",
                     "--no-tftp", "--dhcp", "192.0.2.100-192.0.2.199", "--state-dir", tmp_path / "state"],
                    capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors == [f"netboot: error: {state}: corrupt lease state (Unterminated string starting at: line 1 "
                      "column 68 (char 67)); left as it is: repair or remove it to start"], proc.stderr
    assert state.read_text().endswith('"mac": "52:54')


def test_every_acked_lease_survives_kill_9_during_a_stream_of_exchanges(lan: Lan, outs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """A client relaying for machine after machine; the server is killed (SIGKILL) at a random moment of the
    stream, three times, and restarted: every lease a client got an ACK for is still there, and its machine is
    offered that address again."""
    host = lan.host("netboot", "192.0.2.10/24")
    client = lan.host("client", "192.0.2.50/24")
    args = ("--dir", outs["direct"], "--dhcp", "192.0.2.60-192.0.2.250", "--state-dir", tmp_path / "state")
    rng = random.Random(9)
    acked: dict[str, str] = {}
    first = 0
    for _ in range(3):
        server = start(host, *args)
        stream = client.popen([sys.executable, DORA, "--server", "192.0.2.10", "--relay", "192.0.2.50",
                               "--first", str(first), "--count", "60", "--timeout", "0.5", "--tries", "2",
                               "--give-up", "2"],
                              stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda out=stream.stdout, got=lines: got.extend(out))
        reader.start()
        kill_after = rng.randrange(5, 40)
        deadline = time.monotonic() + 60
        while len(lines) < kill_after:
            assert time.monotonic() < deadline and stream.poll() is None, (lines, server.log[-2000:])
            time.sleep(0.001)
        time.sleep(rng.random() * 0.01)  # somewhere inside an exchange
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        assert stream.wait(timeout=60) == 0
        reader.join()
        for line in lines:
            mac, address, *_ = line.split()
            if address != "-":
                acked[mac] = address
        assert len([x for x in lines if " - " not in x]) >= kill_after
        first += 60
    held = journal.read(tmp_path / "state")[0]
    lost = {mac: address for mac, address in acked.items() if mac not in held or held[mac].ip != address}
    assert not lost, lost
    again = start(host, *args)
    some = rng.sample(sorted(acked), 10)
    for mac in some:  # DISCOVER again: each is offered the address it was ACKed
        n = int(mac.replace(":", ""), 16) - 0x020000000000
        out = client.run([sys.executable, DORA, "--server", "192.0.2.10", "--relay", "192.0.2.50", "--first",
                          str(n), "--count", "1"], capture_output=True, text=True, timeout=60)
        assert out.stdout.split()[:2] == [mac, acked[mac]], out
    again.stop()


def test_corrupt_lease_journal_stops_the_start_and_is_left_alone(lan: Lan, outs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    host = lan.host("netboot", "192.0.2.10/24")
    state = tmp_path / "state"
    args = ("--dir", outs["direct"], "--dhcp", "192.0.2.100-192.0.2.199", "--state-dir", state)
    server = start(host, *args)
    client = lan.host("client", "192.0.2.50/24")
    dora(client, NODE1)
    dora(client, OTHER)
    server.stop()
    path = state / JOURNAL
    text = path.read_text()
    # A record of the first group changed: its CRC fails, and a group follows (so it is no torn last write).
    assert text.index(NODE1) < text.index(OTHER)
    path.write_text(text.replace(NODE1, "52:54:00:00:03:99"))
    before = path.read_bytes()
    proc = host.run([sys.executable, "-m", "netboot", "serve", *args, "--http", "0.0.0.0:0", "--no-tftp"],
                    capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith(f"netboot: error: {path}: corrupt lease journal (line "), errors
    assert path.read_bytes() == before


@pytest.mark.parametrize("torn", [True, False], ids=["in the torn last group", "before a whole group"])
def test_a_journal_record_of_100000_brackets_at_start(lan: Lan, tmp_path: Path, torn: bool) -> None:
    """A host name of 100,000 `[` (once a RecursionError at start): in the last group, cut short, it is ignored as
    any torn group and NODE1 keeps its address; followed by a whole group, the start stops with the one-line
    error and the journal is left as it was."""
    host = lan.host("netboot", "192.0.2.10/24")
    state = tmp_path / "state"
    store = Journal(state)
    store.load()
    store.record(Lease(NODE1, "192.0.2.150", time.time() + 3600, "", b""))
    store.flush()
    store.close()
    path = state / JOURNAL
    record = b"lease " + OTHER.encode() + b" 192.0.2.151 2000000000.0 - " + b"[" * 100_000
    hostile = record + b"\n"
    if not torn:
        hostile += b"commit 1 00000000\n" + journal._group([Lease(OTHER, "192.0.2.152", time.time() + 3600)])
    path.write_bytes(path.read_bytes() + hostile)
    before = path.read_bytes()
    args = ("--dir", fake_out(tmp_path / "out"), "--dhcp", "192.0.2.100-192.0.2.199", "--state-dir", state)
    if torn:
        server = start(host, *args)
        wait_for(server, "dhcp: leases in")
        assert f"dhcp: {path}: ignored a last group of changes cut short (never acknowledged)" in server.log
        assert dora(lan.host("client", "192.0.2.50/24"), NODE1)[0] == "192.0.2.150"
        server.stop()
        assert "Traceback" not in server.log
        return
    proc = host.run([sys.executable, "-m", "netboot", "serve", *args, "--http", "0.0.0.0:0", "--no-tftp"],
                    capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors == [f"netboot: error: {path}: corrupt lease journal (line 4: a line of {len(record)} bytes, "
                      "longer than any record (4096)); left as it is: repair or remove it to start"], proc.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--dhcp", "bogus"], "--dhcp 'bogus': expected proxy or a range START-END of IPv4 addresses"),
    (["--dhcp", "192.0.2.9-192.0.2.1"], "START <= END"),
    (["--dhcp-router", "192.0.2.1"], "--dhcp-router needs --dhcp"),
    (["--dhcp-interface", "eth0"], "--dhcp-interface needs --dhcp"),
    (["--dhcp", "proxy", "--dhcp-dns", "192.0.2.1"], "--dhcp-dns is for --dhcp START-END"),
    (["--dhcp", "192.0.2.100-192.0.2.110", "--dhcp-router", "gateway"], "--dhcp-router 'gateway' is not an IPv4"),
    (["--dhcp", "192.0.2.100-192.0.2.110", "--dhcp-lease-time", "5"], "--dhcp-lease-time 5: expected 60"),
    (["--dhcp", "198.51.100.10-198.51.100.20"],
     "--dhcp 198.51.100.10-198.51.100.20: no interface has an address in a subnet holding this whole range"),
    (["--dhcp", "proxy", "--dhcp-interface", "nosuch0"], "--dhcp-interface nosuch0: no such network interface"),
    (["--dhcp-relay", "192.0.2.1"], "--dhcp-relay needs --dhcp"),
    (["--dhcp", "proxy", "--dhcp-relay", "relay.example"], "--dhcp-relay 'relay.example' is not an IPv4 address"),
    (["--dhcp", "proxy", "--dhcp-relay", "0.0.0.0"], "--dhcp-relay '0.0.0.0': expected a relay agent's unicast"),
])
def test_bad_dhcp_options(outs: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    proc = cli("serve", "--dir", outs["direct"], "--http", "127.0.0.1:0", "--no-tftp", "--status", "none",
               "--state-dir", tmp_path, *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("netboot: error: ") and message in last, proc.stderr


def test_dhcp_interface_limits_where_it_answers(lan: Lan, outs: dict[str, Path]) -> None:
    host = lan.host("netboot", "192.0.2.10/24")
    client = lan.host("client", "192.0.2.50/24")
    elsewhere = start(host, "--dir", outs["direct"], "--dhcp", "proxy", "--dhcp-interface", "lo")
    assert probe(client, edk2(mac=NODE1), wait=1) == []
    elsewhere.stop()
    here = start(host, "--dir", outs["direct"], "--dhcp", "proxy", "--dhcp-interface", "eth0")
    assert [r.type for _, r in probe(client, edk2(mac=NODE1), expect=1)] == [OFFER]
    assert "dhcp: proxy DHCP on eth0, ports 67 and 4011" in here.log
    here.stop()


def test_answers_go_to_the_relay_that_sent_them_or_one_named_and_a_discover_is_never_sent_to_its_ciaddr(
        lan: Lan, outs: dict[str, Path]) -> None:
    """A relay host with two addresses, sending from 192.0.2.50 and naming 192.0.2.51 in giaddr: dropped with one
    line, unless --dhcp-relay names 192.0.2.51, which then gets the answer on port 67. A DISCOVER naming a ciaddr
    (192.0.2.77, nobody's) gets its OFFER by broadcast, so its client hears it. (Addresses beyond the LAN are the
    exchange tests': no packet here goes to an address outside it.)"""
    host = lan.host("netboot", "192.0.2.10/24")
    relay = lan.host("relay", "192.0.2.50/24")
    relay.run(["ip", "addr", "add", "192.0.2.51/24", "dev", "eth0"], check=True)
    relayed = edk2(mac=NODE1, giaddr="192.0.2.51", flags=0)
    server = start(host, "--dir", outs["direct"], "--dhcp", "proxy")
    assert probe(relay, relayed, to="192.0.2.10:67", port=67, wait=1) == []
    wait_for(server, "dhcp: dropped a datagram from 192.0.2.50:67: giaddr 192.0.2.51 is neither the sender's address "
                     "nor a --dhcp-relay")
    replies = probe(relay, edk2(mac=NODE1, ciaddr="192.0.2.77", flags=0), to="192.0.2.10:67", expect=1)
    assert [(r.type, r.mac, r.ciaddr) for _, r in replies] == [(OFFER, NODE1, "0.0.0.0")]
    server.stop()
    named = start(host, "--dir", outs["direct"], "--dhcp", "proxy", "--dhcp-relay", "192.0.2.51")
    replies = probe(relay, relayed, to="192.0.2.10:67", port=67, expect=1)
    assert [(s, r.type, r.giaddr, r.file) for s, r in replies] == [("192.0.2.10:67", OFFER, "192.0.2.51", "ipxe.efi")]
    assert "dropped" not in named.log
    named.stop()


def test_the_readmes_dnsmasq_line_tells_ipxe_not_to_wait(lan: Lan, tmp_path: Path) -> None:
    """docs/dhcp.md's line for a dnsmasq that hands out iPXE's boot file itself ("With your own DHCP server instead"):
    its OFFER to iPXE says no-pxedhcp (option 175 holding 176 = 1), as netboot's authoritative mode's does."""
    lan.host("site", "192.0.2.2/24").dnsmasq(*DNSMASQ_PXE, "--dhcp-option=encap:175, 176, 1b",
                                             leasefile=tmp_path / "leases")
    client = lan.host("client", "192.0.2.50/24")
    (_, offer), = probe(client, ipxe(DISCOVER, mac=NODE1), wait=10, expect=1)  # dnsmasq pings the address first
    # dnsmasq names the boot file in option 67 (with a NUL), and ends option 175 with its own END (255).
    assert (offer.type, offer.options[67], offer.options[175]) == (
        OFFER, b"http://192.0.2.10:8080/boot.ipxe\0", bytes([176, 1, 1, 255]))
