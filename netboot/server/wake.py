"""Wake-on-LAN: a magic packet (six 0xFF bytes, then the MAC sixteen times: AMD's "Magic Packet" white paper, 1995)
sent by UDP to port 9 (discard) at the broadcast address of the machine's network.

Its network is where netboot last saw it: the interface its DHCP request came in on, else the interface whose
subnet holds the address its last request came from; else every IPv4 interface of this host (loopback and
point-to-point links have no broadcast address and are left out), as a NIC waiting for its packet has no address.

Power control through a BMC is the other way to start a machine, and the place for it is `wake`'s caller
(server/inventory.py): a command template per profile or machine, e.g.

    power_on = "ipmitool -I lanplus -H {bmc} -U admin -E chassis power on"
    power_on = "curl -sf -u admin:$PASS -H 'Content-Type: application/json' -d '{\"ResetType\": \"On\"}' https://{bmc}/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"

with `{bmc}` and the other keys from the machine's table, run through core/run.py's `run` in a thread. It is not
built: netboot sends magic packets only.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from ipaddress import IPv4Interface

PORT = 9  # discard: what WoL tools send to (wakeonlan, etherwake -b, systemd-networkd)

Interfaces = dict[int, tuple[str, list[IPv4Interface]]]  # core.addresses.ipv4_interfaces()


def magic_packet(mac: str) -> bytes:
    """The 102 bytes that wake `mac` (normalized)."""
    return b"\xff" * 6 + bytes.fromhex(mac.replace(":", "")) * 16


@dataclass(frozen=True)
class Target:
    interface: str
    address: IPv4Interface  # ours on that interface

    @property
    def broadcast(self) -> str:
        return str(self.address.network.broadcast_address)

    def __str__(self) -> str:
        return f"{self.interface} {self.broadcast}:{PORT}"


def targets(interfaces: Interfaces, interface: str = "", client: str = "") -> list[Target]:
    """Where to send a machine's packet: its interface (named by DHCP), else the one whose subnet holds `client`
    (the address of its last request), else every interface with a broadcast address."""
    every = [Target(name, a) for name, addresses in interfaces.values() for a in addresses
             if a.network.prefixlen < 31 and not a.ip.is_loopback]
    if interface:
        found = [t for t in every if t.interface == interface]
        if found:
            return found[:1]
    try:
        seen_from = ipaddress.ip_address(client)
    except ValueError:
        seen_from = None
    found = [t for t in every if seen_from is not None and seen_from in t.address.network]
    return found[:1] or every


def send(mac: str, where: list[Target]) -> list[str]:
    """Send the magic packet of `mac` to each target, from our address there (blocking: a few sendto()s)."""
    packet = magic_packet(mac)
    sent = []
    for target in where:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.bind((str(target.address.ip), 0))  # the source, and with it the interface (its broadcast route)
            s.sendto(packet, (target.broadcast, PORT))
        sent.append(str(target))
    return sent
