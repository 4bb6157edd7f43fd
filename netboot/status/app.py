"""The status listener: a separate aiohttp application, so that booting machines never see the inventory.

    /                      one HTML page: the machines' table, filtered by ?state= and ?profile=; readable
                           without JavaScript, updated live with it (no external assets: it works offline)
    /api/machines          JSON: one entry per machine seen or configured (same filters)
    /api/events?since=N    JSON: the recent boot events after sequence number N, newest first
    /api/events/stream     Server-Sent Events: each new event as it happens (Last-Event-ID or ?since= replays)
    /metrics               Prometheus text format

With a token, every route wants `Authorization: Bearer TOKEN` (or `?token=TOKEN`, for a browser's address bar
and EventSource, which cannot send headers) and answers 401 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
from importlib import resources
from typing import Any

from aiohttp import web

from netboot.status.metrics import CONTENT_TYPE, Metrics
from netboot.status.record import STATES, BootRecord, Machine

_KEEPALIVE = 15.0  # seconds between comments on an idle event stream, so that proxies keep it open


def _filtered(record: BootRecord, query: Any) -> list[Machine]:
    state, profile = query.get("state") or None, query.get("profile") or None
    return [m for m in record.machines.values()
            if (state is None or m.state == state) and (profile is None or m.current_profile == profile)]


def _json(data: object) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1) + "\n", content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _since(request: web.Request) -> int:
    text = request.headers.get("Last-Event-ID") or request.query.get("since") or "0"
    try:
        return max(0, int(text))
    except ValueError:
        raise web.HTTPBadRequest(text=f"since: not a sequence number: {text!r}\n") from None


def make_status_app(record: BootRecord, metrics: Metrics, token: str | None = None) -> web.Application:
    page = resources.files("netboot.status").joinpath("page.html").read_text()

    @web.middleware
    async def authorize(request: web.Request, handler: Any) -> web.StreamResponse:
        record.flush()  # what the servers noted, applied before anything is shown
        if token is not None:
            given = request.headers.get("Authorization", "")
            given = given[7:] if given.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise web.HTTPUnauthorized(text="a bearer token is required\n",
                                           headers={"WWW-Authenticate": 'Bearer realm="netboot"'})
        return await handler(request)

    async def index(request: web.Request) -> web.Response:
        machines = sorted(_filtered(record, request.query), key=lambda m: m.mac)
        state, profile = request.query.get("state", ""), request.query.get("profile", "")
        profiles = sorted({p for m in record.machines.values() if (p := m.current_profile)})
        text = (page.replace("@rows@", "\n".join(_row(m.json(record.systems)) for m in machines) or _EMPTY)
                .replace("@states@", _options(STATES, state))
                .replace("@profiles@", _options(profiles, profile))
                .replace("@count@", str(len(machines)))
                .replace("@last@", str(record.last_seq))
                .replace("@token@", html.escape(request.query.get("token", ""), quote=True)))
        return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def machines(request: web.Request) -> web.Response:
        found = sorted(_filtered(record, request.query), key=lambda m: m.mac)
        return _json({"machines": [m.json(record.systems) for m in found]})

    async def events(request: web.Request) -> web.Response:
        found = record.events_since(_since(request))
        return _json({"last": record.last_seq, "events": [e.json() for e in found]})

    async def stream(request: web.Request) -> web.StreamResponse:
        since = _since(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        with record.subscription() as queue:
            for event in reversed(record.events_since(since)):
                await response.write(_sse(event))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), _KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break  # fell behind, or the server is closing: the client reconnects with Last-Event-ID
                await response.write(_sse(event))
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=metrics.text(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application(middlewares=[authorize])
    app.router.add_get("/", index)
    app.router.add_get("/api/machines", machines)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/events/stream", stream)
    app.router.add_get("/metrics", prometheus)
    return app


def _sse(event: Any) -> bytes:
    return f"id: {event.seq}\ndata: {json.dumps(event.json())}\n\n".encode()


_EMPTY = '<tr><td colspan="9" class="empty">no machine has asked yet</td></tr>'


def _options(values: Any, selected: str) -> str:
    out = ['<option value="">all</option>']
    for value in values:
        v = html.escape(value, quote=True)
        out.append(f'<option value="{v}"{" selected" if value == selected else ""}>{v}</option>')
    return "".join(out)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _row(m: dict[str, Any]) -> str:
    """One machine's row, from its JSON entry."""
    e = html.escape
    last = m["last"]
    cells = [
        f'<td class="mac">{e(m["mac"])}</td>',
        f'<td class="state"><span class="badge {e(m["state"])}">{e(m["state"])}</span></td>',
        f"<td>{e(m['profile'] or '')}</td>",
        f"<td title=\"{e(m['system'] or '', quote=True)}\">{e(m['build'] or '')}</td>",
        f"<td>{e(m['client'] or '')}</td>",
        f"<td>{e(' '.join((last['protocol'], last['path'], last['status']))) if last else ''}</td>",
        f'<td class="num">{_size(m["bytes"])}</td>',
        f"<td>{m['first_request'] or ''}</td>",
        f"<td>{m['last_request'] or ''}</td>",
    ]
    return (f'<tr id="m-{e(m["mac"])}" data-state="{e(m["state"])}" data-profile="{e(m["profile"] or "")}">'
            f'{"".join(cells)}</tr>')
