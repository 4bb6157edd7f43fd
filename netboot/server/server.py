"""`netboot serve`: one asyncio process answering HTTP and TFTP from one namespace, reloading as things change."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from netboot.core.addresses import reachable_hosts
from netboot.core.errors import NetbootError, cannot_listen
from netboot.core.loaders import Loaders
from netboot.core.logtext import clip
from netboot.core.machines import Machines
from netboot.core.machines_file import rewrite
from netboot.dhcp import Client, DhcpConfig, DhcpServer, Offerings, start_dhcp_server
from netboot.dhcp6 import Dhcp6Config, Dhcp6Server, start_dhcp6_server
from netboot.server.autobuild import SystemBuilds
from netboot.server.http import LimitedRunner, make_app
from netboot.server.http_limits import HttpLimits
from netboot.server.inventory import ServerInventory
from netboot.server.namespace import BadRequest, Item, Namespace, NotFound, Pending
from netboot.server.overlay import tree_stat
from netboot.server.overlay_cache import Prepared
from netboot.state import database
from netboot.state.boot_log import BootLog
from netboot.state.machine_tables import MachineTables, Unreachable
from netboot.status import BootRecord, Live, StatusConfig, start_status
from netboot.status.inventory import Refused
from netboot.tftp.command import parse_listen
from netboot.tftp.content import BytesContent, Content, ContentError, FileContent, Peer, Resolver
from netboot.tftp.content import NotFound as TftpNotFound
from netboot.tftp.server import TftpConfig, TftpServer, TransferStats, start_tftp_server
from netboot.tftp.transfer import format_peer

log = logging.getLogger("netboot.serve")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Endpoint:
        """'0.0.0.0:8080', '[::]:69', '[::1]:8080', ':69' (all addresses); a port of 0 picks a free one."""
        try:
            host, port = parse_listen(text)
            ipaddress.ip_address(host)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise NetbootError(f"{what}: {e}") from None
        return cls(host, port)

    def url(self, scheme: str, port: int | None = None) -> str:
        return f"{scheme}://{format_peer((self.host, port if port is not None else self.port))}"


@dataclass(frozen=True)
class ServeOptions:
    out: Path | None = None
    machines: Path | None = None
    http: Endpoint = Endpoint("0.0.0.0", 8080)
    tftp: Endpoint | None = Endpoint("0.0.0.0", 69)
    tftp_config: TftpConfig = field(default_factory=TftpConfig)
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    dhcp: DhcpConfig | None = None
    dhcp6: Dhcp6Config | None = None
    status: StatusConfig | None = field(default_factory=StatusConfig)
    grace: float = 600.0  # how long the files of a replaced build stay available
    poll: float = 1.0  # how often output directories and the machines file are checked for changes
    state_dir: Path = Path("/var/lib/netboot")  # builds of profiles with a system (and DHCP leases, in dhcp)
    database: str | None = None  # the site's PostgreSQL database (--database), shared with its other servers
    name: str = field(default_factory=socket.gethostname)  # this server's name there, and on its events (--name)
    loaders: Loaders = field(default_factory=Loaders)  # shim, GRUB and MokManager per architecture (--loaders)


class Server:
    def __init__(self, opts: ServeOptions) -> None:
        if (opts.out is None) == (opts.machines is None):
            raise NetbootError("give either --dir OUT or --machines FILE")
        self.opts = opts
        machines = self._file()
        # Profiles that name a system: built here; a new build is served as soon as it is in place.
        self.builds = SystemBuilds(opts.state_dir, switched=lambda: self.namespace.refresh())
        self.builds.prepare(machines)
        self.namespace = Namespace(machines, single_dir=opts.out is not None, grace=opts.grace, loaders=opts.loaders)
        # What the status listener shows; without one, nothing is recorded.
        self.record = BootRecord(self._build_of, server=opts.name) if opts.status is not None else None
        # With --database: the machines written through the API (laid over the file's), and the site's boots.
        self._site: database.Link | None = None
        self._tables: MachineTables | None = None
        self._table_errors: set[str] = set()
        self._boot_log: BootLog | None = None
        self._configure_record(machines)
        self._machines_seen = self._machines_stat()
        self._runner: web.AppRunner | None = None
        self._status: web.AppRunner | None = None
        self.status_port = 0
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        # Reloads and the status listener's writes take turns: each reads the file, checks it and serves it whole,
        # so that what is served is always the file's last version.
        self._reloading = asyncio.Lock()
        self.http_port = 0
        self.tftp_port = 0
        self._tftp: TftpServer | None = None
        self._dhcp: DhcpServer | None = None
        self._dhcp6: Dhcp6Server | None = None

    def _machines_stat(self, st: os.stat_result | None = None) -> tuple[object, ...] | None:
        """What changes when the machines file or one of its overlay directories is edited (`st`: the file's stat,
        when known)."""
        if self.opts.machines is None:
            return None
        if st is None:
            try:
                st = os.stat(self.opts.machines)
            except OSError:
                return None
        overlays = sorted({str(p.overlay) for p in self.namespace.machines.profiles.values() if p.overlay})
        return (st.st_ino, st.st_mtime_ns, st.st_size, *(tree_stat(Path(d)) for d in overlays))

    async def start(self) -> None:
        if self.opts.database is not None:
            # First (its connection made, the schema brought up to date): a wrong URL or credentials, or a newer
            # schema, is a one-line error before anything listens.
            await self._start_database(self.opts.database)
        if self.opts.status is not None:
            await self._start_status(self.opts.status)
        await self._start_http()
        if self.opts.tftp is not None:
            await self._start_tftp(self.opts.tftp)
        if self.opts.dhcp is not None:
            await self._start_dhcp(self.opts.dhcp)
        if self.opts.dhcp6 is not None:
            await self._start_dhcp6(self.opts.dhcp6)

    async def _start_database(self, url: str) -> None:
        self._site = await database.Link.open(
            url, log, "site", "machines written through the API stay as they were read last, and the other "
            "servers' boots are not shown", "the site's machines and boots are read again")
        self._tables = await MachineTables.open(self._site, self.opts.name, self._reload.set)
        log.info("machines: %d written through the API, in the database %s", sum(
            t is not None for t in self._tables.tables.values()), database.shown(url))
        if self._tables.tables:
            await self.reload()
        if self.record is not None:
            self._boot_log = await BootLog.open(self._site, self.opts.name, self.record.learn)
            self.record.sink = self._boot_log.add

    def _file(self) -> Machines:
        """The machines file as it is on disk, or --dir's one profile."""
        return (Machines.single(self.opts.out) if self.opts.out
                else Machines.load(self.opts.machines, self.opts.state_dir))  # type: ignore[arg-type]

    def _load(self) -> Machines:
        """The machines file with the database's machines over it."""
        machines = self._file()
        if self._tables is None:
            return machines
        laid, errors = machines.with_tables(self._tables.tables, strict=False)
        for error in sorted(set(errors) - self._table_errors):
            log.error("machines: not served here: %s", clip(error, 300))
        self._table_errors = set(errors)
        return laid

    def _build_of(self, profile: str) -> tuple[str, str] | None:
        files = self.namespace.profiles.get(profile)
        return (files.current.id, files.current.system) if files else None

    def _builds(self) -> dict[str, tuple[str, str]]:
        return {name: build for name in self.namespace.profiles if (build := self._build_of(name))}

    def _configure_record(self, machines: Machines) -> None:
        if self.record is not None:
            self.record.configure({mac: m.profile for mac, m in machines.machines.items()},
                                  database=machines.from_database,
                                  overlaid=[name for name, p in machines.profiles.items() if p.overlay is not None])

    async def _start_status(self, config: StatusConfig) -> None:
        assert self.record is not None
        live = Live(tftp_in_flight=lambda: self._tftp.transfers if self._tftp else 0,
                    tftp_refused=lambda: self._tftp.refused if self._tftp else 0, builds=self._builds)
        inventory = ServerInventory(self.write_machines if self.opts.machines is not None else None,
                                    lambda: sorted(self.namespace.machines.profiles), self._seen,
                                    self.write_table if self.opts.database is not None else None)
        self._status, self.status_port = await start_status(config, self.record, live, inventory)
        where = Endpoint(config.host, self.status_port).url("https" if config.tls else "http")
        log.info("status: %s/ (machines page), /api/machines, /api/events, /metrics%s", where,
                 "; a token is required" if config.token else "")

    async def _start_dhcp(self, config: DhcpConfig) -> None:
        self._dhcp = await start_dhcp_server(config, machines=lambda: self.namespace.machines,
                                             offerings=self._offerings, seen=self._dhcp_seen)
        where = ", ".join(config.interfaces) or "every interface"
        log.info("dhcp: %s on %s, port%s %s", "proxy DHCP" if config.proxy else f"DHCP server for {config.mode}",
                 where, "s" * (len(self._dhcp.ports) > 1), " and ".join(map(str, self._dhcp.ports)))
        if not config.proxy and config.database is None:
            log.info("dhcp: leases in %s", config.state_dir)
        offer = self._offerings()
        if not offer.tftp:
            log.warning("dhcp: TFTP is not served on port 69, so PXE ROMs get no answer; iPXE and UEFI HTTP "
                        "boot clients still do")
        missing = {"undionly.kpxe", config.uefi_binary} - offer.binaries
        if missing:
            log.warning("dhcp: %s not installed (Debian's ipxe package): PXE ROMs that need it get no answer",
                        " and ".join(sorted(missing)))

    async def _start_dhcp6(self, config: Dhcp6Config) -> None:
        self._dhcp6 = await start_dhcp6_server(config, machines=lambda: self.namespace.machines,
                                               offerings=self._offerings6, seen=self._dhcp_seen)
        where = ", ".join(config.interfaces) or "every interface"
        what = "boot information (stateless)" if config.range is None else f"DHCPv6 server for {config.mode}"
        ports = f"port {self._dhcp6.port}" + (f" and {self._dhcp6.discovery_port}" * bool(self._dhcp6.discovery_port))
        log.info("dhcp6: %s on %s, %s", what, where, ports)
        if config.range is not None and config.database is None:
            log.info("dhcp6: leases in %s", config.state_dir)

    def _dhcp_seen(self, mac: str, client: Client, interface: str) -> None:
        """What DHCP saw of a machine it answered, for the status record: its architecture and interface."""
        if self.record is not None:
            arch = f"{client.arch} ({client.kind})" if client.arch is not None else client.kind
            self.record.note_facts(mac, (("dhcp_arch", arch), ("interface", interface)))

    def _offerings(self) -> Offerings:
        assert self.opts.dhcp is not None
        http, tftp = self.opts.http.host, self.opts.tftp.host if self.opts.tftp else None
        return Offerings(
            binaries=frozenset(self.namespace.binaries), http_port=self.http_port, tftp=self.tftp_port == 69,
            uefi_binary=self.opts.dhcp.uefi_binary,
            http_host=http if _specific_ipv4(http) else None, tftp_host=tftp if _specific_ipv4(tftp) else None,
            arches=self.namespace.arches,
        )

    def _offerings6(self) -> Offerings:
        """As _offerings, for DHCPv6: host names in URLs are bracketed IPv6 literals (RFC 3986 §3.2.2)."""
        http, tftp = self.opts.http.host, self.opts.tftp.host if self.opts.tftp else None
        return Offerings(
            binaries=frozenset(self.namespace.binaries), http_port=self.http_port, tftp=self.tftp_port == 69,
            uefi_binary=self.opts.dhcp6.uefi_binary if self.opts.dhcp6 is not None else "ipxe.efi",
            http_host=f"[{http}]" if _specific_ipv6(http) else None,
            tftp_host=f"[{tftp}]" if _specific_ipv6(tftp) else None,
            arches=self.namespace.arches,
        )

    async def _start_tftp(self, where: Endpoint) -> None:
        try:
            self._tftp = await start_tftp_server(
                where.host, where.port, tftp_resolver(self.namespace), self.opts.tftp_config,
                on_transfer=self._tftp_logged, on_refused=self._tftp_refused,
            )
        except OSError as e:
            raise cannot_listen("TFTP", where.url("tftp"), where.port, e) from e
        self.tftp_port = self._tftp.addresses[0][1]
        await _announce("tftp", where, self.tftp_port)

    def _tftp_logged(self, stats: TransferStats) -> None:
        """The HTTP side's line, plus what TFTP adds: options, retransmissions, why a transfer ended."""
        whom = self.namespace.attribution(stats.filename)
        mac, profile = whom.mac, whom.profile
        client = stats.peer.rsplit(":", 1)[0].strip("[]")
        options = " ".join(f"{k}={v}" for k, v in stats.options) or "no options"
        detail = f" ({stats.detail})" if stats.detail else ""
        log.info("%s mac=%s profile=%s tftp /%s %s%s %.1f MB %.2fs [%s] %d retransmissions", client, mac or "-",
                 profile or "-", clip(whom.path.lstrip("/")), stats.outcome, detail, stats.bytes_sent / 1e6,
                 stats.duration, options, stats.retransmissions)
        if self.record is not None:
            self.record.record(client, "tftp", "/" + whom.path.lstrip("/"), stats.outcome,
                               stats.outcome in ("complete", "size probe"), stats.bytes_sent, mac, profile,
                               stats.retransmissions, whom.facts)

    def _tftp_refused(self, peer: Peer, filename: str, code: int, message: str) -> None:
        if self.record is None:
            return
        whom = self.namespace.attribution(filename)
        client = str(peer[0])
        self.record.record(client, "tftp", "/" + whom.path.lstrip("/"), f"ERROR {code}", False, 0, whom.mac,
                           whom.profile, 0, whom.facts)

    async def _start_http(self) -> None:
        self._runner = LimitedRunner(make_app(self.namespace, self.record), self.opts.http_limits, access_log=None,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.http.host, self.opts.http.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise cannot_listen("HTTP", self.opts.http.url("http"), self.opts.http.port, e) from e
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.http_port = sockets[0].getsockname()[1] if sockets else self.opts.http.port
        self.namespace.http_port = self.http_port
        if _specific_ipv4(self.opts.http.host):
            self.namespace.http_host = self.opts.http.host
        # A script fetched over TFTP names the image of a --fetch build by this URL: the HTTP listener's address,
        # or for a wildcard one, the server iPXE got its boot file from (the DHCP next-server, which a PXE ROM's
        # TFTP server is), as iPXE expands it.
        host = self.opts.http.host
        specific = host not in ("0.0.0.0", "::")
        self.namespace.http_origin = Endpoint(host if specific else "${next-server}", self.http_port).url("http")
        await _announce("http", self.opts.http, self.http_port)

    async def reload(self, only_if_changed: bool = False) -> None:
        """Re-read the machines file now (SIGHUP); a file with an error keeps the previous configuration.
        `only_if_changed`: unless it is the version served already (a write of the status listener's)."""
        if self.opts.machines is None and self._tables is None:
            self.namespace.refresh()
            return
        async with self._reloading:
            if only_if_changed and self._machines_stat() == self._machines_seen:
                return
            if self.record is not None:
                self.record.reloads += 1
            try:
                machines = self._load()
                await asyncio.to_thread(self.builds.prepare, machines)  # a new profile's system: built first
                if self._dhcp is not None:
                    self._dhcp.check(machines)
                # The overlays are read and rendered in a thread (the rendering itself in the overlays' workers).
                overlays = await asyncio.to_thread(self.namespace.overlays.prepare, machines, strict=False)
                self.namespace.reload(machines, overlays)
            except NetbootError as e:
                if self.record is not None:
                    self.record.reload_failures += 1
                log.error("reload: keeping the previous configuration: %s", e)
                return
            finally:
                self._machines_seen = self._machines_stat()  # after: a reload may name other overlays
            self._configure_record(machines)
            log.info("reload: %d profiles, %d machines", len(machines.profiles), self._count(machines))

    @staticmethod
    def _count(machines: Machines) -> int:
        return len(machines.machines) + len(machines.by_uuid) + len(machines.by_serial)

    async def write_machines(self, edit: Callable[[str], str]) -> None:
        """The status listener's write: `edit` the machines file as it is on disk, check the result as a load
        would (strict, as at start: NetbootError if it would not load, and the file is left as it was), replace
        the file (core/machines_file.py), and serve it before returning."""
        assert self.opts.machines is not None
        path = self.opts.machines
        async with self._reloading:
            (machines, overlays), written = await asyncio.to_thread(rewrite, path, edit, self._checked)
            if self.record is not None:
                self.record.reloads += 1
            self.namespace.reload(machines, overlays)
            self._machines_seen = self._machines_stat(written)  # this very file: a later edit is still seen
            self._configure_record(machines)
            log.info("machines file written: %d profiles, %d machines", len(machines.profiles), self._count(machines))

    async def write_table(self, mac: str, table: dict | None) -> bool:
        """The status listener's write with --database: a machine's table (None: removed) checked as the file's
        with it would be, written into the database for every server, and served here before returning; True
        when the machine was not served before. Refused (400, 404, 503) when it cannot be."""
        assert self._tables is not None
        async with self._reloading:
            served = mac in self.namespace.machines.machines
            if table is None and not served:
                raise Refused(404, f"{mac} is not a machine of the machines file or the database")
            tables = {**self._tables.tables, mac: table}
            try:
                machines, overlays = await asyncio.to_thread(self._checked_tables, mac, tables)
            except NetbootError as e:
                raise Refused(400, f"not written: {e}") from None
            try:
                await self._tables.put(mac, table)
            except Unreachable as e:
                raise Refused(503, str(e)) from None
            if self.record is not None:
                self.record.reloads += 1
            self.namespace.reload(machines, overlays)
            self._configure_record(machines)
            log.info("machines: %s %s in the database (%s)", mac,
                     "removed" if table is None else "replaced" if served else "added",
                     clip(", ".join(f"{k}={v!r}" for k, v in (table or {}).items()), 200))
            return not served

    def _checked_tables(self, mac: str, tables: dict[str, dict | None]) -> tuple[Machines, Prepared]:
        """The machines with `tables` over the file, as a load checks them, `mac`'s table strictly (in a thread)."""
        machines, _ = self._file().with_tables(tables, strict=False)
        if tables[mac] is not None and mac not in machines.from_database:
            machines.with_tables({mac: tables[mac]})  # raises its error
        self.builds.prepare(machines)
        if self._dhcp is not None:
            self._dhcp.check(machines)
        return machines, self.namespace.overlays.prepare(machines, strict=True)

    def _checked(self, text: str) -> tuple[Machines, Prepared]:
        """The machines file's new text checked as a load at start checks it (in a thread)."""
        assert self.opts.machines is not None
        machines = Machines.parse(text, self.opts.machines, self.opts.state_dir)
        self.builds.prepare(machines)
        if self._dhcp is not None:
            self._dhcp.check(machines)
        return machines, self.namespace.overlays.prepare(machines, strict=True)

    def _seen(self, mac: str) -> tuple[str, str]:
        """Where the status record last saw `mac`: the interface DHCP saw it on, the address of its last request."""
        if self.record is None:
            return "", ""
        machine = self.record.snapshot().machine(mac)
        events = machine.history()
        return dict(machine.facts).get("interface", ""), events[-1].client if events else ""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reload.wait(), self.opts.poll)
                if self._reload.is_set() or self._machines_stat() != self._machines_seen:
                    asked = self._reload.is_set()
                    self._reload.clear()
                    await self.reload(only_if_changed=not asked)
                self.builds.poll(self.namespace.machines)
                self.namespace.refresh()
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def close(self) -> None:
        await self.builds.close()
        for part in (self._tables, self._boot_log, self._site):
            if part is not None:
                part.close()
        if self._dhcp is not None:
            self._dhcp.close()
        if self._dhcp6 is not None:
            self._dhcp6.close()
        if self._tftp is not None:
            self._tftp.close()
            await self._tftp.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.record is not None:
            self.record.close()  # ends the status page's live streams
        if self._status is not None:
            await self._status.cleanup()
        self.namespace.close()


async def _announce(scheme: str, where: Endpoint, port: int) -> None:
    """Log the URL of boot.ipxe, and for a wildcard address the URL on each interface (what DHCP should hand out)."""
    log.info("%s: serving %s/boot.ipxe", scheme, where.url(scheme, port))
    if where.host in ("0.0.0.0", "::"):
        # pyroute2's synchronous API runs its own event loop, so not on this one.
        for host in await asyncio.to_thread(reachable_hosts, where.host):
            log.info("%s:   reachable as %s/boot.ipxe", scheme, Endpoint(host, port).url(scheme))


def _specific_ipv4(host: str | None) -> bool:
    """An IPv4 address to name in boot files, rather than a wildcard (then: our address on the interface)."""
    try:
        return host is not None and ipaddress.ip_address(host).version == 4 and host != "0.0.0.0"
    except ValueError:
        return False


def _specific_ipv6(host: str | None) -> bool:
    """An IPv6 address to name in boot URLs, rather than a wildcard (then: our address on the interface)."""
    try:
        return host is not None and ipaddress.ip_address(host).version == 6 and host != "::"
    except ValueError:
        return False


def tftp_resolver(namespace: Namespace) -> Resolver:
    """The namespace as TFTP content: the same names, the same answers as over HTTP. A name whose overlay must
    be rendered or packed first resolves to a coroutine, which the TFTP server awaits."""

    def content(item: Item) -> Content:
        if item.data is not None:
            return BytesContent(item.data)
        assert item.file is not None
        return FileContent(item.file.reopen(), item.file.size)

    async def later(name: str) -> Content:
        try:
            return content(await namespace.resolve(name))
        except BadRequest as e:
            raise ContentError(str(e)) from None
        except NotFound as e:
            raise TftpNotFound(str(e)) from None

    def resolve(name: str, peer: Peer) -> Content | Awaitable[Content]:
        try:
            return content(namespace.lookup(name))
        except Pending:
            return later(name)
        except BadRequest as e:
            raise ContentError(str(e)) from None  # ERROR 0: see the message
        except NotFound as e:
            raise TftpNotFound(str(e)) from None

    return resolve


def raise_file_limit(opts: ServeOptions) -> None:
    """Raise the soft limit on open files toward the hard one, so that the connection and transfer limits, not
    the process's 1024 descriptors (systemd's default), are what refuses clients."""
    import resource

    tftp = opts.tftp_config
    wanted = opts.http_limits.max_connections + 2 * tftp.max_transfers + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("only %d open files allowed (ulimit -Hn): fewer connections than --http-max-connections "
                        "may be served", target)


async def serve(opts: ServeOptions) -> None:
    raise_file_limit(opts)
    server = Server(opts)
    try:
        await server.start()
        await server.run()
    finally:
        await server.close()
    log.info("stopped")
