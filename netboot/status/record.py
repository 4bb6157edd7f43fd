"""What every machine asked for and got: boot events, each machine's state, and the counters behind /metrics.

`netboot serve` reports each finished request or transfer, HTTP and TFTP alike, with `BootRecord.record()`;
the record turns it into a numbered `BootEvent`, adds it to the machine it was for, and keeps counts. Recording
is on every request's path, so it does the least it can: reports are applied in batches (`flush()`, which every
reader calls first), and a machine's state, current boot and bytes are worked out from its last events when shown.
Everything is bounded: a few events per machine, a ring of recent events, and at most `max_machines` machines
seen without being configured (the least recently active first, near enough), so a flood of made-up MACs
cannot grow the process.

A machine's states:
    configured     in the machines file, not seen since netboot started
    booting        it fetched its script (which starts a new boot) or a file
    handed-over    its initrd was sent whole (and then its overlay, if it has one): the kernel has all it needs
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


class BootEvent(NamedTuple):
    """An event as readers see it. The record keeps each as a plain tuple of these fields: one is made for
    every request, and a plain tuple of plain values costs a fraction of an object to build, and the garbage
    collector stops looking at it after its first pass (it never does for a tuple subclass like this one).
    """

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
    """The initrd sent whole: the kernel has everything it needs from us (but a machine's overlay, which is
    small and comes last)."""
    return event.ok and event.path.endswith("/initrd") and event.status in ("200", "complete")


def is_overlay(event: BootEvent) -> bool:
    return event.path.endswith("/overlay")


@dataclass(slots=True)
class Machine:
    """A machine as readers see it: its last few events, and everything else worked out from them when it is
    shown (the record keeps only the events, so that recording one is an append)."""

    mac: str
    events: list[tuple[Any, ...]]  # the last few, oldest first, each a BootEvent's fields
    profile: str | None = None  # the machines file's, until it is seen
    configured: bool = False

    def history(self) -> list[BootEvent]:
        """Its last few events, oldest first."""
        return list(map(BootEvent._make, self.events))

    def boot(self) -> list[BootEvent]:
        """The events of its current boot: from its last script fetched (a boot starts there), or all."""
        events = self.history()
        for i in range(len(events) - 1, -1, -1):
            e = events[i]
            if e.ok and is_script(e):
                return events[i:]
        return events

    @property
    def state(self) -> str:
        for e in reversed(self.history()):
            if e.status == "size probe":
                continue  # EDK2 asking a file's size first: not a step of the boot
            if e.profile is None and is_script(e):
                return UNKNOWN_MAC
            if not e.ok:
                return FAILED
            if hands_over(e) or is_overlay(e):
                return HANDED_OVER
            return BOOTING
        return CONFIGURED

    @property
    def current_profile(self) -> str | None:
        """The profile it booted last, or the machines file's."""
        return next((e.profile for e in reversed(self.history()) if e.profile), self.profile)

    def json(self, systems: dict[str, str]) -> dict[str, Any]:
        events = self.history()
        last = events[-1] if events else None
        boot = self.boot()
        return {
            "mac": self.mac, "state": self.state, "profile": self.current_profile, "configured": self.configured,
            "build": last.build if last else None, "system": systems.get(last.build or "") if last else None,
            "client": last.client if last else None,
            "last": None if last is None else {"path": last.path, "protocol": last.protocol, "status": last.status,
                                               "ok": last.ok, "bytes": last.bytes},
            "bytes": sum(e.bytes for e in boot),
            "first_request": iso(boot[0].time) if boot else None, "last_request": iso(last.time) if last else None,
            "events": [e.json() for e in reversed(events)],
        }


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


_BATCH = 512  # noted requests applied at once, at most
_UNKNOWN = object()
_now = time.time

Builds = Callable[[str], tuple[str, str] | None]  # profile -> (build id, system) of what it serves now


class BootRecord:
    def __init__(self, builds: Builds | None = None, *, max_machines: int = 10_000, per_machine: int = 20,
                 recent: int = 1_000) -> None:
        self.builds: Builds = builds or (lambda profile: None)
        self.max_machines = max_machines
        self.per_machine = per_machine
        # Each machine seen: its last events (BootEvents' fields), or its only one.
        self._events: dict[str, list[tuple[Any, ...]] | tuple[Any, ...]] = {}
        self._configured: dict[str, str] = {}  # the machines file's MACs and profiles
        self._recent: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=recent)  # BootEvents' fields
        self._seq = 0
        # Machines seen but not configured, in the order they joined the queue, with the seq they joined at.
        self._unconfigured: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._subscribers: set[asyncio.Queue[BootEvent | None]] = set()
        self._pending: list[tuple[Any, ...]] = []  # (time, what record() was given)
        self.systems: dict[str, str] = {}  # build id -> system, for the builds events name
        self._flush_scheduled = False
        # Counters for /metrics, read at scrape time. (Plain dicts: adding to a Counter costs twice as much.)
        self._counts: dict[str, dict[str, list[int]]] = {}  # protocol -> status -> [requests, bytes sent]
        self._per_profile: dict[str, list[int]] = {}  # profile -> [boots started, handed over]
        self.tftp_retransmissions = 0
        self.reloads = 0
        self.reload_failures = 0
        self.http_in_flight = 0

    def configure(self, machines: dict[str, str]) -> None:
        """The machines file's MACs and profiles (at start and after each reload)."""
        for mac in self._configured:
            if mac not in machines and mac in self._events:
                self._unconfigured[mac] = self._seq  # seen: still shown, until it is the least recent
        for mac in machines:
            self._unconfigured.pop(mac, None)
        self._configured = dict(machines)
        self._bound()

    @property
    def machines(self) -> dict[str, Machine]:
        """Every machine seen or configured, by MAC (made when read: the record keeps only their events)."""
        configured = self._configured
        found = {mac: Machine(mac, events if type(events) is list else [events], configured.get(mac),
                              mac in configured)
                 for mac, events in self._events.items()}
        for mac, profile in configured.items():
            if mac not in found:
                found[mac] = Machine(mac, [], profile, configured=True)
        return found

    def record(self, client: str, protocol: str, path: str, status: str, ok: bool, nbytes: int, mac: str | None,
               profile: str | None, retransmissions: int = 0) -> None:
        """Note a finished request (HTTP) or transfer (TFTP): `status` is the HTTP status code or the TFTP outcome
        ("complete", "timed out", "ERROR 1", ...), `nbytes` the payload bytes sent. This is on every request's
        path, so it only appends a tuple; `flush()` does the work a batch at a time, with the record's data warm
        in the cache."""
        pending = self._pending
        pending.append((_now(), client, protocol, path, status, ok, nbytes, mac, profile, retransmissions))
        if len(pending) >= _BATCH:
            self.flush()
        elif self._subscribers and not self._flush_scheduled:
            self._flush_scheduled = True  # live readers get each event within a tenth of a second
            asyncio.get_running_loop().call_later(0.1, self.flush)

    def flush(self) -> None:
        """Apply the noted requests; every reader calls this first."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        builds: dict[str, str | None] = {}  # profile -> its build id, asked once a batch
        counts, per_mac, configured, per_profile = self._counts, self._events, self._configured, self._per_profile
        unconfigured, per_machine, max_machines = self._unconfigured, self.per_machine, self.max_machines
        seq = self._seq
        batch = []
        # What the last event counted in: most requests of a batch are alike, and their strings the same objects.
        last_protocol = last_status = last_profile = None
        count = [0, 0]
        build = profiled = None
        # One loop with everything written out in it: this runs for every request served.
        for now, client, protocol, path, status, ok, nbytes, mac, profile, retransmissions in pending:
            if profile is not last_profile:
                last_profile = profile
                if profile is None:
                    build = profiled = None
                else:
                    build = builds[profile] if profile in builds else builds.setdefault(profile,
                                                                                       self._build_of(profile))
                    profiled = per_profile.get(profile)
                    if profiled is None:
                        profiled = per_profile[profile] = [0, 0]
            seq += 1
            event = (seq, now, client, protocol, path, status, ok, nbytes, mac, profile, build,
                     retransmissions)  # a BootEvent's fields
            batch.append(event)
            if status is not last_status or protocol is not last_protocol:
                last_status, last_protocol = status, protocol
                by_status = counts.get(protocol)
                if by_status is None:
                    by_status = counts[protocol] = {}
                count = by_status.get(status)
                if count is None:
                    count = by_status[status] = [0, 0]
            count[0] += 1
            count[1] += nbytes
            if retransmissions:
                self.tftp_retransmissions += retransmissions
            if ok and profiled is not None:
                # is_script(event) and hands_over(event), written out (a slice is cheaper than endswith()).
                if path[-10:] == "/boot.ipxe":
                    profiled[0] += 1
                elif path[-7:] == "/initrd" and status in ("200", "complete"):
                    profiled[1] += 1
            if mac is None:
                continue
            held = per_mac.get(mac)
            if held is None:
                # A machine's first event is kept as it is: a flood of made-up MACs then leaves only plain
                # tuples behind, which the garbage collector soon stops looking at (it never does at a list).
                per_mac[mac] = event
                if mac not in configured:
                    unconfigured[mac] = seq
                    if len(unconfigured) > max_machines:
                        self._forget_one(seq)
            elif type(held) is tuple:
                per_mac[mac] = [held, event]
            else:
                held.append(event)
                if len(held) > per_machine:
                    del held[0]
        self._seq = seq
        self._recent.extend(batch)
        if self._subscribers:
            for event in batch:
                self._publish(BootEvent._make(event))

    def _build_of(self, profile: str) -> str | None:
        """The build id `profile` serves now (noting its system, for the machines' entries)."""
        found = self.builds(profile)
        if found is None:
            return None
        self.systems.setdefault(found[0], found[1])
        return found[0]

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """Requests and transfers that ended, by (protocol, status)."""
        return {(p, s): c[0] for p, by_status in self._counts.items() for s, c in by_status.items()}

    @property
    def sent(self) -> dict[tuple[str, str], int]:
        """Payload bytes sent, by (protocol, status)."""
        return {(p, s): c[1] for p, by_status in self._counts.items() for s, c in by_status.items()}

    @property
    def boots_started(self) -> dict[str, int]:
        """Boots started (a machine fetched its script), by profile."""
        return {profile: n[0] for profile, n in self._per_profile.items() if n[0]}

    @property
    def handed_over(self) -> dict[str, int]:
        """Boots whose initrd was sent whole, by profile."""
        return {profile: n[1] for profile, n in self._per_profile.items() if n[1]}

    @property
    def tftp_timeouts(self) -> int:
        return self.requests.get(("tftp", "timed out"), 0)

    def _publish(self, event: BootEvent) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a reader that does not keep up is dropped (it reconnects with ?since=)
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    def _bound(self) -> None:
        """Forget the least recently active machines seen but not configured, beyond `max_machines`."""
        while len(self._unconfigured) > self.max_machines:
            self._forget_one(self._seq)

    def _forget_one(self, seq: int) -> None:
        """Forget the machine seen but not configured that was least recently active, as a CLOCK does it:
        machines queue in the order they joined; the first is forgotten unless it was active since it joined,
        in which case it joins again at the back. Nothing to do on each request, and it forgets what a strict
        least-recently-used order would, but for machines that last asked between two turns of the queue."""
        unconfigured, per_mac = self._unconfigured, self._events
        while True:
            mac, joined = unconfigured.popitem(last=False)
            held = per_mac[mac]
            last = held[0] if type(held) is tuple else held[-1][0]  # its last event's seq
            if last <= joined:
                del per_mac[mac]
                return
            unconfigured[mac] = seq

    def events_since(self, since: int = 0) -> list[BootEvent]:
        """The recent events after sequence number `since`, newest first."""
        found = []
        for e in reversed(self._recent):
            if e[0] <= since:  # its seq
                break
            found.append(BootEvent._make(e))
        return found

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest event (0: none yet)."""
        return self._seq

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
