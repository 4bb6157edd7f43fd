"""`netboot serve`: one asyncio process answering HTTP and TFTP from one namespace, reloading as things change."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from netboot.errors import NetbootError
from netboot.http import make_app
from netboot.machines import Machines
from netboot.namespace import Namespace

log = logging.getLogger("netboot.serve")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Endpoint:
        """'0.0.0.0:8080', '[::]:69', '[::1]:8080' (a port of 0 picks a free one)."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
        try:
            ipaddress.ip_address(host)
            number = int(port)
            if not sep or not 0 <= number <= 65535:
                raise ValueError
        except ValueError:
            raise NetbootError(f"{what} {text!r} is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)") from None
        return cls(host, number)

    def url(self, scheme: str, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{port if port is not None else self.port}"


@dataclass(frozen=True)
class ServeOptions:
    out: Path | None = None
    machines: Path | None = None
    http: Endpoint = Endpoint("0.0.0.0", 8080)
    tftp: Endpoint | None = Endpoint("0.0.0.0", 69)
    grace: float = 600.0  # how long the files of a replaced build stay available
    poll: float = 1.0  # how often output directories and the machines file are checked for changes


class Server:
    def __init__(self, opts: ServeOptions) -> None:
        if (opts.out is None) == (opts.machines is None):
            raise NetbootError("give either --dir OUT or --machines FILE")
        self.opts = opts
        machines = Machines.single(opts.out) if opts.out else Machines.load(opts.machines)  # type: ignore[arg-type]
        self.namespace = Namespace(machines, single_dir=opts.out is not None, grace=opts.grace)
        self._machines_seen = self._machines_stat()
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.http_port = 0

    def _machines_stat(self) -> tuple[int, int, int] | None:
        if self.opts.machines is None:
            return None
        try:
            st = os.stat(self.opts.machines)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def start(self) -> None:
        self._runner = web.AppRunner(make_app(self.namespace), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.http.host, self.opts.http.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise NetbootError(f"cannot listen for HTTP on {self.opts.http.url('http')}: {e.strerror}") from e
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        self.http_port = sockets[0].getsockname()[1] if sockets else self.opts.http.port
        log.info("http: serving %s/boot.ipxe", self.opts.http.url("http", self.http_port))

    def reload(self) -> None:
        """Re-read the machines file now (SIGHUP); a file with an error keeps the previous configuration."""
        if self.opts.machines is None:
            self.namespace.refresh()
            return
        try:
            machines = Machines.load(self.opts.machines)
            self.namespace.reload(machines)
        except NetbootError as e:
            log.error("reload: keeping the previous configuration: %s", e)
            return
        log.info("reload: %d profiles, %d machines", len(machines.profiles), len(machines.machines))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reload.wait(), self.opts.poll)
                seen = self._machines_stat()
                if self._reload.is_set() or seen != self._machines_seen:
                    self._reload.clear()
                    self._machines_seen = seen
                    self.reload()
                self.namespace.refresh()
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.namespace.close()


async def serve(opts: ServeOptions) -> None:
    server = Server(opts)
    try:
        await server.start()
        await server.run()
    finally:
        await server.close()
    log.info("stopped")
