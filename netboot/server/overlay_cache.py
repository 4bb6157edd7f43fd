"""Every machine's overlay, kept ready: rendered at each (re)load for the machines the machines file lists, on
demand for the others, and packed once per (build, rendered content) on the first request.

A reload that breaks a template does not take a machine's overlay away: the error is logged with the template's
file and line and the machine, and that machine keeps the overlay it had. Only when it never had one is its
script an error message that retries (see `Broken`). At start, any such error stops netboot instead.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from netboot.core import compress
from netboot.core.machines import DEFAULT, Machines, Profile, template_vars
from netboot.server.overlay import OverlayDir, OverlayError, Rendered, pack

log = logging.getLogger("netboot.serve")

MAX_UNLISTED = 10_000  # rendered overlays of machines not in the machines file, kept by least recent use
MAX_PACKED_BYTES = 64 << 20  # packed overlays kept, by least recent use
SAMPLE_MAC = "00:00:00:00:00:00"  # stands for the machines not in the file when checking a default overlay
_LOGGED = 5  # render errors logged one by one at a reload; the rest are counted


@dataclass(frozen=True)
class Broken:
    """A machine with an overlay it cannot have: why."""

    error: str


@dataclass(frozen=True)
class Build:
    """What packing depends on besides the content: the build's id, format and compression."""

    id: str
    stage1: bool  # an image format: stage 1 copies the overlay into the root
    compression: str
    level: int | None


class Overlays:
    def __init__(self) -> None:
        self.sources: dict[str, OverlayDir] = {}  # profile -> its overlay directory, as last read without error
        self.rendered: dict[str, Rendered | Broken] = {}  # the listed machines'
        self._unlisted: collections.OrderedDict[tuple[str, str], Rendered] = collections.OrderedDict()
        self._packed: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
        self._packed_bytes = 0
        self.packs = 0  # overlays packed (cache misses), for tests and benchmarks

    def apply(self, machines: Machines, *, strict: bool) -> None:
        """Read the profiles' overlays and render the listed machines'. `strict` (at start): the first error
        raises. Otherwise errors are logged and each machine they touch keeps its previous overlay."""
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
        rendered: dict[str, Rendered | Broken] = {}
        for mac, machine in machines.machines.items():
            profile = machines.profiles[machine.profile]
            if profile.overlay is None:
                continue
            source = sources.get(profile.name)
            previous = self.rendered.get(mac)
            try:
                if source is None:
                    raise OverlayError(f"profile {profile.name}'s overlay cannot be read")
                rendered[mac] = source.render(template_vars(mac, profile, machine), mac)
                continue
            except OverlayError as e:
                if strict:
                    raise
                if source is not None:
                    errors.append(f"{e}; " + ("it keeps its previous overlay" if isinstance(previous, Rendered)
                                              else "it cannot boot until this is fixed"))
                rendered[mac] = previous if isinstance(previous, Rendered) else Broken(str(e))
        default = machines.profiles.get(DEFAULT)
        if default is not None and default.name in sources:
            try:  # the machines not in the file: one stands for them all
                sources[default.name].render(template_vars(SAMPLE_MAC, default, None), "(any not listed)")
            except OverlayError as e:
                if strict:
                    raise
                errors.append(str(e))
        self.sources, self.rendered = sources, rendered
        self._unlisted.clear()
        for line in errors[:_LOGGED]:
            log.error("overlay: %s", line)
        if len(errors) > _LOGGED:
            log.error("overlay: ... and %d more errors", len(errors) - _LOGGED)

    def for_machine(self, mac: str, profile: Profile, listed: bool) -> Rendered | Broken:
        """A machine's overlay (its profile has one)."""
        if listed:
            return self.rendered.get(mac) or Broken("its overlay has not been rendered")
        key = (mac, profile.name)
        found = self._unlisted.get(key)
        if found is not None:
            self._unlisted.move_to_end(key)
            return found
        source = self.sources.get(profile.name)
        if source is None:
            return Broken(f"profile {profile.name}'s overlay cannot be read")
        try:
            found = source.render(template_vars(mac, profile, None), mac)
        except OverlayError as e:
            log.error("overlay: %s", e)
            return Broken(str(e))
        self._unlisted[key] = found
        if len(self._unlisted) > MAX_UNLISTED:
            self._unlisted.popitem(last=False)
        return found

    def packed(self, rendered: Rendered, build: Build) -> bytes:
        """The overlay packed for `build`: made on first request, then kept."""
        key = (build.id, rendered.digest)
        data = self._packed.get(key)
        if data is not None:
            self._packed.move_to_end(key)
            return data
        data = pack(rendered, stage1=build.stage1, compressor=compress.get(build.compression), level=build.level)
        self.packs += 1
        self._packed[key] = data
        self._packed_bytes += len(data)
        while self._packed_bytes > MAX_PACKED_BYTES and len(self._packed) > 1:
            _, dropped = self._packed.popitem(last=False)
            self._packed_bytes -= len(dropped)
        return data
