"""What every machine asked for and got: boot events, each machine's state, and the counters behind /metrics.

`netboot serve` reports each finished request or transfer, HTTP and TFTP alike, as one `Served`; `BootRecord`
turns it into a numbered `BootEvent`, moves the machine it was for through its states, and keeps counts.
Everything is bounded: a few events per machine, a ring of recent events, and at most `max_machines` machines
seen without being configured (the least recently active is forgotten first), so a flood of made-up MACs
cannot grow the process.

A machine's states:
    configured     in the machines file, not seen since netboot started
    booting        it fetched its script (a new boot), or a file
    handed-over    its initrd was sent whole: the kernel has everything it needs from us
    failed         a transfer was aborted or timed out, or it was answered with an error
    unknown-mac    it asked for its script and no profile matched
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

CONFIGURED, BOOTING, HANDED_OVER, FAILED, UNKNOWN_MAC = "configured", "booting", "handed-over", "failed", "unknown-mac"
STATES = (CONFIGURED, BOOTING, HANDED_OVER, FAILED, UNKNOWN_MAC)


@dataclass(frozen=True)
class Served:
    """One finished request (HTTP) or transfer (TFTP), as the servers report it."""

    client: str
    protocol: str  # "http" or "tftp"
    path: str
    status: str  # the HTTP status code, or the TFTP outcome ("complete", "timed out", "ERROR 1", ...)
    ok: bool
    bytes: int  # payload bytes sent
    mac: str | None = None
    profile: str | None = None
    retransmissions: int = 0


@dataclass(frozen=True)
class BootEvent:
    seq: int
    time: float  # seconds since the epoch
    client: str
    protocol: str
    path: str
    status: str
    ok: bool
    bytes: int
    mac: str | None
    profile: str | None
    build: str | None
    retransmissions: int

    def json(self) -> dict[str, Any]:
        out = asdict(self)
        out["time"] = iso(self.time)
        return out


@dataclass
class Machine:
    mac: str
    profile: str | None = None
    configured: bool = False
    state: str = CONFIGURED
    build: str | None = None
    system: str | None = None
    client: str | None = None
    last: BootEvent | None = None
    bytes: int = 0  # sent in the current boot
    first_request: float | None = None  # of the current boot
    last_request: float | None = None
    events: collections.deque[BootEvent] = field(default_factory=collections.deque)

    def json(self) -> dict[str, Any]:
        last = self.last
        return {
            "mac": self.mac, "state": self.state, "profile": self.profile, "configured": self.configured,
            "build": self.build, "system": self.system, "client": self.client,
            "last": None if last is None else {"path": last.path, "protocol": last.protocol, "status": last.status,
                                               "ok": last.ok, "bytes": last.bytes},
            "bytes": self.bytes,
            "first_request": iso(self.first_request), "last_request": iso(self.last_request),
            "events": [e.json() for e in reversed(self.events)],
        }


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _kind(path: str) -> str:
    return path.rsplit("/", 1)[-1]


Builds = Callable[[str], tuple[str, str] | None]  # profile -> (build id, system) of what it serves now


class BootRecord:
    def __init__(self, builds: Builds | None = None, *, max_machines: int = 10_000, per_machine: int = 20,
                 recent: int = 1_000) -> None:
        self.builds: Builds = builds or (lambda profile: None)
        self.max_machines = max_machines
        self.per_machine = per_machine
        self.machines: dict[str, Machine] = {}
        self.recent: collections.deque[BootEvent] = collections.deque(maxlen=recent)
        self._seq = 0
        self._unconfigured: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recent first
        self._subscribers: set[asyncio.Queue[BootEvent | None]] = set()
        # Counters for /metrics, read at scrape time.
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()  # (protocol, status)
        self.sent: collections.Counter[tuple[str, str]] = collections.Counter()
        self.boots_started: collections.Counter[str] = collections.Counter()  # profile
        self.handed_over: collections.Counter[str] = collections.Counter()
        self.tftp_retransmissions = 0
        self.tftp_timeouts = 0
        self.reloads = 0
        self.reload_failures = 0
        self.http_in_flight = 0

    def configure(self, machines: dict[str, str]) -> None:
        """The machines file's MACs and profiles (at start and after each reload)."""
        for mac, machine in list(self.machines.items()):
            if machine.configured and mac not in machines:
                if machine.state == CONFIGURED:
                    del self.machines[mac]  # never seen: nothing to tell about it any more
                else:
                    machine.configured = False
                    self._unconfigured[mac] = None
        for mac, profile in machines.items():
            machine = self.machines.get(mac)
            if machine is None:
                self.machines[mac] = Machine(mac, profile, configured=True)
            else:
                self._unconfigured.pop(mac, None)
                machine.configured = True
                machine.profile = profile
        self._bound()

    def record(self, served: Served) -> BootEvent:
        now = time.time()
        found = self.builds(served.profile) if served.profile is not None else None
        build = found[0] if found is not None else None
        self._seq += 1
        event = BootEvent(self._seq, now, served.client, served.protocol, served.path, served.status, served.ok,
                          served.bytes, served.mac, served.profile, build, served.retransmissions)
        self.recent.append(event)
        self._count(served)
        if served.mac is not None:
            self._machine_event(event, served, found)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a reader that does not keep up is dropped (it reconnects with ?since=)
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)
        return event

    def _count(self, served: Served) -> None:
        key = (served.protocol, served.status)
        self.requests[key] += 1
        self.sent[key] += served.bytes
        if served.protocol == "tftp":
            self.tftp_retransmissions += served.retransmissions
            if served.status == "timed out":
                self.tftp_timeouts += 1

    def _machine_event(self, event: BootEvent, served: Served, build: tuple[str, str] | None) -> None:
        mac = event.mac
        assert mac is not None
        machine = self.machines.get(mac)
        if machine is None:
            machine = self.machines[mac] = Machine(mac)
        if not machine.configured:
            self._unconfigured[mac] = None
            self._unconfigured.move_to_end(mac)
        kind = _kind(served.path)
        new_boot = served.ok and (kind == "boot.ipxe" or (
            kind == "bzImage" and machine.state in (HANDED_OVER, FAILED, CONFIGURED, UNKNOWN_MAC)))
        if new_boot or machine.first_request is None:
            machine.first_request = event.time
            machine.bytes = 0
        if served.profile is None and kind == "boot.ipxe":
            machine.state = UNKNOWN_MAC
        elif not served.ok:
            machine.state = FAILED
        elif kind == "initrd" and served.status in ("200", "complete"):
            machine.state = HANDED_OVER
            self.handed_over[served.profile or "-"] += 1
        elif served.status != "size probe":
            machine.state = BOOTING
        if new_boot and served.profile is not None:
            self.boots_started[served.profile] += 1
        machine.profile = served.profile or machine.profile
        if build is not None:
            machine.build, machine.system = build
        machine.client = served.client
        machine.last = event
        machine.bytes += served.bytes
        machine.last_request = event.time
        machine.events.append(event)
        if len(machine.events) > self.per_machine:
            machine.events.popleft()
        self._bound()

    def _bound(self) -> None:
        """Forget the least recently active machines seen but not configured, beyond `max_machines`."""
        while len(self._unconfigured) > self.max_machines:
            mac, _ = self._unconfigured.popitem(last=False)
            del self.machines[mac]

    def events_since(self, since: int = 0) -> list[BootEvent]:
        """The recent events after sequence number `since`, newest first."""
        return [e for e in reversed(self.recent) if e.seq > since]

    def states(self) -> collections.Counter[str]:
        return collections.Counter(m.state for m in self.machines.values())

    @contextlib.contextmanager
    def subscription(self, size: int = 1000) -> Iterator[asyncio.Queue[BootEvent | None]]:
        """A queue of every new event (None: this reader fell behind and was dropped)."""
        queue: asyncio.Queue[BootEvent | None] = asyncio.Queue(size)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """Ends every live stream."""
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
