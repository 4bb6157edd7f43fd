"""The HTTP side of `netboot serve` (aiohttp): scripts rendered per request, files by sendfile.

aiohttp's FileResponse gives kernels and initrds sendfile(2), Content-Length, Range (206), HEAD, ETag,
Last-Modified and conditional requests; it is handed the generation's held file through /proc/self/fd, so a
transfer in progress keeps reading the build it started with.

Limits (`HttpLimits`) keep slow and idle clients from crowding out booting machines: a connection must
complete each request's headers within the idle timeout (aiohttp's keep-alive timer, which runs from the
connection's start and from each response's end until the next request is complete), and connections are
capped in all and per client address (IPv6: per /64). At a cap, idle connections of the heaviest addresses make
room for the new one, so that a few addresses holding connections open never lock booting machines out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import weakref
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestHandler

from netboot.core.clients import client_of
from netboot.core.logtext import clip
from netboot.server.http_limits import HttpLimits
from netboot.server.namespace import BadRequest, Item, Namespace, NotFound
from netboot.status.record import BootRecord
from netboot.tftp.transfer import format_peer

log = logging.getLogger("netboot.serve")

_LIMIT_LOG_INTERVAL = 10.0
# A Host header that can go into a script as it is: a name or IPv4 address, or a bracketed IPv6 address, and a port.
_HOST = re.compile(r"(?:(?:[A-Za-z0-9-]{1,63}\.){0,126}[A-Za-z0-9-]{1,63}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")
_TEXT = {"cmdline", "netboot.ipxe"}
_JSON = {"manifest.json"}


class _LimitedServer(web.Server):
    """aiohttp's connection manager, holding connections to `limits`: at a cap, the idle connections of the
    heaviest client addresses are closed, oldest first, to make room; a new connection is refused only when
    every connection it competes with is busy with a request."""

    def __init__(self, limits: HttpLimits, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.limits = limits
        self._client: dict[RequestHandler, str] = {}
        # Each client's connections, oldest first (dicts keep insertion order).
        self._by_client: dict[str, dict[RequestHandler, None]] = {}
        self._closed = 0
        self._refused = 0
        self._logged = 0.0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        client = client_of(str(peer[0])) if peer else "?"
        if not self._make_room(client):
            self._refused += 1
            self._log(client)
            handler.force_close()
            return
        self._client[handler] = client
        self._by_client.setdefault(client, {})[handler] = None

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._forget(handler)
        super().connection_lost(handler, exc)

    def _forget(self, handler: RequestHandler) -> None:
        client = self._client.pop(handler, None)
        if client is not None:
            connections = self._by_client[client]
            del connections[handler]
            if not connections:
                del self._by_client[client]

    def _make_room(self, client: str) -> bool:
        """Room for one more connection from `client`, closing idle ones if need be; False if there is none."""
        own = self._by_client.get(client, {})
        if len(own) >= self.limits.max_per_address and not self._close_idle([client]):
            return False
        if len(self._client) >= self.limits.max_connections:
            heaviest = sorted(self._by_client, key=lambda c: len(self._by_client[c]), reverse=True)
            if not self._close_idle(heaviest):
                return False
        if self._closed:
            self._log(client)
        return True

    def _close_idle(self, clients: list[str]) -> bool:
        """Close the oldest idle connection of the first of `clients` that has one."""
        for client in clients:
            for handler in self._by_client[client]:
                # Idle: waiting for its next request's headers, as aiohttp's own keep-alive timer judges it
                # (RequestHandler._process_keepalive); a connection sending or receiving a response is busy.
                waiter = handler._waiter
                if waiter is not None and not waiter.done():
                    self._forget(handler)  # now: the transport reports its loss only later
                    handler.force_close()
                    self._closed += 1
                    return True
        return False

    def _log(self, client: str) -> None:
        now = time.monotonic()
        if now - self._logged >= _LIMIT_LOG_INTERVAL:
            heaviest = max(self._by_client, key=lambda c: len(self._by_client[c]), default="-")
            log.warning("http: connection limits reached (%d in all, %d per address): %d idle connections closed "
                        "to make room and %d new ones refused (every other connection busy), the latest from %s; "
                        "the heaviest address holds %d", self.limits.max_connections, self.limits.max_per_address,
                        self._closed, self._refused, client, len(self._by_client.get(heaviest, ())))
            self._logged = now
            self._closed = self._refused = 0


class LimitedRunner(web.AppRunner):
    """An AppRunner whose connections are held to `limits` (see the module's docstring)."""

    def __init__(self, app: web.Application, limits: HttpLimits, **kwargs: object) -> None:
        super().__init__(app, keepalive_timeout=limits.idle_timeout, **kwargs)  # type: ignore[arg-type]
        self.limits = limits

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts and freezes the application
        return _LimitedServer(self.limits, made.request_handler, request_factory=made.request_factory,
                              loop=asyncio.get_running_loop(), **self._kwargs)


def origin_of(request: web.BaseRequest) -> str:
    """The URL the client reached this server at, for what it must fetch by absolute URL (a --fetch build's image,
    which stage 1 downloads): its Host header, which says how the client knows us (a VM behind NAT, as on QEMU's
    user network, knows us by an address that is not ours), if it is a plain host and port, else the address
    the connection came to. A client that sends another only misleads itself."""
    host = request.headers.get("Host", "")
    if not _HOST.fullmatch(host):
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            return ""
        host = format_peer(sockname)
    return f"http://{host}"


def describe(peer: str, proto: str, item: Item | None, name: str, status: object, nbytes: int, started: float) -> str:
    """The one log line per boot step: client, MAC, profile, protocol, file, outcome."""
    mac = item.mac if item and item.mac else "-"
    profile = item.profile if item and item.profile else "-"
    return (
        f"{peer} mac={mac} profile={profile} {proto} {clip(name)} {status} "
        f"{nbytes / 1e6:.1f} MB {time.monotonic() - started:.2f}s"
    )


class _HeldFileResponse(web.FileResponse):
    """FileResponse of a held file: its own descriptor for this transfer, closed when the transfer ends."""

    def __init__(self, item: Item, peer: str, started: float, headers: dict[str, str],
                 record: BootRecord | None) -> None:
        assert item.file is not None
        self._fd = item.file.reopen()
        self._closer = weakref.finalize(self, os.close, self._fd)  # even if never prepared
        self._item, self._peer, self._started, self._record = item, peer, started, record
        self._stopped_at: int | None = None
        super().__init__(f"/proc/self/fd/{self._fd}", headers=headers)

    async def _sendfile(self, request: web.BaseRequest, fobj: Any, offset: int, count: int
                        ) -> AbstractStreamWriter:
        # aiohttp's sendfile step. When the client goes away, asyncio's sendfile has left the file's position
        # after the last byte the socket took, which tells how far the transfer got.
        try:
            return await super()._sendfile(request, fobj, offset, count)  # type: ignore[misc]
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                self._stopped_at = max(0, fobj.tell() - offset)
            raise

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._payload_writer
        aborted = True
        if self._record is not None:
            self._record.http_in_flight += 1
        try:
            writer = await super().prepare(request)
            aborted = False
            return writer
        finally:
            self._closer()
            item = self._item
            if aborted:
                status, sent = "aborted", self._stopped_at or 0
            else:
                status, sent = str(self.status), (self.content_length or 0) if request.method != "HEAD" else 0
            log.info(describe(self._peer, "http", item, "/" + item.name, status, sent, self._started))
            if self._record is not None:
                self._record.http_in_flight -= 1
                self._record.record(self._peer, "http", "/" + item.name, status,
                                    not aborted and self.status < 400, sent, item.mac, item.profile)


def make_app(namespace: Namespace, record: BootRecord | None = None) -> web.Application:
    """The boot network's application; each finished request also goes to `record` when given."""

    def refused(peer: str, name: str, status: int, e: Exception, started: float) -> web.Response:
        whom = namespace.attribution(name)
        log.info(describe(peer, "http", None, "/" + whom.path, status, 0, started))
        if record is not None:
            record.record(peer, "http", "/" + whom.path, str(status), False, 0, whom.mac, whom.profile, 0, whom.facts)
        return web.Response(status=status, text=f"{e}\n")

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        name = request.match_info["path"]
        peer = request.remote or "?"
        try:
            item = await namespace.resolve(name, origin_of(request))
        except BadRequest as e:
            return refused(peer, name, 400, e, started)
        except NotFound as e:
            return refused(peer, name, 404, e, started)
        if item.data is not None:
            # Scripts change whenever the machines file or a build does: never cached.
            # (aiohttp sends the headers alone, Content-Length included, for HEAD.)
            response = web.Response(
                body=item.data, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-store"}
            )
            path = "/" + item.name  # (a script's name without the facts its machine sent, which go with it)
            log.info(describe(peer, "http", item, path, 200, len(item.data), started))
            if record is not None:
                record.record(peer, "http", path, "200", True, len(item.data), item.mac, item.profile, 0, item.facts)
            return response
        assert item.file is not None
        basename = name.rsplit("/", 1)[-1]
        headers = {}
        if basename in _TEXT:
            headers["Content-Type"] = "text/plain; charset=utf-8"
        elif basename in _JSON:
            headers["Content-Type"] = "application/json"
        else:
            headers["Content-Type"] = "application/octet-stream"
        return _HeldFileResponse(item, peer, started, headers, record)

    app = web.Application()
    # Any path, a newline in it too (which "." would not match: aiohttp would answer 404 itself, unlogged).
    app.router.add_get("/{path:(?s:.*)}", handle)
    return app
