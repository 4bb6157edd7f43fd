"""The status listener: a separate aiohttp application, so that booting machines never see the inventory.

    /                      one HTML page: the machines' table, filtered and paginated as /api/machines is;
                           readable without JavaScript, updated live with it (no external assets: it works offline)
    /api/machines          JSON: a page of the machines seen or configured (see `Query` for the parameters)
    /api/events?since=N    JSON: the recent boot events after sequence number N, newest first
    /api/events/stream     Server-Sent Events: each new event as it happens (Last-Event-ID or ?since= replays)
    /metrics               Prometheus text format

It shares the event loop that serves boots, so what costs in proportion to the machines (their entries, the
page, the states /metrics counts) is worked out in a thread of its own from a snapshot of the record, and at
most a few requests at a time take one.

Without a token, only requests for the listener's own address (Host: its IP[:port], `localhost` on loopback,
or a name given with --status-name) are answered, so that a web page a browser on this host visits cannot
read the inventory by pointing its own name at 127.0.0.1 (DNS rebinding). With a token, every route wants
`Authorization: Bearer TOKEN`, the cookie the page sets, or `?token=TOKEN` (for a browser's first visit of the
page, which then sets an HttpOnly SameSite=Strict cookie and drops the token from its address) and answers 401
otherwise.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import jinja2
from aiohttp import web

from netboot.status.metrics import CONTENT_TYPE, Metrics
from netboot.status.record import STATES, BootRecord, Snapshot, profile_of, state_of

_KEEPALIVE = 15.0  # seconds between comments on an idle event stream, so that proxies keep it open
COOKIE = "netboot_status"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_BUILDS_AT_ONCE = 2  # requests holding a snapshot at once; others wait their turn without one
_MAC_PREFIX = re.compile(r"[0-9a-f]{0,12}")
T = TypeVar("T")


@dataclass(frozen=True)
class Query:
    """The machines asked for: `state` and `profile` (exact), `mac` (a prefix, any spelling: "52:54:00",
    "52-54", "5254000a"), and a page: `limit` machines (default 100, at most 1000) in MAC order, after the MAC
    `after` (the `next` of the previous page)."""

    state: str | None = None
    profile: str | None = None
    mac: str = ""
    after: str = ""
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Any) -> Query:
        state = query.get("state") or None
        if state is not None and state not in STATES:
            raise web.HTTPBadRequest(text=f"state: one of {', '.join(STATES)}\n")
        try:
            limit = int(query.get("limit") or DEFAULT_LIMIT)
        except ValueError:
            raise web.HTTPBadRequest(text="limit: not a number\n") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise web.HTTPBadRequest(text=f"limit: 1 to {MAX_LIMIT}\n")
        return cls(state, query.get("profile") or None, _mac_prefix(query.get("mac", ""), "mac"),
                   _mac_prefix(query.get("after", ""), "after"), limit)

    def matches(self, snapshot: Snapshot, mac: str) -> bool:
        if not mac.startswith(self.mac):
            return False
        events, configured = snapshot.events.get(mac, ()), snapshot.configured.get(mac)
        return ((self.state is None or state_of(events) == self.state)
                and (self.profile is None or profile_of(events, configured) == self.profile))

    def args(self, **changes: str) -> str:
        """This query as URL parameters (for the page's links), with `changes`."""
        values = {"state": self.state or "", "profile": self.profile or "", "mac": self.mac,
                  "limit": "" if self.limit == DEFAULT_LIMIT else str(self.limit), **changes}
        return urllib.parse.urlencode({k: v for k, v in values.items() if v})


def _mac_prefix(text: str, what: str) -> str:
    """A MAC or the start of one, in the record's spelling (lower case, colons)."""
    bare = re.sub(r"[:\-.]", "", text.strip().lower())
    if not _MAC_PREFIX.fullmatch(bare):
        raise web.HTTPBadRequest(text=f"{what}: not a MAC address or the start of one\n")
    return ":".join(bare[i : i + 2] for i in range(0, len(bare), 2))


@dataclass(frozen=True)
class Page:
    snapshot: Snapshot
    macs: list[str]  # the page's machines
    total: int  # machines that match the query
    next: str | None  # the `after` of the next page
    profiles: list[str]  # every profile a machine has, for the page's filter

    def entries(self) -> Iterator[dict[str, Any]]:
        """The page's machines' JSON entries, one at a time: each is dropped before the next is made, so that a
        page of 1,000 machines never holds 20,000 dictionaries at once (whose collection, holding the GIL, held
        up the event loop)."""
        for mac in self.macs:
            yield self.snapshot.machine(mac).json(self.snapshot.systems)


def select(snapshot: Snapshot, query: Query) -> Page:
    """One page of machines (in a thread: this is in proportion to the whole record)."""
    macs = set(snapshot.events).union(snapshot.configured)
    found = sorted(mac for mac in macs if query.matches(snapshot, mac))
    total = len(found)
    if query.after:
        found = found[bisect.bisect_right(found, query.after):]
    profiles = {p for mac in macs if (p := profile_of(snapshot.events.get(mac, ()), snapshot.configured.get(mac)))}
    more = len(found) > query.limit
    page = found[: query.limit]
    return Page(snapshot, page, total, page[-1] if more else None, sorted(profiles))


def _json(data: object) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1) + "\n", content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _since(request: web.Request) -> int:
    text = request.headers.get("Last-Event-ID") or request.query.get("since") or "0"
    try:
        return max(0, int(text))
    except ValueError:
        raise web.HTTPBadRequest(text="since: not a sequence number\n") from None


def cookie_value(token: str) -> str:
    """What the page's cookie holds: derived from the token, so that the cookie is not the token itself."""
    return hmac.new(token.encode(), b"netboot status page", hashlib.sha256).hexdigest()


def host_allowed(host: str | None, sockname: tuple[Any, ...] | None, names: Iterable[str]) -> bool:
    """Whether a Host header names this listener: its own IP[:port], localhost on loopback, or one of `names`."""
    if host is None or sockname is None:
        return True  # no Host (HTTP/1.0, not a browser): nothing a rebinding page could send
    m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::(\d{1,5}))?", host.strip().lower())
    if m is None or (m.group(2) is not None and int(m.group(2)) != sockname[1]):
        return False
    name = m.group(1).strip("[]")
    local = ipaddress.ip_address(str(sockname[0]).split("%", 1)[0])
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
        local = local.ipv4_mapped
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name) == local
    return (name == "localhost" and local.is_loopback) or name in {n.lower() for n in names}


def make_status_app(record: BootRecord, metrics: Metrics, token: str | None = None,
                    names: Iterable[str] = ()) -> web.Application:
    names = tuple(names)
    template = jinja2.Environment(
        loader=jinja2.PackageLoader("netboot.status", "."), autoescape=True, undefined=jinja2.StrictUndefined,
    ).get_template("page.html")
    executor = ThreadPoolExecutor(1, thread_name_prefix="netboot-status")
    turns = asyncio.Semaphore(_BUILDS_AT_ONCE)
    cookie = cookie_value(token) if token is not None else ""

    async def off_loop(gather: Callable[[], Any], build: Callable[[Any], T]) -> T:
        """`build(gather())`: what it needs gathered on the loop, the work in the listener's thread."""
        async with turns:
            gathered = gather()
            return await asyncio.get_running_loop().run_in_executor(executor, build, gathered)

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        record.flush()  # what the servers noted, applied before anything is shown
        if token is None:
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            if not host_allowed(request.headers.get("Host"), sockname, names):
                raise web.HTTPMisdirectedRequest(text="this listener answers only for its own address; "
                                                      "add a name with --status-name\n")
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
        by_token = hmac.compare_digest(given.encode(), token.encode())
        if not by_token and not hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), cookie.encode()):
            raise web.HTTPUnauthorized(text="a bearer token is required\n",
                                       headers={"WWW-Authenticate": 'Bearer realm="netboot"'})
        response = await handler(request)
        if by_token and request.path == "/":
            # The page and what it fetches (its own table, the event stream) go by the cookie from now on.
            response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/")
        return response

    async def index(request: web.Request) -> web.Response:
        query = Query.parse(request.query)

        def render(snapshot: Snapshot) -> str:
            page = select(snapshot, query)
            return template.render(page=page, query=query, states=STATES, last=snapshot.seq, size=_size)

        text = await off_loop(record.snapshot, render)
        return web.Response(text=text, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def machines(request: web.Request) -> web.Response:
        query = Query.parse(request.query)

        def build(snapshot: Snapshot) -> str:
            page = select(snapshot, query)
            # One machine at a time (see Page.entries), without indent: the json module's C encoder then, four
            # times faster than its Python one on a page of 1,000 machines.
            entries = ",\n".join(map(json.dumps, page.entries()))
            return f'{{"machines": [\n{entries}\n], "total": {page.total}, "next": {json.dumps(page.next)}}}\n'

        text = await off_loop(record.snapshot, build)
        return web.Response(text=text, content_type="application/json", headers={"Cache-Control": "no-store"})

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
        body = await off_loop(metrics.gather, metrics.text)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def stop(app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(middlewares=[guard])
    app.on_cleanup.append(stop)
    app.router.add_get("/", index)
    app.router.add_get("/api/machines", machines)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/events/stream", stream)
    app.router.add_get("/metrics", prometheus)
    return app


def _sse(event: Any) -> bytes:
    return f"id: {event.seq}\ndata: {json.dumps(event.json())}\n\n".encode()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
