"""The HTTP side of `netboot serve` (aiohttp): scripts rendered per request, files by sendfile.

aiohttp's FileResponse gives kernels and initrds sendfile(2), Content-Length, Range (206), HEAD, ETag,
Last-Modified and conditional requests; it is handed the generation's held file through /proc/self/fd, so a
transfer in progress keeps reading the build it started with.
"""

from __future__ import annotations

import logging
import os
import time
import weakref

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from netboot.namespace import BadRequest, Item, Namespace, NotFound

log = logging.getLogger("netboot.serve")

_TEXT = {"cmdline", "netboot.ipxe"}
_JSON = {"manifest.json"}


def describe(peer: str, proto: str, item: Item | None, name: str, status: object, nbytes: int, started: float) -> str:
    """The one log line per boot step: client, MAC, profile, protocol, file, outcome."""
    mac = item.mac if item and item.mac else "-"
    profile = item.profile if item and item.profile else "-"
    return (
        f"{peer} mac={mac} profile={profile} {proto} {name} {status} "
        f"{nbytes / 1e6:.1f} MB {time.monotonic() - started:.2f}s"
    )


class _HeldFileResponse(web.FileResponse):
    """FileResponse of a held file: its own descriptor for this transfer, closed when the transfer ends."""

    def __init__(self, item: Item, peer: str, started: float, headers: dict[str, str]) -> None:
        assert item.file is not None
        self._fd = item.file.reopen()
        self._closer = weakref.finalize(self, os.close, self._fd)  # even if never prepared
        self._item, self._peer, self._started = item, peer, started
        super().__init__(f"/proc/self/fd/{self._fd}", headers=headers)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._payload_writer
        try:
            return await super().prepare(request)
        finally:
            self._closer()
            sent = (self.content_length or 0) if request.method != "HEAD" else 0
            log.info(describe(self._peer, "http", self._item, "/" + self._item.name, self.status, sent, self._started))


def make_app(namespace: Namespace) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        name = request.match_info["path"]
        peer = request.remote or "?"
        try:
            item = namespace.lookup(name)
        except BadRequest as e:
            log.info(describe(peer, "http", None, "/" + name, 400, 0, started))
            return web.Response(status=400, text=f"{e}\n")
        except NotFound as e:
            log.info(describe(peer, "http", None, "/" + name, 404, 0, started))
            return web.Response(status=404, text=f"{e}\n")
        if item.data is not None:
            # Scripts change whenever the machines file or a build does: never cached.
            # (aiohttp sends the headers alone, Content-Length included, for HEAD.)
            response = web.Response(
                body=item.data, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-store"}
            )
            log.info(describe(peer, "http", item, "/" + name, 200, len(item.data), started))
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
        return _HeldFileResponse(item, peer, started, headers)

    app = web.Application()
    app.router.add_get("/{path:.*}", handle)
    return app
