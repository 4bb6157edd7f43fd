"""The served namespace: one set of names, resolved the same way for HTTP and TFTP.

    boot.ipxe                          chains to the machine's own script by ${mac:hexhyp}
    machine/<mac>/boot.ipxe            that machine's script (its profile's kernel line plus appends)
    machine/<mac>/<generation>/bzImage the kernel and initrd of the build the script was made from
    machine/<mac>/<generation>/initrd
    machine/<mac>/<generation>/image   the image stage 1 downloads (a build made with --fetch)
    machine/<mac>/<generation>/overlay that machine's overlay, packed for that build (a profile with overlay =)
    profile/<name>/<file>              a profile's current bzImage, initrd, cmdline, netboot.ipxe, manifest.json
                                       (and image)
    <file>                             with --dir: the directory's own files at the root, as its netboot.ipxe expects
    undionly.kpxe, ipxe.efi, snponly.efi   Debian's iPXE binaries, when the ipxe package is installed

Only these names exist, so no request can reach anything else: there is no path to traverse. Scripts refer to
files by absolute path (/machine/…), which iPXE resolves against the URL the script came from, so a machine
that started over TFTP stays on TFTP and one that started over HTTP stays on HTTP. The one exception is the
image of a --fetch build: stage 1, not iPXE, downloads it, over HTTP and by an absolute URL, which the script
names (the address the machine asked for its script at, or the mirror's).

A build replaces an output directory atomically; each profile's files are held open per generation (a hash of
its manifest) so that a machine that got its script before a rebuild still boots the kernel and initrd that
match it, for a grace period, while new requests get the new build.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netboot.core import mac as macs
from netboot.core.artifacts import FILES, IMAGE, IMAGE_FORMATS
from netboot.core.beneath import NotRegular, Outside, Root, open_file
from netboot.core.errors import NetbootError
from netboot.core.ipxe_scripts import fetch_args, render
from netboot.core.logtext import clip
from netboot.core.machines import DEFAULT, Machines, Profile
from netboot.image.publish import manifest_digest
from netboot.server.overlay import Rendered
from netboot.server.overlay_cache import Broken, Build, Overlays, Prepared

log = logging.getLogger("netboot.serve")

BOOT_FILES = ("bzImage", "initrd")
SERVED = (*FILES, IMAGE)  # a build's files by name; the image only in a --fetch build
IPXE_DIR = Path("/usr/lib/ipxe")  # Debian's ipxe package
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")
ALLOWED_ROOTS = (Path("/nix/store"),)  # output directories may hold symlinks into the store
RETRY_SECONDS = 30


class NotFound(NetbootError):
    pass


class BadRequest(NetbootError):
    pass


class Pending(Exception):
    """A name's content needs work first (an overlay to render or to pack), under way in the overlays'
    executor: `job` is it, and `finish(result)` stores what it made (None: it failed)."""

    def __init__(self, job: Future[Any], finish: Callable[[Any], None]) -> None:
        super().__init__("not ready yet")
        self.job = job
        self.finish = finish


_STEPS = 3  # jobs one name may wait for: its overlay rendered, then packed


@dataclass
class HeldFile:
    fd: int
    size: int
    mtime: float

    def reopen(self) -> int:
        """A descriptor of this very file for one transfer; the caller closes it."""
        return os.dup(self.fd)


class Generation:
    """One build of an output directory, with its files held open."""

    def __init__(self, directory: Path) -> None:
        self.files: dict[str, HeldFile] = {}
        real_dir = os.path.realpath(directory)
        try:
            dir_fd = os.open(real_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise NetbootError(f"cannot open {directory}: {e.strerror}") from e
        roots = [Root(real_dir, dir_fd)]
        try:
            for store in ALLOWED_ROOTS:
                with contextlib.suppress(OSError):  # no store here: no link may lead into one
                    roots.append(Root(str(store), os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)))
            # Everything is opened relative to one directory descriptor, so a rebuild that swaps the
            # directory mid-way cannot mix two builds.
            for name in FILES:
                self.files[name] = _open_in(dir_fd, name, roots, directory)
            manifest_bytes = os.pread(self.files["manifest.json"].fd, 1 << 20, 0)
            self.fetch = _lists_image(manifest_bytes)  # a --fetch build: its image is served too
            if self.fetch:
                self.files[IMAGE] = _open_in(dir_fd, IMAGE, roots, directory)
        except BaseException:
            self.close()
            raise
        finally:
            for root in roots:
                os.close(root.fd)
        try:
            manifest = json.loads(manifest_bytes)
            self.cmdline = str(manifest["cmdline"])
            self.system = str(manifest.get("system", "?"))
            self.format = str(manifest.get("format", "direct"))
            self.compression = str(manifest.get("compression", "none"))
            level = manifest.get("level")
            self.level = int(level) if level is not None else None
        except (ValueError, KeyError, TypeError) as e:
            self.close()
            raise NetbootError(f"{directory}/manifest.json is not a netboot manifest ({e})") from None
        self.digest = manifest_digest(manifest_bytes)  # its content address (netboot publish)
        self.id = self.digest[:16]
        self.packing = Build(self.id, self.format in IMAGE_FORMATS, self.compression, self.level)  # for overlays

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()


def _open_in(dir_fd: int, name: str, roots: list[Root], shown: Path) -> HeldFile:
    """`name` in the output directory: a regular file, or a symlink to one in the directory or the Nix store."""
    try:
        fd, st = open_file(dir_fd, name, links=roots)
    except (Outside, NotRegular):
        raise NetbootError(f"{shown}/{name} is not a regular file inside {shown} or the Nix store") from None
    except OSError as e:
        raise NetbootError(f"cannot open {shown}/{name}: {e.strerror}") from e
    return HeldFile(fd, st.st_size, st.st_mtime)


def _lists_image(manifest_bytes: bytes) -> bool:
    """Whether a manifest lists an image among its artifacts (False for one that does not read: that is
    reported when it is read in full)."""
    try:
        artifacts = json.loads(manifest_bytes).get("artifacts")
    except (ValueError, AttributeError):
        return False
    return isinstance(artifacts, dict) and IMAGE in artifacts


def manifest_key(directory: Path) -> tuple[int, int, int] | None:
    """What changes when a build replaces the directory: its manifest's inode, mtime and size."""
    try:
        st = os.stat(directory / "manifest.json")
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class ProfileFiles:
    """A profile's current generation and the ones it replaced, kept until their grace period ends."""

    profile: Profile
    current: Generation
    retired: list[tuple[Generation, float]] = field(default_factory=list)
    seen: tuple[int, int, int] = (0, 0, 0)

    def generation(self, gen_id: str) -> Generation | None:
        if self.current.id == gen_id:
            return self.current
        return next((g for g, _ in self.retired if g.id == gen_id), None)

    def refresh(self, grace: float) -> None:
        """Pick up a rebuilt directory: the new build for new requests, the old one kept for `grace` seconds."""
        key = manifest_key(self.profile.dir)
        if key is None or key == self.seen:
            return  # unchanged, or mid-swap or removed: keep serving what we hold
        self.seen = key  # a broken build is reported once, not at every look
        try:
            new = Generation(self.profile.dir)
        except NetbootError as e:
            log.error("profile %s: keeping the previous build: %s", self.profile.name, e)
            return
        if new.id == self.current.id:
            new.close()
            return
        log.info("profile %s: now serving %s (generation %s)", self.profile.name, new.system, new.id)
        self.retired.append((self.current, time.monotonic() + grace))
        self.current = new

    def expire(self) -> None:
        now = time.monotonic()
        for gen, until in [r for r in self.retired if r[1] <= now]:
            self.retired.remove((gen, until))
            gen.close()

    def close(self) -> None:
        self.current.close()
        for gen, _ in self.retired:
            gen.close()
        self.retired.clear()


# A build's id: the start of its manifest's digest (hexadecimal); `Generation.id`.
_GENERATION = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class Name:
    """A served name, parsed: `kind` is "chain" (boot.ipxe), "script" (a machine's), "build" (a file of the
    build a machine's script names), "profile" (a profile's current file) or "binary" (an iPXE binary)."""

    kind: str
    mac: str | None = None
    generation: str | None = None
    file: str | None = None
    profile: str | None = None


@dataclass
class Item:
    """What a name resolved to: a rendered script or a file, and who it was for (for the log line)."""

    name: str
    data: bytes | None = None
    file: HeldFile | None = None
    mac: str | None = None
    profile: str | None = None


class Namespace:
    def __init__(self, machines: Machines, *, single_dir: bool, grace: float = 600.0) -> None:
        self.single_dir = single_dir
        # Where stage 1 downloads a --fetch build's image from, for a script asked for by another way than HTTP
        # (whose own Host is used): the HTTP listener's URL (server.py sets it once it listens).
        self.http_origin = ""
        self.grace = grace
        self.machines = machines
        self.profiles: dict[str, ProfileFiles] = {}
        self.binaries: dict[str, HeldFile] = {}
        self.overlays = Overlays()
        self._adopt(machines)
        try:
            self.overlays.apply(machines, strict=True)
        except BaseException:
            self.close()
            raise
        self._refresh_binaries()

    def _adopt(self, machines: Machines) -> None:
        """Open every profile's files before switching to `machines`; on error nothing changes."""
        opened: dict[str, ProfileFiles] = {}
        try:
            for name, profile in machines.profiles.items():
                old = self.profiles.get(name)
                if old is not None and old.profile.dir == profile.dir:
                    old.profile = profile
                    opened[name] = old
                else:
                    seen = manifest_key(profile.dir) or (0, 0, 0)  # before opening: a rebuild meanwhile is seen
                    opened[name] = ProfileFiles(profile, Generation(profile.dir), seen=seen)
        except BaseException:
            for name, files in opened.items():
                if self.profiles.get(name) is not files:
                    files.close()
            raise
        for name, files in self.profiles.items():
            if opened.get(name) is not files:
                files.close()
        self.profiles = opened
        self.machines = machines

    def reload(self, machines: Machines, overlays: Prepared | None = None) -> None:
        """Serve `machines`; `overlays`: its overlays, prepared off the event loop (Overlays.prepare), else
        prepared now (outside an event loop)."""
        self._adopt(machines)
        self.overlays.adopt(overlays or self.overlays.prepare(machines, strict=False))

    def refresh(self) -> None:
        for files in self.profiles.values():
            files.refresh(self.grace)
            files.expire()
        self._refresh_binaries()

    def _refresh_binaries(self) -> None:
        """Hold Debian's iPXE binaries open like a generation; reopen one when a package upgrade replaced it."""
        for name in IPXE_BINARIES:
            held = self.binaries.get(name)
            try:
                st = os.stat(IPXE_DIR / name)
            except OSError:
                if held is not None:
                    os.close(self.binaries.pop(name).fd)
                continue
            if held is not None and (st.st_size, st.st_mtime) == (held.size, held.mtime):
                continue
            try:
                fd = os.open(IPXE_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            if held is not None:
                os.close(held.fd)
            st = os.fstat(fd)
            self.binaries[name] = HeldFile(fd, st.st_size, st.st_mtime)

    def close(self) -> None:
        for files in self.profiles.values():
            files.close()
        self.profiles.clear()
        for held in self.binaries.values():
            os.close(held.fd)
        self.binaries.clear()
        self.overlays.close()

    def parse(self, name: str) -> Name | None:
        """What `name` names, by the grammar of the module's docstring; None for a name the server does not
        serve. A name in the machine grammar with an invalid MAC is BadRequest. This one parser serves both
        `lookup` and `who`, so that a name is attributed to a MAC only if it is one the server serves."""
        parts = name.lstrip("/").split("/")
        match parts:
            case ["boot.ipxe"]:
                return Name("chain")
            case ["machine", mac_text, "boot.ipxe"]:
                return Name("script", mac=self._mac(mac_text))
            case ["machine", mac_text, gen_id, file] if (file in BOOT_FILES or file in ("overlay", IMAGE)) and (
                    _GENERATION.fullmatch(gen_id)):
                return Name("build", mac=self._mac(mac_text), generation=gen_id, file=file)
            case ["profile", profile, file] if file in SERVED and profile in self.profiles:
                return Name("profile", profile=profile, file=file)
            case [file] if file in SERVED and self.single_dir:
                return Name("profile", profile=DEFAULT, file=file)
            case [file] if file in self.binaries:
                return Name("binary", file=file)
        return None

    def lookup(self, name: str, origin: str = "") -> Item:
        """What `name` resolves to. On the event loop, a name whose overlay must first be rendered or packed
        raises Pending (use `resolve` there); elsewhere (a thread, a script) this waits for that work.
        `origin`: the HTTP URL (scheme, host, port) the request came to, if it came over HTTP."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            for _ in range(_STEPS):
                try:
                    return self._lookup(name, origin)
                except Pending as pending:
                    pending.job.exception()  # waits for it
                    if not self._keep(name, pending, pending.job):
                        raise _unpacked(name) from None
        return self._lookup(name, origin)

    async def resolve(self, name: str, origin: str = "") -> Item:
        """`lookup` for the event loop: what must be rendered or packed first is awaited, in the overlays'
        executor (a script needs its machine's overlay rendered; the overlay, packed). That work is shared by
        the requests for it and outlives each: one that is cancelled (a TFTP request superseded by its client's
        next one, or waiting longer than TftpConfig.wait_timeout) neither cancels it for the others nor loses
        what it makes."""
        for _ in range(_STEPS):
            try:
                return self._lookup(name, origin)
            except Pending as pending:
                job = asyncio.wrap_future(pending.job)
                # Stored when done, whether this request still waits or not; and the shield keeps this
                # request's cancellation from reaching the job (wrap_future would cancel it).
                job.add_done_callback(functools.partial(self._keep, name, pending))
                try:
                    await asyncio.shield(job)
                except Exception:
                    raise _unpacked(name) from None
        return self._lookup(name, origin)

    @staticmethod
    def _keep(name: str, pending: Pending, job: Future[Any] | asyncio.Future[Any]) -> bool:
        """Store what a finished job made; False when it failed (packing: the compressor's error), which is
        logged, and the next request tries again."""
        if job.cancelled():  # the executor was shut down: the server is stopping
            return False
        if (error := job.exception()) is not None:
            pending.finish(None)
            log.error("overlay for %s: %s", clip(name), error)
            return False
        pending.finish(job.result())
        return True

    def _lookup(self, name: str, origin: str) -> Item:
        parsed = self.parse(name)
        if parsed is None:
            raise NotFound(f"no such file: {clip(name)}")
        mac, file = parsed.mac, parsed.file
        match parsed.kind:
            case "chain":
                return Item("boot.ipxe", render("boot.ipxe").encode())
            case "script":
                assert mac is not None
                return self._machine_script(mac, name, origin or self.http_origin)
            case "build":
                assert mac is not None and file is not None and parsed.generation is not None
                found = self.machines.for_mac(mac)
                if found is None:
                    raise NotFound(f"{mac} has no profile")
                profile = found[0]
                gen = self.profiles[profile.name].generation(parsed.generation)
                if gen is None:
                    raise NotFound(f"build {parsed.generation} of profile {profile.name} is no longer served; "
                                   "fetch boot.ipxe again")
                if file == "overlay":
                    return Item(name, self._overlay(mac, profile, gen), mac=mac, profile=profile.name)
                return Item(name, file=_file_of(gen, file), mac=mac, profile=profile.name)
            case "profile":
                assert parsed.profile is not None and file is not None
                return Item(name, file=_file_of(self.profiles[parsed.profile].current, file), profile=parsed.profile)
        assert file is not None
        return Item(name, file=self.binaries[file])

    def who(self, name: str) -> tuple[str | None, str | None]:
        """The MAC and profile a name is for, for log lines and the status record; never raises. A machine's
        files are attributed to its MAC only when it has a profile (a made-up MAC has none to be served)."""
        try:
            parsed = self.parse(name)
        except BadRequest:
            return None, None
        if parsed is None:
            return None, None
        if parsed.mac is not None:
            found = self.machines.for_mac(parsed.mac)
            if found is None:
                return (parsed.mac, None) if parsed.kind == "script" else (None, None)
            return parsed.mac, found[0].name
        return None, parsed.profile

    @staticmethod
    def _mac(text: str) -> str:
        try:
            return macs.normalize(text)
        except macs.BadMac:
            raise BadRequest(f"invalid MAC address {clip(text)!r}") from None

    def _machine_script(self, mac: str, name: str, origin: str) -> Item:
        found = self.machines.for_mac(mac)
        if found is None:
            where = str(self.machines.source) if self.machines.source else "the machines file"
            script = render("unknown.ipxe", mac=mac, machines=where, retry=str(RETRY_SECONDS),
                            again=f"/machine/{macs.hyphenated(mac)}/boot.ipxe")
            return Item(name, script.encode(), mac=mac)
        profile, append = found
        gen = self.profiles[profile.name].current
        base = f"/machine/{macs.hyphenated(mac)}/{gen.id}"
        # With base_url, the kernel, the initrd and the image come from the mirror, by content address.
        files = f"{profile.base_url}/{gen.digest}" if profile.base_url else base
        # A --fetch build: stage 1 downloads the image over HTTP by this URL, before the appends (which may
        # name another).
        fetching = fetch_args((files if profile.base_url else origin + base) + "/" + IMAGE) if gen.fetch else ""
        cmdline = " ".join(x for x in (gen.cmdline, fetching, append) if x)
        overlay = ("", "# no overlay")
        if profile.overlay is not None:
            rendered = self._rendered(mac, profile)
            if isinstance(rendered, Broken):
                script = render("broken.ipxe", mac=mac, error=_echoable(rendered.error), retry=str(RETRY_SECONDS),
                                again=f"/machine/{macs.hyphenated(mac)}/boot.ipxe")
                return Item(name, script.encode(), mac=mac, profile=profile.name)
            # A second initrd: unpacked after the first, so its files win.
            overlay = (" initrd=overlay", f"initrd --name overlay {base}/overlay")
        script = render(
            "machine.ipxe", mac=mac, profile=profile.name, system=gen.system, cmdline=cmdline, files=files,
            overlay_arg=overlay[0], overlay_initrd=overlay[1],
        )
        return Item(name, script.encode(), mac=mac, profile=profile.name)

    def _rendered(self, mac: str, profile: Profile) -> Rendered | Broken:
        found = self.overlays.for_machine(mac, profile, listed=mac in self.machines.machines)
        if isinstance(found, tuple):
            raise Pending(*found)
        return found

    def _overlay(self, mac: str, profile: Profile, gen: Generation) -> bytes:
        if profile.overlay is None:
            raise NotFound(f"profile {profile.name} has no overlay")
        rendered = self._rendered(mac, profile)
        if isinstance(rendered, Broken):
            raise NotFound(f"{mac} has no overlay: {rendered.error}")
        found = self.overlays.packed(rendered, gen.packing)
        if isinstance(found, tuple):
            raise Pending(*found)
        return found


def _unpacked(name: str) -> NotFound:
    return NotFound(f"{clip(name)}: the overlay cannot be packed")


def _file_of(gen: Generation, file: str) -> HeldFile:
    try:
        return gen.files[file]
    except KeyError:
        raise NotFound(f"build {gen.id} has no {file} (it was not built with --fetch)") from None


def _echoable(text: str) -> str:
    """One line that iPXE's echo shows as it is (no ${...} expansion)."""
    return " ".join(text.replace("$", "").split())
