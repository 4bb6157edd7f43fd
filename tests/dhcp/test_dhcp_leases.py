"""The lease state file: kept across restarts, written atomically, never overwritten when it cannot be read."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from netboot.core.errors import NetbootError
from netboot.dhcp.leases import STATE_FILE, Leases, Pool, StateFile

POOL = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.109"), IPv4Network("192.0.2.0/24"),
            excluded=frozenset({IPv4Address("192.0.2.100")}))
A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


def open_leases(d: Path) -> Leases:
    return Leases(POOL, StateFile(d))


def test_leases_survive_a_restart_and_each_machine_gets_its_own_again(tmp_path: Path) -> None:
    first = open_leases(tmp_path)
    got = {}
    for mac in (A, B):
        got[mac] = first.choose(mac, None, 100.0, {})
        first.commit(mac, got[mac], 100.0, "h")
    assert got == {A: "192.0.2.101", B: "192.0.2.102"}  # .100 is excluded (the server's own)
    first.state.close()
    again = open_leases(tmp_path)
    # Long after expiry, each machine still comes back to its own address, and a newcomer gets a fresh one.
    assert again.choose(B, None, 1e9, {}) == "192.0.2.102"
    assert again.choose(C, None, 1e9, {}) == "192.0.2.103"
    assert again.choose(A, None, 1e9, {}) == "192.0.2.101"
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert [x["mac"] for x in data["leases"]] == [A, B]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    again.state.close()


def test_reserved_addresses_are_never_given_to_another(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    reserved = {A: "192.0.2.101"}
    assert leases.choose(B, "192.0.2.101", 0, reserved) == "192.0.2.102"
    assert leases.choose(A, None, 0, reserved) == "192.0.2.101"
    leases.state.close()


def test_expired_addresses_are_reused_only_when_the_range_is_full(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    for i, ip in enumerate(POOL.addresses()):
        mac = f"52:54:00:00:01:{i:02x}"
        leases.commit(mac, str(ip), float(i), "")
    assert leases.choose(C, None, 5.0, {}) is None  # 9 addresses: only the 3 oldest expired... not yet
    assert leases.choose(C, None, 3600.5, {}) == "192.0.2.101"  # the one that expired longest ago
    leases.state.close()


@pytest.mark.parametrize("content", [
    "{not json", '{"format": "something else"}', '{"format": "netboot-dhcp-leases", "version": 9, "leases": []}',
    '{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "zz", "ip": "192.0.2.1", "expires": 1}]}',
    '{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "52:54:00:00:00:01", "ip": "x", '
    '"expires": 1}]}',
    '{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", '
    '"expires": 1}, {"mac": "52:54:00:00:00:02", "ip": "192.0.2.1", "expires": 1}]}',
    "\udcff",
])
def test_a_corrupt_state_file_is_a_clear_error_and_is_left_alone(tmp_path: Path, content: str) -> None:
    path = tmp_path / STATE_FILE
    path.write_bytes(content.encode(errors="surrogateescape"))
    before = path.read_bytes()
    with pytest.raises(NetbootError) as info:
        open_leases(tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before


def test_two_servers_cannot_share_a_state_directory(tmp_path: Path) -> None:
    state = StateFile(tmp_path)
    with pytest.raises(NetbootError, match="in use by another netboot serve"):
        StateFile(tmp_path)
    state.close()
    StateFile(tmp_path).close()


def test_range_syntax() -> None:
    assert Pool.parse_range("192.0.2.100-192.0.2.199") == (IPv4Address("192.0.2.100"), IPv4Address("192.0.2.199"))
    for bad in ("192.0.2.100", "192.0.2.199-192.0.2.100", "a-b", "192.0.2.1-"):
        with pytest.raises(NetbootError, match="--dhcp"):
            Pool.parse_range(bad)
