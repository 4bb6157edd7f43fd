"""What every machine asked for and got: boot events, each machine's state, and the counters behind /metrics.

`netboot serve` reports each finished request or transfer, HTTP and TFTP alike, with `BootRecord.record()`;
the record turns it into a numbered `BootEvent`, adds it to the machine it was for, and keeps counts. Recording
is on every request's path, so it does the least it can: reports are applied in batches (`flush()`, which every
reader calls first), and a machine's state, current boot and bytes are worked out from its last events when shown.
Everything is bounded: a few events per machine, a ring of recent events, and at most `max_machines` machines
seen without being configured (the least recently active first, near enough), so a flood of made-up MACs
cannot grow the process. What a machine says of itself (its facts: SMBIOS UUID, serial, ...; what DHCP saw) is
kept with it, each value cut short, and goes when it goes; facts of machines DHCP answered that never asked
for a file are kept for the last `MAX_LOOSE` of them.

A machine's states:
    configured     in the machines file, not seen since netboot started
    booting        it fetched its script (which starts a new boot) or a file, and has not yet all it needs
    handed-over    its initrd was sent whole and then, when its profile has an overlay, its overlay: the kernel
                   has all it needs; a build made with --fetch stays so while stage 1 downloads its image (a
                   step of its own)
    failed         a transfer was aborted or timed out, or it was answered with an error
    unknown-mac    it asked for its script and no profile matched
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Container, Iterable, Iterator
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
    server: str  # the server that served it (netboot serve --name)

    def json(self) -> dict[str, Any]:
        out = self._asdict()
        out["time"] = iso(self.time)
        return out

    @property
    def handing_over(self) -> bool:
        """This event hands the machine over: its initrd sent whole, or its overlay after it."""
        return initrd_sent(self.ok, self.path, self.status) or (self.ok and overlay_path(self.path))


# The predicates on an event's fields, which `flush()` applies to every request as it comes (a slice is cheaper
# than endswith()), and readers to the events they are shown.
def script_path(path: str) -> bool:
    """A machine's script (or its GRUB configuration): fetching it starts a boot."""
    return path[-10:] == "/boot.ipxe" or path[-9:] == "/grub.cfg"


def initrd_sent(ok: bool, path: str, status: str) -> bool:
    """The initrd (or the unified kernel image that holds it) sent whole: the kernel has everything it needs from
    us (but a machine's overlay, which is small and comes last)."""
    return ok and (path[-7:] == "/initrd" or path[-12:] == "/netboot.efi") and status in _COMPLETE


def overlay_path(path: str) -> bool:
    return path[-8:] == "/overlay"


def image_path(path: str) -> bool:
    """The image of a --fetch build, which stage 1 downloads after the kernel started (whole or in ranges)."""
    return path[-6:] == "/image"


_PATH, _STATUS, _OK, _PROFILE = (BootEvent._fields.index(f) for f in ("path", "status", "ok", "profile"))


# A machine's state and profile, read from its events' fields in place: a page filters every machine of the record
# by them, and making 200,000 BootEvents (or 10,000 Machines) for that took most of a page's time, and the
# garbage collections of those objects held up the event loop.
def state_of(events: tuple[tuple[Any, ...], ...], overlaid: Container[str] = ()) -> str:
    """A machine's state (see the module's docstring) from its events; `overlaid`: the profiles with an overlay,
    whose machines are handed over by their overlay, which their script loads after the initrd."""
    for e in reversed(events):
        status, path = e[_STATUS], e[_PATH]
        if status == "size probe":
            continue  # EDK2 asking a file's size first: not a step of the boot
        if e[_PROFILE] is None and script_path(path):
            return UNKNOWN_MAC
        if not e[_OK]:
            return FAILED
        if overlay_path(path) or image_path(path):
            return HANDED_OVER
        if initrd_sent(True, path, status):
            return BOOTING if e[_PROFILE] in overlaid else HANDED_OVER
        return BOOTING
    return CONFIGURED


def profile_of(events: tuple[tuple[Any, ...], ...], configured: str | None) -> str | None:
    """The profile a machine booted last, or the machines file's."""
    return next((e[_PROFILE] for e in reversed(events) if e[_PROFILE]), configured)


@dataclass(slots=True)
class Machine:
    """A machine as readers see it: its last few events, and everything else worked out from them when it is
    shown (the record keeps only the events, so that recording one is an append)."""

    mac: str
    events: tuple[tuple[Any, ...], ...]  # the last few, oldest first, each a BootEvent's fields
    profile: str | None = None  # the machines file's, until it is seen
    configured: bool = False
    facts: tuple[tuple[str, str], ...] = ()  # what it said of itself, and what DHCP saw (FACTS)
    source: str | None = None  # where its table is: "file" (the machines file), "database" (the site's), or none
    overlaid: Container[str] = ()  # the profiles with an overlay (state_of)

    def history(self) -> list[BootEvent]:
        """Its last few events, oldest first."""
        return list(map(BootEvent._make, self.events))

    def boot(self) -> list[BootEvent]:
        """The events of its current boot: from its last script fetched (a boot starts there), or all."""
        events = self.history()
        for i in range(len(events) - 1, -1, -1):
            e = events[i]
            if e.ok and script_path(e.path):
                return events[i:]
        return events

    @property
    def state(self) -> str:
        return state_of(self.events, self.overlaid)

    @property
    def current_profile(self) -> str | None:
        """The profile it booted last, or the machines file's."""
        return profile_of(self.events, self.profile)

    def handed_over(self, boot: list[BootEvent] | None = None) -> float | None:
        """When its current boot was handed over (its last file sent), or None if it has not been."""
        if self.state != HANDED_OVER:
            return None
        return next((e.time for e in reversed(boot or self.boot()) if e.handing_over), None)

    def json(self, systems: dict[str, str]) -> dict[str, Any]:
        events = self.history()
        last = events[-1] if events else None
        boot = self.boot()
        handed = self.handed_over(boot)
        return {
            "mac": self.mac, "state": self.state, "profile": self.current_profile, "configured": self.configured,
            "source": self.source,
            "build": last.build if last else None, "system": systems.get(last.build or "") if last else None,
            "client": last.client if last else None,
            "last": None if last is None else {"path": last.path, "protocol": last.protocol, "status": last.status,
                                               "ok": last.ok, "bytes": last.bytes},
            "bytes": sum(e.bytes for e in boot),
            "first_request": iso(boot[0].time) if boot else None, "last_request": iso(last.time) if last else None,
            "handed_over": iso(handed),
            # First request to handed over: how long the server took to boot it (None while it boots).
            "boot_seconds": round(handed - boot[0].time, 3) if handed is not None else None,
            "facts": dict(self.facts),
            "events": [e.json() for e in reversed(events)],
        }


def _facts_size(facts: tuple[tuple[str, str], ...]) -> int:
    return _FACTS_BYTES + sum(len(value) for _, value in facts) if facts else 0


def clip_path(path: str) -> str:
    """`path` cut to MAX_PATH bytes (of its UTF-8, surrogate escapes kept as the bytes they stand for)."""
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_PATH:
        return path
    return raw[:MAX_PATH].decode("utf-8", "ignore")


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# A machine's facts: what iPXE says of it in its script's name (server/namespace.py, FACT_KEYS), and what netboot's
# DHCP server saw when it answered it: its architecture (option 93) and the interface it came in on.
FACTS = ("uuid", "serial", "manufacturer", "product", "buildarch", "platform", "dhcp_arch", "interface")
MAX_FACT = 64  # characters of a fact kept: SMBIOS strings are short, and the rest is a client's to make up
_FACTS_BYTES = 200  # what a machine's facts cost, besides their characters (a tuple of pairs, their strings)
MAX_LOOSE = 1_000  # machines whose facts are kept before they ask for a file (DHCP answered them)
CHART_MINUTES = 60  # boots started and handed over are counted per minute, for this many minutes
_BATCH = 512  # noted requests applied at once, at most
_COMPLETE = ("200", "complete")
MAX_PATH = 256  # bytes of a request's path kept: the rest is a client's to make up
# What one stored event costs, besides its path: the tuple of its twelve fields and their objects, measured with
# sys.getsizeof and tracemalloc (shared strings, such as a protocol or a profile, counted once per batch).
_EVENT_BYTES = 350
_UNKNOWN = object()
_now = time.time

Builds = Callable[[str], tuple[str, str] | None]  # profile -> (build id, system) of what it serves now
# What a server tells the others of its requests (a site's servers share their record: netboot.state.boot_log):
# (time, client, protocol, path, status, ok, bytes, mac, profile, build, retransmissions, facts, server); a row
# whose protocol is "" carries only facts that DHCP noted.
Row = tuple[float, str, str, str, str, bool, int, str | None, str | None, str | None, int, tuple[tuple[str, str], ...],
            str]


class BootRecord:
    def __init__(self, builds: Builds | None = None, *, server: str = "", max_machines: int = 10_000,
                 per_machine: int = 20, recent: int = 1_000, max_bytes: int = 96 << 20) -> None:
        self.builds: Builds = builds or (lambda profile: None)
        self.server = server  # this server's name, on its events
        # Told of this server's requests and facts as rows, a batch at a time (a site's shared record), if set.
        self.sink: Callable[[list[Row]], None] | None = None
        self.max_machines = max_machines
        self.per_machine = per_machine
        # The machines' events, in bytes (near enough: `_EVENT_BYTES` each, plus its path): beyond `max_bytes`,
        # machines seen but not configured are forgotten as beyond `max_machines`.
        self.max_bytes = max_bytes
        self.bytes = 0
        # Each machine seen: its last events (BootEvents' fields), oldest first. A tuple, replaced by a longer one
        # at each event: a snapshot is then a copy of this dict alone, and the garbage collector soon stops
        # looking at tuples of plain values (it never does at a list).
        self._events: dict[str, tuple[tuple[Any, ...], ...]] = {}
        self._configured: dict[str, str] = {}  # the machines file's MACs and profiles
        self._sources: dict[str, str] = {}  # where each configured machine's table is: "file" or "database"
        self._overlaid: frozenset[str] = frozenset()  # the machines file's profiles with an overlay
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
        self._snapshot: Snapshot | None = None
        self._snapshot_key: tuple[int, ...] = ()
        self._facts: dict[str, tuple[tuple[str, str], ...]] = {}  # by MAC: machines seen or configured, and loose
        self._loose: collections.OrderedDict[str, None] = collections.OrderedDict()  # facts with no machine yet
        self._facts_seq = 0  # changes of facts that no event counts (DHCP's), for snapshots
        # Boots started and handed over, per minute: [minute since the epoch, started, handed over], oldest first.
        self._minutes: collections.deque[list[int]] = collections.deque(maxlen=CHART_MINUTES + 1)

    def configure(self, machines: dict[str, str], *, database: Iterable[str] = (), overlaid: Iterable[str] = ()
                  ) -> None:
        """The machines file's MACs and profiles, and the profiles that have an overlay (at start and after each
        reload); `database`: the MACs whose tables are the site database's rather than the file's."""
        self._overlaid = frozenset(overlaid)
        for mac in self._configured:
            if mac not in machines and mac in self._events:
                self._unconfigured[mac] = self._seq  # seen: still shown, until it is the least recent
            elif mac not in machines and mac in self._facts:
                self._loosen(mac)
        for mac in machines:
            self._unconfigured.pop(mac, None)
            self._loose.pop(mac, None)
        self._configured = dict(machines)
        from_database = set(database)
        self._sources = {mac: "database" if mac in from_database else "file" for mac in machines}
        self._bound()

    def note_facts(self, mac: str, facts: Iterable[tuple[str, str]]) -> None:
        """What is known of a machine besides its requests (DHCP's facts: `dhcp_arch`, `interface`); kept with
        its other facts, and for machines that have not asked for a file yet, for the last MAX_LOOSE of them."""
        facts = tuple(facts)
        if self.sink is not None:
            self.sink([(_now(), "", "", "", "", True, 0, mac, None, None, 0, facts, self.server)])
        self._note_facts(mac, facts)

    def _note_facts(self, mac: str, facts: Iterable[tuple[str, str]]) -> None:
        self._store_facts(mac, facts)
        self._facts_seq += 1
        if mac not in self._events and mac not in self._configured:
            self._loosen(mac)

    def _loosen(self, mac: str) -> None:
        self._loose[mac] = None
        self._loose.move_to_end(mac)
        while len(self._loose) > MAX_LOOSE:
            self._drop_facts(self._loose.popitem(last=False)[0])

    def _store_facts(self, mac: str, facts: Iterable[tuple[str, str]]) -> None:
        """Merge `facts` into the machine's (each cut to MAX_FACT printable characters; unknown keys dropped)."""
        old = self._facts.get(mac, ())
        merged = dict(old)
        for key, value in facts:
            if key in FACTS:
                merged[key] = "".join(c if c.isprintable() else "?" for c in str(value)[:MAX_FACT])
        new = tuple((key, merged[key]) for key in FACTS if merged.get(key))
        if new != old:
            self.bytes += _facts_size(new) - _facts_size(old)
            self._facts[mac] = new

    def _drop_facts(self, mac: str) -> None:
        self.bytes -= _facts_size(self._facts.pop(mac, ()))

    def snapshot(self) -> Snapshot:
        """The record as it is now, for readers that work on it off the event loop. Taking one copies each
        machine's list of events (a few milliseconds for 10,000 machines); the same one serves every reader
        until something changes."""
        self.flush()
        key = (self._seq, id(self._configured), id(self._overlaid), self.reloads, self.reload_failures,
               self.http_in_flight, self._facts_seq)
        if self._snapshot is None or self._snapshot_key != key:
            self._snapshot, self._snapshot_key = Snapshot(self), key
        return self._snapshot

    @property
    def machines(self) -> dict[str, Machine]:
        """Every machine seen or configured, by MAC (made when read: the record keeps only their events)."""
        return self.snapshot().machines

    def states(self) -> collections.Counter[str]:
        return self.snapshot().states()

    def record(self, client: str, protocol: str, path: str, status: str, ok: bool, nbytes: int, mac: str | None,
               profile: str | None, retransmissions: int = 0, facts: tuple[tuple[str, str], ...] = ()) -> None:
        """Note a finished request (HTTP) or transfer (TFTP): `status` is the HTTP status code or the TFTP outcome
        ("complete", "timed out", "ERROR 1", ...), `nbytes` the payload bytes sent, `facts` what the machine said
        of itself in its script's name. This is on every request's path, so it only appends a tuple; `flush()`
        does the work a batch at a time, with the record's data warm in the cache."""
        if len(path) > MAX_PATH // 4:  # (a character is at most four bytes)
            path = clip_path(path)
        pending = self._pending
        pending.append((_now(), client, protocol, path, status, ok, nbytes, mac, profile, retransmissions, facts,
                        None, None))
        if len(pending) >= _BATCH:
            self.flush()
        elif (self._subscribers or self.sink) and not self._flush_scheduled:
            self._flush_scheduled = True  # live readers get each event within a tenth of a second
            asyncio.get_running_loop().call_later(0.1, self.flush)

    def learn(self, rows: Iterable[Row]) -> None:
        """Another server's requests and facts (its rows, as its sink had them), shown as this server's are."""
        pending = self._pending
        for now, client, protocol, path, status, ok, nbytes, mac, profile, build, retransmissions, facts, server \
                in rows:
            if not protocol:
                if mac:
                    self._note_facts(mac, facts)
                    self._facts_seq += 1
                continue
            if len(path) > MAX_PATH // 4:
                path = clip_path(path)
            pending.append((now, client, protocol, path, status, ok, nbytes, mac, profile, retransmissions, facts,
                            build, server))
        if len(pending) >= _BATCH or self._subscribers:
            self.flush()

    def flush(self) -> None:
        """Apply the noted requests; every reader calls this first."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        builds: dict[str, str | None] = {}  # profile -> its build id, asked once a batch
        counts, per_mac, configured, per_profile = self._counts, self._events, self._configured, self._per_profile
        overlaid = self._overlaid
        unconfigured, per_machine, max_machines = self._unconfigured, self.per_machine, self.max_machines
        stored = self.bytes
        seq = self._seq
        batch = []
        me, told = self.server, [] if self.sink is not None else None  # this server's requests, for the sink
        # What the last event counted in: most requests of a batch are alike, and their strings the same objects.
        last_protocol = last_status = last_profile = None
        count = [0, 0]
        build = profiled = None
        # One loop with everything written out in it: this runs for every request served.
        for now, client, protocol, path, status, ok, nbytes, mac, profile, retransmissions, facts, given, server \
                in pending:
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
            if server is None:  # this server's
                event = (seq, now, client, protocol, path, status, ok, nbytes, mac, profile, build,
                         retransmissions, me)  # a BootEvent's fields
                if told is not None:
                    told.append((now, client, protocol, path, status, ok, nbytes, mac, profile, build,
                                 retransmissions, facts, me))
            else:  # another server's, with the build it served
                event = (seq, now, client, protocol, path, status, ok, nbytes, mac, profile, given,
                         retransmissions, server)
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
                if script_path(path):
                    profiled[0] += 1
                    self._per_minute(now, 1)
                elif (overlay_path(path) if profile in overlaid else initrd_sent(ok, path, status)):
                    profiled[1] += 1  # handed over (state_of)
                    self._per_minute(now, 2)
            if mac is None:
                continue
            stored += _EVENT_BYTES + len(path)
            held = per_mac.get(mac)
            if held is None:
                per_mac[mac] = (event,)
                if self._loose and mac in self._loose:
                    del self._loose[mac]  # its facts are its machine's now
                if mac not in configured:
                    unconfigured[mac] = seq
                    if len(unconfigured) > max_machines:
                        self.bytes = stored
                        self._forget_one(seq)
                        stored = self.bytes
            elif len(held) < per_machine:
                per_mac[mac] = (*held, event)
            else:
                stored -= _EVENT_BYTES + len(held[0][4])  # its path
                per_mac[mac] = (*held[1:], event)
            if facts and mac in per_mac:
                self.bytes = stored
                self._store_facts(mac, facts)
                stored = self.bytes
        self.bytes = stored
        self._seq = seq
        while self.bytes > self.max_bytes and unconfigured:
            self._forget_one(seq)
        self._recent.extend(batch)
        if told:
            self.sink(told)  # type: ignore[misc]
        if self._subscribers:
            for event in batch:
                self._publish(BootEvent._make(event))

    def _per_minute(self, now: float, which: int) -> None:
        """Count a boot started (1) or handed over (2) in its minute, for the page's chart."""
        minute = int(now // 60)
        minutes = self._minutes
        if not minutes or minutes[-1][0] != minute:
            minutes.append([minute, 0, 0])
        minutes[-1][which] += 1

    def _build_of(self, profile: str) -> str | None:
        """The build id `profile` serves now (noting its system, for the machines' entries)."""
        found = self.builds(profile)
        if found is None:
            return None
        self.systems.setdefault(found[0], found[1])
        return found[0]

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
            last = held[-1][0]  # its last event's seq
            if last <= joined:
                del per_mac[mac]
                if mac in self._facts:
                    self._drop_facts(mac)
                if len(held) == 1:  # (most often, in a flood of made-up MACs: no generator for it)
                    self.bytes -= _EVENT_BYTES + len(held[0][4])
                else:
                    self.bytes -= len(held) * _EVENT_BYTES + sum(len(e[4]) for e in held)
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


class Snapshot:
    """The record at one moment: copies of its machines' events and of its counters, which nothing changes
    afterwards, so that the machines' entries, the page and /metrics are worked out in a thread while the
    event loop goes on serving boots."""

    def __init__(self, record: BootRecord) -> None:
        self.seq = record._seq
        self.events = dict(record._events)  # each machine's events is a tuple, replaced but never changed
        self.facts = dict(record._facts)  # each machine's facts is a tuple, replaced but never changed
        self.minutes = [tuple(m) for m in record._minutes]
        self.configured = record._configured  # replaced, never changed, by configure()
        self.sources = record._sources  # the same
        self.overlaid = record._overlaid
        self.systems = dict(record.systems)
        self.counts = {p: {status: c[:] for status, c in by.items()} for p, by in record._counts.items()}
        self.per_profile = {p: n[:] for p, n in record._per_profile.items()}
        self.tftp_retransmissions = record.tftp_retransmissions
        self.reloads = record.reloads
        self.reload_failures = record.reload_failures
        self.http_in_flight = record.http_in_flight
        self._machines: dict[str, Machine] | None = None

    @property
    def machines(self) -> dict[str, Machine]:
        """Every machine seen or configured, by MAC (made when first read)."""
        if self._machines is None:
            configured = self.configured
            facts = self.facts
            sources, overlaid = self.sources, self.overlaid
            found = {mac: Machine(mac, events, configured.get(mac), mac in configured, facts.get(mac, ()),
                                  sources.get(mac), overlaid) for mac, events in self.events.items()}
            for mac, profile in configured.items():
                if mac not in found:
                    found[mac] = Machine(mac, (), profile, True, facts.get(mac, ()), sources.get(mac), overlaid)
            self._machines = found
        return self._machines

    def states(self) -> collections.Counter[str]:
        overlaid = self.overlaid
        found = collections.Counter(state_of(events, overlaid) for events in self.events.values())
        found[CONFIGURED] += sum(mac not in self.events for mac in self.configured)
        return found

    def machine(self, mac: str) -> Machine:
        return Machine(mac, self.events.get(mac, ()), self.configured.get(mac), mac in self.configured,
                       self.facts.get(mac, ()), self.sources.get(mac), self.overlaid)

    def known(self, mac: str) -> bool:
        """Whether the record knows `mac`: seen, configured, or answered by DHCP."""
        return mac in self.events or mac in self.configured or mac in self.facts

    def per_minute(self, minutes: int = CHART_MINUTES) -> list[tuple[int, int, int]]:
        """Boots started and handed over in each of the last `minutes` minutes until now (the same snapshot serves
        readers until something happens), oldest first: (minutes ago, started, handed over), every minute
        present."""
        now = int(_now() // 60)
        counted = {m[0]: m for m in self.minutes}
        return [(now - minute, *counted.get(minute, (minute, 0, 0))[1:])
                for minute in range(now - minutes + 1, now + 1)]

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        """Requests and transfers that ended, by (protocol, status)."""
        return {(p, s): c[0] for p, by_status in self.counts.items() for s, c in by_status.items()}

    @property
    def sent(self) -> dict[tuple[str, str], int]:
        """Payload bytes sent, by (protocol, status)."""
        return {(p, s): c[1] for p, by_status in self.counts.items() for s, c in by_status.items()}

    @property
    def boots_started(self) -> dict[str, int]:
        """Boots started (a machine fetched its script), by profile."""
        return {profile: n[0] for profile, n in self.per_profile.items() if n[0]}

    @property
    def handed_over(self) -> dict[str, int]:
        """Boots handed over (their initrd sent whole, and their overlay if their profile has one), by profile."""
        return {profile: n[1] for profile, n in self.per_profile.items() if n[1]}

    @property
    def tftp_timeouts(self) -> int:
        return self.requests.get(("tftp", "timed out"), 0)
