"""What every machine asked for and got: boot events, each machine's state, and the counters behind /metrics.

`netboot serve` reports each finished request or transfer, HTTP and TFTP alike, as one `Served`; `BootRecord`
turns it into a numbered `BootEvent`, adds it to the machine it was for, and keeps counts. Recording is on every
request's path, so it does the least it can: reports are applied in batches (`flush()`, which every reader
calls first), and a machine's state, current boot and bytes are worked out from its last events when shown.
Everything is bounded: a few events per machine, a ring of recent events, and at most `max_machines` machines
seen without being configured (the least recently active is forgotten first), so a flood of made-up MACs
cannot grow the process.

A machine's states:
    configured     in the machines file, not seen since netboot started
    booting        it fetched its script (which starts a new boot) or a file
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
from dataclasses import dataclass
from typing import Any, NamedTuple

CONFIGURED, BOOTING, HANDED_OVER, FAILED, UNKNOWN_MAC = "configured", "booting", "handed-over", "failed", "unknown-mac"
STATES = (CONFIGURED, BOOTING, HANDED_OVER, FAILED, UNKNOWN_MAC)


class Served(NamedTuple):
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


# Events and reports are tuples, not dataclasses: one is made for every request, and a tuple of plain values
# costs a fraction of a frozen dataclass to build and is left alone by the garbage collector.
class BootEvent(NamedTuple):
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
        out = self._asdict()
        out["time"] = iso(self.time)
        return out


def is_script(event: BootEvent) -> bool:
    """A machine's script: fetching it starts a boot."""
    return event.path.endswith("/boot.ipxe")


def hands_over(event: BootEvent) -> bool:
    """The initrd sent whole: the kernel has everything it needs from us."""
    return event.ok and event.path.endswith("/initrd") and event.status in ("200", "complete")


@dataclass(slots=True)
class Machine:
    """A machine's last few events; everything else about it is worked out from them when it is shown, so
    that recording an event is an append."""

    mac: str
    events: list[BootEvent]  # the last few, oldest first
    profile: str | None = None  # the machines file's, until it is seen
    configured: bool = False

    def boot(self) -> list[BootEvent]:
        """The events of its current boot: from its last script fetched (a boot starts there), or all."""
        events = self.events
        for i in range(len(events) - 1, -1, -1):
            e = events[i]
            if e.ok and is_script(e):
                return events[i:]
        return events

    @property
    def state(self) -> str:
        for e in reversed(self.events):
            if e.status == "size probe":
                continue  # EDK2 asking a file's size first: not a step of the boot
            if e.profile is None and is_script(e):
                return UNKNOWN_MAC
            if not e.ok:
                return FAILED
            if hands_over(e):
                return HANDED_OVER
            return BOOTING
        return CONFIGURED

    @property
    def current_profile(self) -> str | None:
        """The profile it booted last, or the machines file's."""
        return next((e.profile for e in reversed(self.events) if e.profile), self.profile)

    def json(self, systems: dict[str, str]) -> dict[str, Any]:
        last = self.events[-1] if self.events else None
        boot = self.boot()
        return {
            "mac": self.mac, "state": self.state, "profile": self.current_profile, "configured": self.configured,
            "build": last.build if last else None, "system": systems.get(last.build or "") if last else None,
            "client": last.client if last else None,
            "last": None if last is None else {"path": last.path, "protocol": last.protocol, "status": last.status,
                                               "ok": last.ok, "bytes": last.bytes},
            "bytes": sum(e.bytes for e in boot),
            "first_request": iso(boot[0].time) if boot else None, "last_request": iso(last.time) if last else None,
            "events": [e.json() for e in reversed(self.events)],
        }


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


_BATCH = 512  # noted requests applied at once, at most

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
        self._pending: list[tuple[float, Served]] = []
        self.systems: dict[str, str] = {}  # build id -> system, for the builds events name
        self._flush_scheduled = False
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
                self.machines[mac] = Machine(mac, [], profile, configured=True)
            else:
                self._unconfigured.pop(mac, None)
                machine.configured = True
                machine.profile = profile
        self._bound()

    def record(self, served: Served) -> None:
        """Note a finished request. The work happens in `flush()`, a batch at a time: the request path only
        appends, and the batch runs with the record's data warm in the cache."""
        self._pending.append((time.time(), served))
        if len(self._pending) >= _BATCH:
            self.flush()
        elif self._subscribers and not self._flush_scheduled:
            self._flush_scheduled = True  # live readers get each event within a tenth of a second
            asyncio.get_running_loop().call_later(0.1, self.flush)

    def flush(self) -> None:
        """Apply the noted requests; every reader calls this first."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        builds: dict[str, tuple[str, str] | None] = {}
        requests, sent, recent, make = self.requests, self.sent, self.recent.append, tuple.__new__
        systems = self.systems
        seq = self._seq
        for now, served in pending:
            client, protocol, path, status, ok, nbytes, mac, profile, retransmissions = served
            found = None
            if profile is not None:
                found = builds[profile] if profile in builds else builds.setdefault(profile, self.builds(profile))
            seq += 1
            # tuple.__new__: what BootEvent(...) does, without its Python-level __new__.
            event = make(BootEvent, (seq, now, client, protocol, path, status, ok, nbytes, mac, profile,
                                     found[0] if found is not None else None, retransmissions))
            recent(event)
            key = (protocol, status)
            requests[key] += 1
            sent[key] += nbytes
            if protocol == "tftp":
                self.tftp_retransmissions += retransmissions
                if status == "timed out":
                    self.tftp_timeouts += 1
            if found is not None and found[0] not in systems:
                systems[found[0]] = found[1]
            if mac is not None:
                self._machine_event(event)
            if self._subscribers:
                self._publish(event)
        self._seq = seq

    def _publish(self, event: BootEvent) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a reader that does not keep up is dropped (it reconnects with ?since=)
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    def _machine_event(self, event: BootEvent) -> None:
        mac = event.mac
        machine = self.machines.get(mac)  # type: ignore[arg-type]
        if machine is None:
            machine = self.machines[mac] = Machine(mac, [])  # type: ignore[index,arg-type]
        if not machine.configured:
            unconfigured = self._unconfigured
            unconfigured[mac] = None  # type: ignore[index]
            unconfigured.move_to_end(mac)  # type: ignore[arg-type]
            if len(unconfigured) > self.max_machines:
                self._bound()
        events = machine.events
        events.append(event)
        if len(events) > self.per_machine:
            del events[0]
        if event.profile is not None:
            if event.ok and is_script(event):
                self.boots_started[event.profile] += 1
            elif hands_over(event):
                self.handed_over[event.profile] += 1

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
        self.flush()
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._subscribers.clear()
