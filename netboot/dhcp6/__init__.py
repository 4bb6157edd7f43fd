"""DHCPv6 server for netbooting on IPv6 networks: IA_NA addresses from a range, or boot information only.

A sans-IO core (`message` parses and builds, `leases` allocates addresses, `exchange` decides every answer,
`duid` keeps the server's identifier) under a thin asyncio layer (`server`); which boot file a client gets is
netboot.dhcp's (`boot`, `exchange.boot_file_of`), and the leases are kept by its journal, in a file of their own.
Embedding (`netboot serve --dhcp6`):

    server = await start_dhcp6_server(Dhcp6Config(range=...), machines=lambda: ..., offerings=lambda: ...)
    ...
    server.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path

from netboot.core.addresses import ipv6_interfaces, link_addresses
from netboot.core.errors import NetbootError
from netboot.core.machines import Machines
from netboot.dhcp.boot import Client, Offerings
from netboot.dhcp.journal import Journal
from netboot.dhcp.lease_database import LEASE6, LeaseDatabase
from netboot.dhcp.leases import LeaseStore
from netboot.dhcp6 import duid
from netboot.dhcp6.exchange import PXE_PORT, SERVER_PORT, Responder
from netboot.dhcp6.leases import KIND, Leases6, Pool6
from netboot.dhcp6.server import Dhcp6Server

__all__ = ["Dhcp6Config", "Dhcp6Server", "start_dhcp6_server"]


@dataclass(frozen=True)
class Dhcp6Config:
    range: tuple[IPv6Address, IPv6Address] | None = None  # stateful mode: START, END; None: stateless
    interfaces: tuple[str, ...] = ()  # answer on these only; empty: every interface
    lease_time: int = 3600
    state_dir: Path = Path("/var/lib/netboot")
    host: str = "::"
    port: int = SERVER_PORT
    uefi_binary: str = "ipxe.efi"  # what UEFI PXE firmware chainloads (--dhcp-uefi-binary)
    discovery_port: int = PXE_PORT  # stateless mode: EDK2's boot server discovery (its ProxyBinl path)
    database: str | None = None  # a PostgreSQL URL: leases shared with the site's other servers (lease6)
    name: str = ""  # this server's name in the shared lease table

    @property
    def mode(self) -> str:
        return f"{self.range[0]}-{self.range[1]}" if self.range else "stateless"


async def start_dhcp6_server(config: Dhcp6Config, *, machines: Callable[[], Machines],
                             offerings: Callable[[], Offerings],
                             seen: Callable[[str, Client, str], None] | None = None) -> Dhcp6Server:
    """`seen(mac, client, interface name)`: told of each network-boot client answered whose MAC is known."""
    interfaces = await asyncio.to_thread(ipv6_interfaces)
    names = {name for name, _ in interfaces.values()}
    for name in config.interfaces:
        if name not in names:
            raise NetbootError(f"--dhcp6-interface {name}: no such network interface")
    server_duid = duid.load(config.state_dir, await asyncio.to_thread(link_addresses))
    leases = None
    if config.range is not None:
        pool = Pool6(*config.range, lease_time=config.lease_time)
        ours = [a for name, addresses in interfaces.values() if not config.interfaces or name in config.interfaces
                for a in addresses if not a.is_link_local]
        if not any(pool.on_link(a.network) for a in ours):
            raise NetbootError(f"--dhcp6 {config.mode}: no interface{' of --dhcp6-interface' * bool(config.interfaces)}"
                               " has an address in a prefix holding this whole range")
        store: LeaseStore = (await LeaseDatabase.open(config.database, config.name, LEASE6) if config.database
                             else Journal(config.state_dir, KIND))
        try:
            leases = Leases6(pool, store)
        except BaseException:
            store.close()
            raise
    responder = Responder(offerings, machines, server_duid, leases)
    server = Dhcp6Server(responder, interfaces, config.interfaces)
    if seen is not None:
        report = seen
        responder.seen = lambda mac, client, ifindex: report(mac, client, server.interfaces.get(ifindex, ("",))[0])
    try:
        server.listen(config.host, config.port, config.discovery_port if config.range is None else None)
    except OSError as e:
        server.close()
        ports = f"{config.port}" + (f" and {config.discovery_port}" if config.range is None else "")
        raise NetbootError(f"cannot listen for DHCPv6 on [{config.host}]:{ports}: {e.strerror}") from None
    return server
