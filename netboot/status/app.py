"""The status listener: a separate aiohttp application, so that booting machines never see the inventory.

    /                      one HTML page: counts by state, a chart of the last hour's boots, the machines' table,
                           filtered and paginated as /api/machines is; readable without JavaScript, updated live
                           with it (no external assets: it works offline); unknown machines adopted from it
    /machines/<mac>        a machine's own page: its facts, its boot, its events
    /api/machines          JSON: a page of the machines seen or configured (see `Query` for the parameters)
    /api/machines/<mac>    JSON: one machine (GET); its table in the machines file (PUT, DELETE)
    /api/machines/<mac>/wake   POST: a Wake-on-LAN magic packet to it
    /api/events?since=N    JSON: the recent boot events after sequence number N, newest first
    /api/events/stream     Server-Sent Events: each new event as it happens (Last-Event-ID or ?since= replays)
    /metrics               Prometheus text format

Changes (PUT, DELETE, POST) go through the `Inventory` the server hands over (status/inventory.py) and need a
token: a listener without one refuses them all (403), whatever the Host.

It shares the event loop that serves boots, so what costs in proportion to the machines (their entries, the
page, the states /metrics counts) is worked out in a thread of its own from a snapshot of the record, and at
most a few requests at a time take one.

Without a token, only requests for the listener's own address (Host: its IP[:port], `localhost` on loopback,
or a name given with --status-name) are answered, so that a web page a browser on this host visits cannot
read the inventory by pointing its own name at 127.0.0.1 (DNS rebinding). With a token, every route wants
`Authorization: Bearer TOKEN`, the cookie the pages set, or `?token=TOKEN` (for a browser's first visit of a
page, / or a machine's, which then sets an HttpOnly SameSite=Strict cookie, Secure over HTTPS, and drops the
token from its address) and answers 401 otherwise, saying how to give it. A change authorized by the cookie must
also come from the listener's own page, if its browser says where from (Origin), besides the cookie's
SameSite=Strict.
"""

from __future__ import annotations

import asyncio
import bisect
import calendar
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import jinja2
from aiohttp import web

from netboot.core import mac as macs
from netboot.core.errors import NetbootError
from netboot.core.machines_file import table_from_json
from netboot.status.chart import boots_chart
from netboot.status.inventory import Inventory, Refused
from netboot.status.metrics import CONTENT_TYPE, Metrics
from netboot.status.record import STATES, BootRecord, Snapshot, profile_of, state_of

_KEEPALIVE = 15.0  # seconds between comments on an idle event stream, so that proxies keep it open
COOKIE = "netboot_status"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_BUILDS_AT_ONCE = 2  # requests holding a snapshot at once; others wait their turn without one
_MAC_PREFIX = re.compile(r"[0-9a-f]{0,12}")
MAX_BODY = 64 * 1024  # bytes of a change's body (a machine's table), at most
_READING = ("GET", "HEAD")
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
        return ((self.state is None or state_of(events, snapshot.overlaid) == self.state)
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


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=1) + "\n", status=status, content_type="application/json",
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
                    names: Iterable[str] = (), inventory: Inventory | None = None) -> web.Application:
    names = tuple(names)
    templates = jinja2.Environment(
        loader=jinja2.PackageLoader("netboot.status", "."), autoescape=True, undefined=jinja2.StrictUndefined,
    )
    templates.globals.update(size=_size, took=_took)
    page_template, machine_template = templates.get_template("page.html"), templates.get_template("machine.html")
    executor = ThreadPoolExecutor(1, thread_name_prefix="netboot-status")
    # While that thread builds a page, the event loop gives up the GIL at each of a request's system calls and
    # waits up to the switch interval (5 ms by default) to get it back: a boot request of a dozen calls then
    # waited 50 ms and more, near a second on a loaded machine. At 0.5 ms, as the DHCP journal's thread has it.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    turns = asyncio.Semaphore(_BUILDS_AT_ONCE)
    cookie = cookie_value(token) if token is not None else ""
    writable = inventory is not None and token is not None  # (the page offers adoption only then)

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
            if request.method not in _READING:
                raise web.HTTPForbidden(text="changes need a token: start netboot serve with --status-token or "
                                             "--status-token-file\n")
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
        by_token = hmac.compare_digest(given.encode(), token.encode())
        if not by_token and not hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), cookie.encode()):
            raise _unauthorized(request)
        if not by_token and request.method not in _READING:
            origin = request.headers.get("Origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc != request.host:
                raise web.HTTPForbidden(text="a change by the page's cookie must come from the page\n")
        response = await handler(request)
        if by_token and request.method in _READING and _is_page(request.path):
            # The page and what it fetches (its own table, the event stream) go by the cookie from now on.
            # Secure over HTTPS: a browser then never sends it in clear, to this port or another of the host's.
            response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/", secure=request.secure)
        return response

    def html(text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def index(request: web.Request) -> web.Response:
        query = Query.parse(request.query)
        profiles = inventory.profiles() if inventory is not None else []

        def render(snapshot: Snapshot) -> str:
            page = select(snapshot, query)
            return page_template.render(
                page=page, query=query, states=STATES, last=snapshot.seq, counts=snapshot.states(),
                chart=boots_chart(snapshot.per_minute()), writable=writable, profiles=profiles,
                ago=_ago(time.time()))

        return html(await off_loop(record.snapshot, render))

    async def machine_page(request: web.Request) -> web.Response:
        mac = _mac(request)

        def render(snapshot: Snapshot) -> tuple[str, int]:
            entry = snapshot.machine(mac).json(snapshot.systems)
            text = machine_template.render(m=entry, last=snapshot.seq, writable=writable, ago=_ago(time.time()))
            return text, 200 if snapshot.known(mac) else 404

        text, status = await off_loop(record.snapshot, render)
        return html(text, status)

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

    async def machine(request: web.Request) -> web.Response:
        mac = _mac(request)
        snapshot = record.snapshot()
        if not snapshot.known(mac):
            raise web.HTTPNotFound(text=f"{mac} has not been seen and is not in the machines file by its MAC\n")
        return _json(snapshot.machine(mac).json(snapshot.systems))

    def changes() -> Inventory:
        if inventory is None:
            raise web.HTTPConflict(text="this listener has nothing it may change\n")
        return inventory

    async def put(request: web.Request) -> web.Response:
        mac, inv = _mac(request), changes()
        try:
            table = table_from_json(await request.json())
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(text="the body is not JSON\n") from None
        except NetbootError as e:
            raise web.HTTPBadRequest(text=f"{e}\n") from None
        try:
            added = await inv.put(mac, table)
        except Refused as e:
            return _refused(e)
        return _json({"mac": mac, "added": added, "table": table}, 201 if added else 200)

    async def delete(request: web.Request) -> web.Response:
        mac, inv = _mac(request), changes()
        try:
            await inv.delete(mac)
        except Refused as e:
            return _refused(e)
        return _json({"mac": mac, "deleted": True})

    async def wake(request: web.Request) -> web.Response:
        mac, inv = _mac(request), changes()
        try:
            sent = await inv.wake(mac)
        except Refused as e:
            return _refused(e)
        return _json({"mac": mac, "sent": sent})

    async def events(request: web.Request) -> web.Response:
        found = record.events_since(_since(request))
        return _json({"last": record.last_seq, "events": [e.json() for e in found]})

    async def stream(request: web.Request) -> web.StreamResponse:
        since = _since(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        with record.subscription() as queue:
            try:
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
            except ConnectionError:
                # The client left (a closed tab, `curl -N` stopped): aiohttp finds out only at the next write,
                # as ClientConnectionResetError, a ConnectionResetError. That is how a stream ends, not an error.
                return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def prometheus(request: web.Request) -> web.Response:
        body = await off_loop(metrics.gather, metrics.text)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def stop(app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.on_cleanup.append(stop)
    app.router.add_get("/", index)
    app.router.add_get("/machines/{mac}", machine_page)
    app.router.add_get("/api/machines", machines)
    app.router.add_get("/api/machines/{mac}", machine)
    app.router.add_put("/api/machines/{mac}", put)
    app.router.add_delete("/api/machines/{mac}", delete)
    app.router.add_post("/api/machines/{mac}/wake", wake)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/events/stream", stream)
    app.router.add_get("/metrics", prometheus)
    return app


def _is_page(path: str) -> bool:
    """Whether `path` is one of the listener's HTML pages, which a browser opens with ?token= once."""
    return path == "/" or path.startswith("/machines/")


_TOKEN_HINT = "open /?token=TOKEN once in a browser (it sets a cookie), or send Authorization: Bearer TOKEN"


def _unauthorized(request: web.Request) -> web.HTTPUnauthorized:
    """A 401 that says how to give the token: as a page for a browser, as one line for anything else."""
    headers = {"WWW-Authenticate": 'Bearer realm="netboot"', "Cache-Control": "no-store"}
    if "text/html" in request.headers.get("Accept", ""):
        body = ("<!doctype html><title>netboot: token required</title><h1>A token is required</h1><p>Open "
                "<code>/?token=TOKEN</code> (or this page with <code>?token=TOKEN</code>) once: it sets a cookie "
                "that the pages and their requests go by from then on. Or send "
                "<code>Authorization: Bearer TOKEN</code>. The token is netboot serve's --status-token or the "
                "contents of its --status-token-file.</p>\n")
        return web.HTTPUnauthorized(text=body, content_type="text/html", headers=headers)
    return web.HTTPUnauthorized(text=f"a token is required: {_TOKEN_HINT}\n", headers=headers)


def _mac(request: web.Request) -> str:
    try:
        return macs.normalize(request.match_info["mac"])
    except macs.BadMac as e:
        raise web.HTTPBadRequest(text=f"{e}\n") from None


def _refused(e: Refused) -> web.Response:
    return web.Response(status=e.status, text=f"{e}\n", headers={"Cache-Control": "no-store"})


def _sse(event: Any) -> bytes:
    return f"id: {event.seq}\ndata: {json.dumps(event.json())}\n\n".encode()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ago(now: float) -> Callable[[str | None], str]:
    """A time of the record (record.iso's spelling) as the page shows it: how long before `now` ("12 s ago")."""

    def ago(when: str | None) -> str:
        if not when:
            return ""
        seconds = now - (calendar.timegm(time.strptime(when[:19], "%Y-%m-%dT%H:%M:%S")) + int(when[20:23]) / 1000)
        for unit, scale in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
            if seconds >= scale:
                return f"{int(seconds // scale)} {unit} ago"
        return "now"

    return ago


def _took(seconds: float | None) -> str:
    """A boot's duration as the page shows it: "8.4 s", "1 min 12 s"."""
    if seconds is None:
        return ""
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)  # (59.96 s is "1 min 0 s", neither "60.0 s" nor "0 min 59 s")
    return f"{whole // 60} min {whole % 60} s"
