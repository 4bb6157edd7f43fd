"""DHCP server for netbooting: proxy DHCP beside a site's server, or an authoritative server with leases.

A sans-IO core (`message` parses and builds, `boot` tells client kinds and boot files, `leases` allocates
addresses, `journal` keeps them on disk, `exchange` decides every answer) under a thin asyncio layer (`server`).
Embedding (`netboot serve`):

    server = await start_dhcp_server(DhcpConfig(proxy=True), machines=lambda: ..., offerings=lambda: ...)
    ...
    server.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from netboot.core.addresses import ipv4_interfaces
from netboot.core.errors import NetbootError, cannot_listen
from netboot.core.machines import Machines
from netboot.dhcp.boot import Client, Offerings
from netboot.dhcp.exchange import PXE_PORT, SERVER_PORT, Responder
from netboot.dhcp.journal import Journal
from netboot.dhcp.lease_database import LeaseDatabase
from netboot.dhcp.leases import Leases, LeaseStore, Pool, check_reservations, network_of
from netboot.dhcp.server import DhcpServer

__all__ = ["Client", "DhcpConfig", "DhcpServer", "Offerings", "start_dhcp_server"]


@dataclass(frozen=True)
class DhcpConfig:
    proxy: bool = True
    range: tuple[IPv4Address, IPv4Address] | None = None  # authoritative mode: START, END
    interfaces: tuple[str, ...] = ()  # answer on these only; empty: every interface
    router: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()
    domain: str = ""
    lease_time: int = 3600
    state_dir: Path = Path("/var/lib/netboot")
    uefi_binary: str = "ipxe.efi"
    database: str | None = None  # a PostgreSQL URL: leases shared with the site's other servers (lease_database)
    name: str = ""  # this server's name in the shared lease table
    host: str = "0.0.0.0"
    relays: tuple[IPv4Address, ...] = ()  # giaddr values answered whoever sends them (--dhcp-relay)

    @property
    def mode(self) -> str:
        return "proxy" if self.proxy else f"{self.range[0]}-{self.range[1]}" if self.range else "?"


async def start_dhcp_server(config: DhcpConfig, *, machines: Callable[[], Machines],
                            offerings: Callable[[], Offerings],
                            seen: Callable[[str, Client, str], None] | None = None) -> DhcpServer:
    """`seen(mac, client, interface name)`: told of each network-boot client answered."""
    interfaces = await asyncio.to_thread(ipv4_interfaces)
    names = {name for name, _ in interfaces.values()}
    for name in config.interfaces:
        if name not in names:
            raise NetbootError(f"--dhcp-interface {name}: no such network interface")
    ours = [a for name, addresses in interfaces.values() if not config.interfaces or name in config.interfaces
            for a in addresses]
    leases = None
    prefer = None
    if not config.proxy:
        assert config.range is not None
        first, last = config.range
        home = network_of(first, last, ours)
        if home is None:
            raise NetbootError(f"--dhcp {first}-{last}: no interface{' of --dhcp-interface' * bool(config.interfaces)}"
                               " has an address in a subnet holding this whole range")
        excluded = {a.ip for a in ours if a.ip in home.network} | ({config.router} if config.router else set())
        pool = Pool(first, last, home.network, config.lease_time, config.router, config.dns, config.domain,
                    frozenset(excluded))
        check_reservations(machines(), pool)
        state: LeaseStore = (await LeaseDatabase.open(config.database, config.name) if config.database
                             else Journal(config.state_dir))
        try:
            leases = Leases(pool, state)
        except BaseException:
            state.close()
            raise
        prefer = home.network
    responder = Responder(offerings, machines, leases, relays=frozenset(map(str, config.relays)))
    server = DhcpServer(responder, interfaces, config.interfaces, prefer)
    if seen is not None:
        report = seen
        responder.seen = lambda mac, client, ifindex: report(mac, client, server.interfaces.get(ifindex, ("",))[0])
    try:
        for port in (SERVER_PORT, PXE_PORT) if config.proxy else (SERVER_PORT,):
            try:
                server.listen(config.host, port)
            except OSError as e:
                raise cannot_listen("DHCP", f"{config.host}:{port}", port, e) from None
    except BaseException:
        server.close()
        raise
    return server
