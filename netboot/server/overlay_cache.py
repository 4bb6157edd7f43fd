"""Every machine's overlay, kept ready: rendered at each (re)load for the machines the machines file lists, on
demand for the others, and packed once per (build, rendered content) on the first request.

A reload that breaks a template does not take a machine's overlay away: the error is logged with the template's
file and line and the machine, and that machine keeps the overlay it had. Only when it never had one is its
script an error message that retries (see `Broken`). At start, any such error stops netboot instead.

Rendering and packing never run on the event loop that serves boots: `Renderer` is their bounded executor.
Templates are rendered in worker processes (pebble's pool: a job that runs longer than RENDER_SECONDS is
killed with its worker, which is replaced, and a worker's address space is capped), since a sandboxed template
can still loop for hours or allocate gigabytes, and a thread can be neither stopped nor capped; packing (bounded
input, the compressor's own code) runs in threads. What a request needs and is not ready yet comes back as a
future (see namespace.Pending).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pebble

from netboot.core import compress
from netboot.core.logtext import clip
from netboot.core.machines import DEFAULT, Machine, Machines, Profile, template_vars
from netboot.server.overlay import (
    OverlayDir,
    OverlayError,
    Rendered,
    SourceMissing,
    init_worker,
    pack,
    render_in_worker,
)

log = logging.getLogger("netboot.serve")

K = TypeVar("K")
V = TypeVar("V")

RENDER_SECONDS = 10.0  # one machine's templates, at most
RENDER_MEMORY = 1 << 30  # bytes of address space a render worker may take beyond what it starts with
WORKERS = 2  # render processes and packing threads

# Rendered overlays of machines not in the machines file, kept by least recent use, in bytes: a made-up MAC costs
# what its overlay renders, so a count would let a flood of them under a default profile's 1 MiB overlay hold
# gigabytes; overlays of a few KiB, as they usually are, are thousands of machines.
MAX_UNLISTED_BYTES = 32 << 20
_KEPT_OVERHEAD = 512  # bytes of a kept overlay beyond its entries (its key, the objects holding it)
_ENTRY_OVERHEAD = 128  # bytes of each of its entries beyond its data and name
# Renders of machines not in the file under way or queued. A request that goes away leaves its render running
# (namespace.Namespace.resolve), so without a bound a flood of made-up MACs whose requests are dropped at once
# would queue renders faster than the workers end them; beyond it, a machine is told to ask again.
MAX_RENDERING = 1024
MAX_PACKED_BYTES = 64 << 20  # packed overlays kept, by least recent use
SAMPLE_MAC = "00:00:00:00:00:00"  # stands for the machines not in the file when checking a default overlay
_LOGGED = 5  # render errors logged one by one at a reload; the rest are counted
ERROR_SHOWN = 1000  # characters of a render error kept (it starts with the template's file and line)


@dataclass(frozen=True)
class Broken:
    """A machine with an overlay it cannot have: why."""

    error: str


class Renderer:
    """The bounded executor of overlays (see the module's docstring); its processes start on first use."""

    def __init__(self, workers: int = WORKERS, timeout: float = RENDER_SECONDS, memory: int = RENDER_MEMORY) -> None:
        self.workers, self.timeout, self.memory = workers, timeout, memory
        self._pool: pebble.ProcessPool | None = None
        self._lock = threading.Lock()
        self._packers = ThreadPoolExecutor(workers, thread_name_prefix="netboot-overlay")

    def _processes(self) -> pebble.ProcessPool:
        with self._lock:
            if self._pool is None:
                # forkserver: workers are forked from a clean process, not from this one and its threads.
                self._pool = pebble.ProcessPool(self.workers, initializer=init_worker, initargs=(self.memory,),
                                                context=multiprocessing.get_context("forkserver"))
            return self._pool

    def render(self, source: OverlayDir, variables: Mapping[str, Any], machine: str) -> Future[Rendered | Broken]:
        """One machine's overlay, rendered in a worker; its errors, whatever they are, come as a Broken."""
        out: Future[Rendered | Broken] = Future()
        self._schedule(source, dict(variables), machine, None, out)
        return out

    def _schedule(self, source: OverlayDir, variables: dict[str, Any], machine: str, entries: Any,
                  out: Future[Rendered | Broken]) -> None:
        try:
            job = self._processes().schedule(render_in_worker, timeout=self.timeout,
                                             args=(source.path, source.digest, entries, variables, machine))
        except RuntimeError as e:  # the pool is closed: the server is stopping
            out.set_result(Broken(f"{source.path}: machine {machine}: {e}"))
            return
        job.add_done_callback(lambda job: self._rendered(job, source, variables, machine, entries, out))

    def _rendered(self, job: Future[Rendered], source: OverlayDir, variables: dict[str, Any], machine: str,
                  entries: Any, out: Future[Rendered | Broken]) -> None:
        where = f"{source.path}: machine {machine}"
        try:
            out.set_result(job.result())
            return
        except SourceMissing:
            if entries is None:  # this worker was not sent the overlay yet: again, with its entries
                self._schedule(source, variables, machine, source.entries, out)
                return
            error = f"{where}: the render worker lost the overlay"
        except OverlayError as e:
            error = str(e)
        except concurrent.futures.TimeoutError:
            error = f"{where}: rendering took longer than {self.timeout:g} s (stopped)"
        except pebble.ProcessExpired as e:
            error = f"{where}: rendering ended its worker process (exit status {e.exitcode})"
        except concurrent.futures.CancelledError:
            error = f"{where}: rendering was cancelled"
        except Exception as e:  # what a worker raised outside the template (MemoryError while pickling, ...)
            error = f"{where}: rendering failed: {type(e).__name__}: {e}"
        # Escaped once, here: what a template raised may quote the machine's variables, which the write API takes
        # from its clients, and the error goes into log lines, TFTP errors and the machine's script.
        out.set_result(Broken(clip(error, ERROR_SHOWN)))

    def pack(self, rendered: Rendered, build: Build) -> Future[bytes]:
        return self._packers.submit(pack, rendered, stage1=build.stage1, compressor=compress.get(build.compression),
                                    level=build.level)

    def close(self) -> None:
        self._packers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join(10)


@dataclass(frozen=True)
class Build:
    """What packing depends on besides the content: the build's id, format and compression."""

    id: str
    stage1: bool  # an image format: stage 1 copies the overlay into the root
    compression: str
    level: int | None


@dataclass
class Prepared:
    """The overlays of a machines file, read and rendered (off the event loop), for `Overlays.adopt`."""

    sources: dict[str, OverlayDir]
    rendered: dict[str, Rendered | Broken]
    errors: list[str] = field(default_factory=list)


class Overlays:
    def __init__(self, renderer: Renderer | None = None) -> None:
        self.renderer = renderer or Renderer()
        self.sources: dict[str, OverlayDir] = {}  # profile -> its overlay directory, as last read without error
        self.rendered: dict[str, Rendered | Broken] = {}  # the listed machines'
        # Machines not in the file: what they got, errors too (a flood of made-up MACs under a broken default
        # overlay is then one render each, not one a request).
        self._unlisted: _Kept[tuple[str, str, str], Rendered | Broken] = _Kept(MAX_UNLISTED_BYTES, _bytes_of)
        self._packed: _Kept[tuple[str, str], bytes] = _Kept(MAX_PACKED_BYTES, len)
        # Work under way, so that requests for the same overlay wait for one job.
        self._rendering: dict[tuple[str, str, str], Future[Rendered | Broken]] = {}
        self._packing: dict[tuple[str, str], Future[bytes]] = {}
        self.packs = 0  # overlays packed (cache misses), for tests and benchmarks

    def apply(self, machines: Machines, *, strict: bool) -> None:
        """`prepare` and `adopt` at once, waiting for the renders (at start, before anything is served)."""
        self.adopt(self.prepare(machines, strict=strict))

    def prepare(self, machines: Machines, *, strict: bool) -> Prepared:
        """Read the profiles' overlays and render the listed machines' (in the renderer's processes; this waits
        for them, so it runs in a thread, or before serving). `strict` (at start): the first error raises.
        Otherwise errors are kept to be logged and each machine they touch keeps its previous overlay. Reads
        this object's state only (the previous overlays), so that the event loop may go on using it meanwhile."""
        errors: list[str] = []
        sources: dict[str, OverlayDir] = {}
        for name, profile in machines.profiles.items():
            if profile.overlay is None:
                continue
            try:
                sources[name] = OverlayDir(profile.overlay)
            except OverlayError as e:
                if strict:
                    raise OverlayError(f"profile {name}: {e}") from None
                errors.append(f"profile {name}: {e}; its machines keep their previous overlays")
                if name in self.sources and self.sources[name].path == profile.overlay:
                    sources[name] = self.sources[name]
        jobs: dict[str, Future[Rendered | Broken] | None] = {}  # None: its profile's overlay cannot be read
        for mac, machine in machines.machines.items():
            profile = machines.profiles[machine.profile]
            if profile.overlay is None:
                continue
            source = sources.get(profile.name)
            jobs[mac] = None if source is None else self.renderer.render(source, template_vars(mac, profile, machine),
                                                                          mac)
        # Tables keyed by UUID or serial are rendered per MAC on request, like machines not in the file; their
        # templates are checked here, with a sample MAC, so that an error shows at start and at each reload.
        checks = [self.renderer.render(sources[m.profile], template_vars(SAMPLE_MAC, machines.profiles[m.profile], m),
                                       m.key)
                  for m in (*machines.by_uuid.values(), *machines.by_serial.values()) if m.profile in sources]
        default = machines.profiles.get(DEFAULT)
        sample = None
        if default is not None and default.name in sources:  # the machines not in the file: one stands for them all
            sample = self.renderer.render(sources[default.name], template_vars(SAMPLE_MAC, default, None),
                                          "(any not listed)")
        rendered: dict[str, Rendered | Broken] = {}
        for mac, job in jobs.items():
            profile = machines.profiles[machines.machines[mac].profile]
            result = Broken(f"profile {profile.name}'s overlay cannot be read") if job is None else job.result()
            if isinstance(result, Rendered):
                rendered[mac] = result
                continue
            if strict:
                raise OverlayError(result.error)
            previous = self.rendered.get(mac)
            if job is not None:  # (an unreadable overlay was reported once, for its profile)
                errors.append(f"{result.error}; " + ("it keeps its previous overlay" if isinstance(previous, Rendered)
                                                    else "it cannot boot until this is fixed"))
            rendered[mac] = previous if isinstance(previous, Rendered) else result
        for job in [*checks, *([sample] if sample is not None else [])]:
            if isinstance(broken := job.result(), Broken):
                if strict:
                    raise OverlayError(broken.error)
                errors.append(broken.error)
        return Prepared(sources, rendered, errors)

    def adopt(self, prepared: Prepared) -> None:
        """Serve what `prepare` made (on the event loop: swaps a few references), and log its errors."""
        self.sources, self.rendered = prepared.sources, prepared.rendered
        self._unlisted.clear()
        self._rendering.clear()
        for line in prepared.errors[:_LOGGED]:
            log.error("overlay: %s", line)
        if len(prepared.errors) > _LOGGED:
            log.error("overlay: ... and %d more errors", len(prepared.errors) - _LOGGED)

    def for_machine(self, mac: str, profile: Profile, listed: bool, machine: Machine | None = None
                    ) -> Rendered | Broken | tuple[Future[Rendered | Broken], Callable[[Any], None]]:
        """A machine's overlay (its profile has one), or the job rendering it and what stores its result (a
        machine not listed by its MAC, on first request; `machine`: its table, when it was found by its UUID or
        serial)."""
        if listed:
            return self.rendered.get(mac) or Broken("its overlay has not been rendered")
        key = (mac, profile.name, machine.key if machine else "")
        found = self._unlisted.get(key)
        if found is not None:
            return found
        source = self.sources.get(profile.name)
        if source is None:
            return Broken(f"profile {profile.name}'s overlay cannot be read")
        job = self._rendering.get(key)
        if job is None:
            if len(self._rendering) >= MAX_RENDERING:
                return Broken(f"the server is rendering the overlays of {len(self._rendering):,} other machines; "
                              "this one asks again later")
            job = self._rendering[key] = self.renderer.render(source, template_vars(mac, profile, machine), mac)
        return job, lambda result: self._store_unlisted(key, source, result)

    def _store_unlisted(self, key: tuple[str, str, str], source: OverlayDir, result: Rendered | Broken) -> None:
        if self._rendering.pop(key, None) is None or self.sources.get(key[1]) is not source:
            return  # stored by another request waiting for the same job, or a reload has replaced the overlay
        if isinstance(result, Broken):
            log.error("overlay: %s", result.error)
        self._unlisted.put(key, result)

    def packed(self, rendered: Rendered, build: Build) -> bytes | tuple[Future[bytes], Callable[[Any], None]]:
        """The overlay packed for `build`, or the job packing it and what stores its result (first request)."""
        key = (build.id, rendered.digest)
        data = self._packed.get(key)
        if data is not None:
            return data
        job = self._packing.get(key)
        if job is None:
            job = self._packing[key] = self.renderer.pack(rendered, build)
        return job, lambda data: self._store_packed(key, data)

    def _store_packed(self, key: tuple[str, str], data: bytes | None) -> None:
        """`data`: None when packing failed (the next request tries again)."""
        if self._packing.pop(key, None) is None or data is None or key in self._packed:
            return  # stored by another request waiting for the same job
        self.packs += 1
        self._packed.put(key, data)

    def close(self) -> None:
        self.renderer.close()


class _Kept(Generic[K, V]):
    """Values kept by least recent use, bounded in bytes (`size` of each): beyond `max_bytes`, the least recently
    used go first, down to the newest alone."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size = size
        self._values: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()

    def __contains__(self, key: K) -> bool:
        return key in self._values

    def get(self, key: K) -> V | None:
        found = self._values.get(key)
        if found is None:
            return None
        self._values.move_to_end(key)
        return found[0]

    def put(self, key: K, value: V) -> None:
        if (old := self._values.pop(key, None)) is not None:
            self.bytes -= old[1]
        size = self._size(value)
        self._values[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._values) > 1:
            _, (_, dropped) = self._values.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._values.clear()
        self.bytes = 0


def _bytes_of(kept: Rendered | Broken) -> int:
    """What a kept overlay holds in memory, near enough: its entries' data and names, or its error."""
    if isinstance(kept, Broken):
        return _KEPT_OVERHEAD + len(kept.error)
    return _KEPT_OVERHEAD + sum(_ENTRY_OVERHEAD + len(e.data) + len(e.name) for e in kept.entries)
