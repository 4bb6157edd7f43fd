"""Two DHCPv6 servers over one shared lease store: advertisements and leases are claims, a claim lost to the
other server is undone and its answer never sent, and the loser's view learns the winner's address.

The store here is the SharedLeaseStore protocol (netboot.dhcp.leases) over a dict standing for the shared table,
with the rule of netboot.dhcp.lease_database's claims (an address held by another client, unexpired, is lost):
DHCPv6 has no database backend yet (`--dhcp6 START-END` with `--database` is refused), and this is the seam one
plugs into."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Interface
from pathlib import Path

import pytest
from dhcp6_support import REQUEST, duid_ll, ipxe, read

from netboot.core.machines import Machines, Profile
from netboot.dhcp import leases as leases_module
from netboot.dhcp.boot import Offerings
from netboot.dhcp.leases import Lease
from netboot.dhcp6.exchange import Answer, Responder
from netboot.dhcp6.leases import Leases6, Pool6, key_of
from netboot.dhcp6.server import Dhcp6Server

NODE1, NODE2 = "52:54:00:00:06:21", "52:54:00:00:06:22"
INTERFACES = {1: ("eth0", [IPv6Interface("2001:db8::10/64"), IPv6Interface("fe80::10/64")])}


@dataclass(frozen=True)
class Row:
    lease: Lease
    state: int  # 0 leased, 1 advertised, 2 declined


class SharedTable:
    """A SharedLeaseStore over `table` (address -> Row), which several of them share."""

    claims_offers = True
    reachable = True

    def __init__(self, table: dict[str, Row]) -> None:
        self.table = table
        self.batch: dict[str, Row] = {}
        self.learn = None

    def load(self) -> list[Lease]:
        return [r.lease for r in self.table.values() if r.state == 0]

    def held(self) -> list[Row]:
        return [r for r in self.table.values() if r.state != 0]

    def record(self, lease: Lease) -> None:
        self.batch[lease.ip] = Row(lease, 0)

    def offer(self, lease: Lease) -> None:
        self.batch[lease.ip] = Row(lease, 1)

    def decline(self, lease: Lease) -> None:
        self.batch[lease.ip] = Row(lease, 2)

    def forget(self, key: str) -> None:
        pass

    def release_offer(self, key: str) -> None:
        pass

    def take(self) -> dict[str, Row] | None:
        batch, self.batch = self.batch, {}
        return batch or None

    def restore(self, batch: object) -> None:
        raise AssertionError("a shared store's write does not fail")

    async def write(self, batch: dict[str, Row]) -> set[str]:
        lost, winners = set(), []
        for ip, row in batch.items():
            held = self.table.get(ip)
            if held is not None and held.lease.mac != row.lease.mac and held.lease.expires > time.time():
                lost.add(ip)
                winners.append(held)
            else:
                self.table[ip] = row
        if winners and self.learn is not None:
            self.learn(winners)
        return lost

    def close(self) -> None:
        pass


class Sending(Dhcp6Server):
    """The server, its answers kept rather than sent (this test has no client socket: the claims are the point)."""

    def _send(self, answer: Answer, sock: object = None) -> None:
        self.sent.append(answer)


class _First:
    """Stands for the random choice of a shared store's allocator: the range's first address, on both servers, so
    that their claims collide (as two random choices sometimes do)."""

    @staticmethod
    def randrange(span: int) -> int:
        return 0


def test_a_claim_lost_to_another_server_is_undone_and_not_answered(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases_module, "_random", _First())
    machines = Machines({"default": Profile("default", Path("/out/d"))}, {})
    offerings = Offerings(binaries=frozenset({"ipxe.efi"}), http_port=8080, tftp=True)
    table: dict[str, Row] = {}

    async def scenario() -> None:
        servers = []
        for n in (1, 2):
            leases = Leases6(Pool6(IPv6Address("2001:db8::1000"), IPv6Address("2001:db8::10ff")), SharedTable(table))
            responder = Responder(lambda: offerings, lambda: machines, bytes([0, 3, 0, 1, 2, 0, 0, 0, 0, n]), leases)
            server = Sending(responder, INTERFACES, snapshot=lambda: INTERFACES)
            server.sent = []
            servers.append(server)
        one, two = servers
        # At the same moment, each server advertises its own view's first free address to another client.
        one._datagram(ipxe(mac=NODE1), "fe80::1", 1)
        two._datagram(ipxe(mac=NODE2), "fe80::2", 1)
        assert one.sent == [] and two.sent == []  # each waits for its claim
        one._group.commit()
        two._group.commit()
        await asyncio.sleep(0.05)
        assert [read(a.data).addresses[0][1] for a in one.sent] == ["2001:db8::1000"]
        # Lost: NODE2's advertisement undone and not sent; the winner's, learned, holds the address in its view.
        assert two.sent == []
        assert {key: ip for key, (ip, _) in two.responder.leases.offers.items()} == {
            key_of(duid_ll(NODE1), 1): "2001:db8::1000"}
        assert table["2001:db8::1000"].state == 1
        # NODE2 asks again: the loser's view now knows the winner's address.
        two._datagram(ipxe(mac=NODE2), "fe80::2", 1)
        two._group.commit()
        await asyncio.sleep(0.05)
        [advertise] = two.sent
        assert read(advertise.data).addresses[0][1] == "2001:db8::1001"
        # NODE1 takes its address: its lease is in the table, and the other server learns it at its next loss.
        server_id = read(one.sent[0].data).one(2)
        one._datagram(ipxe(REQUEST, NODE1, server=server_id, addresses=("2001:db8::1000",)), "fe80::1", 1)
        one._group.commit()
        await asyncio.sleep(0.05)
        assert read(one.sent[-1].data).addresses[0][1] == "2001:db8::1000" and table["2001:db8::1000"].state == 0
        for server in servers:
            server.close()

    asyncio.run(scenario())
