"""The served namespace: one set of names, resolved the same way for HTTP and TFTP.

    boot.ipxe                          chains to the machine's own script by ${mac:hexhyp}, with its facts
    machine/<mac>/[<facts>/]boot.ipxe  that machine's script (its profile's kernel line plus appends); for a
                                       machine whose ${buildarch} is not x86 (x86_64, or i386 for BIOS), its
                                       profile's build for that architecture, or a refusal when it has none
    machine/<mac>/<arch>/boot.ipxe     the same for a machine of <arch> (a loader's own name for it)
    machine/<mac>/[<match>/]<generation>/bzImage   the kernel and initrd of the build the script was made from (the
    machine/<mac>/[<match>/]<generation>/initrd    kernel is `Image` in an arm64 build: core/artifacts.KERNEL_FILES)
    machine/<mac>/[<match>/]<generation>/image     the image stage 1 downloads (a build made with --fetch)
    machine/<mac>/[<match>/]<generation>/overlay   that machine's overlay, packed for that build (overlay =)
    profile/<name>/<file>              a profile's current bzImage, initrd, cmdline, netboot.ipxe, manifest.json
                                       (and image)
    <file>                             with --dir: the directory's own files at the root, as its netboot.ipxe expects
    undionly.kpxe, ipxe.efi, snponly.efi   Debian's iPXE binaries, when the ipxe package is installed
    grub/grub.cfg                      what GRUB reads first: sources the machine's own by ${net_default_mac}
    machine/<mac>/grub.cfg             that machine's GRUB configuration (the same profiles, builds and appends)
    machine/<mac>/<arch>/grub.cfg      the same for a machine of <arch> (GRUB's $grub_cpu)
    machine/<mac>/<generation>/netboot.efi   the build's unified kernel image (a build made with --uki)
    shimx64.efi, grubx64.efi, mmx64.efi      shim, network GRUB and MokManager (loaders.py), per architecture
    arm64/ipxe.efi                     an arm64 iPXE, when --loaders arm64=DIR has one
    grub/x86_64-efi/http.mod           GRUB's modules that its configuration may load (loaders.GRUB_MODULES)

<facts> are what iPXE knows of the machine, as path segments `key=value` (FACT_KEYS; see FACTS_PATH), so that
they travel over TFTP too, which has no query strings; a machine is matched by its MAC, else by the UUID, else by
the serial among them. <match> is the one fact its script was matched by (`uuid=…` or `serial=…`), so that its
files are found the same way without the server remembering anything.

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
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netboot.core import artifacts
from netboot.core import loaders as _loaders
from netboot.core import mac as macs
from netboot.core.artifacts import ANY_FILE, IMAGE, IMAGE_FORMATS, IMAGE_URL, KERNEL_FILES, UKI, arch_of
from netboot.core.beneath import NotRegular, Outside, Root, open_file
from netboot.core.errors import NetbootError
from netboot.core.ipxe_scripts import fetch_args, render
from netboot.core.logtext import clip
from netboot.core.machines import DEFAULT, IPXE_BINARIES, Machine, Machines, Profile, ipxe_binary
from netboot.image.publish import manifest_digest
from netboot.server.overlay import Rendered
from netboot.server.overlay_cache import Broken, Build, Overlays, Prepared

log = logging.getLogger("netboot.serve")

BOOT_FILES = (*KERNEL_FILES.values(), "initrd")
IPXE_DIR = Path("/usr/lib/ipxe")  # Debian's ipxe package
ALLOWED_ROOTS = (Path("/nix/store"),)  # output directories may hold symlinks into the store
RETRY_SECONDS = 30
# What iPXE knows of the machine it runs on (its SMBIOS and its own build), in the order boot.ipxe names them.
FACT_KEYS = ("uuid", "serial", "manufacturer", "product", "buildarch", "platform")
# boot.ipxe's chain carries them as path segments. ${…:uristring} escapes "/" and the rest of a string, but iPXE
# before 2021 (Debian 12's) decodes the escapes again when it parses the URI, as every iPXE does for a TFTP name,
# and aiohttp does for HTTP: a "/" in a value then splits it, which the parser mends (see _facts). The UUID keeps
# its own type: as a uristring iPXE would send its 16 raw bytes; as a UUID it is hex digits and hyphens.
FACTS_PATH = "/".join(f"{key}=${{{key}}}" if key == "uuid" else f"{key}=${{{key}:uristring}}" for key in FACT_KEYS)
# A binary chosen by a machine is chained from its script when the iPXE it runs uses another NIC driver: iPXE
# names the driver in ${netX/chip} ("undionly" in undionly.kpxe; "SNP", or "NII"/"MNP" in newer builds, in
# snponly.efi). ipxe.efi cannot be told apart (it uses the firmware's driver too, for a NIC it has none of), so
# it is chosen over DHCP only: a script chaining it could chain itself forever.
_DRIVERS = {"undionly.kpxe": ("pcbios", ("undionly",)), "snponly.efi": ("efi", ("SNP", "NII", "MNP"))}


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
            # directory mid-way cannot mix two builds. The manifest first: it says which kernel file there is.
            self.files["manifest.json"] = _open_in(dir_fd, "manifest.json", roots, directory)
            manifest_bytes = os.pread(self.files["manifest.json"].fd, 1 << 20, 0)
            try:
                manifest = json.loads(manifest_bytes)
                self.arch = arch_of(manifest)  # what the build is for (x86_64, arm64)
            except ValueError as e:
                raise NetbootError(f"{directory}/manifest.json is not a netboot manifest ({e})") from None
            self.kernel = KERNEL_FILES[self.arch]  # its kernel's file name: bzImage, Image
            for name in artifacts.files(self.arch):
                if name not in self.files:
                    self.files[name] = _open_in(dir_fd, name, roots, directory)
            with contextlib.suppress(FileNotFoundError):  # only in builds made with --uki
                self.files[UKI] = _open_in(dir_fd, UKI, roots, directory, missing_ok=True)
            self.fetch = _lists_image(manifest)  # a --fetch build: its image is served too
            if self.fetch:
                self.files[IMAGE] = _open_in(dir_fd, IMAGE, roots, directory)
        except BaseException:
            self.close()
            raise
        finally:
            for root in roots:
                os.close(root.fd)
        try:
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


def _open_in(dir_fd: int, name: str, roots: list[Root], shown: Path, missing_ok: bool = False) -> HeldFile:
    """`name` in the output directory: a regular file, or a symlink to one in the directory or the Nix store."""
    try:
        fd, st = open_file(dir_fd, name, links=roots)
    except (Outside, NotRegular):
        raise NetbootError(f"{shown}/{name} is not a regular file inside {shown} or the Nix store") from None
    except FileNotFoundError:
        if missing_ok:
            raise
        raise NetbootError(f"cannot open {shown}/{name}: No such file or directory") from None
    except OSError as e:
        raise NetbootError(f"cannot open {shown}/{name}: {e.strerror}") from e
    return HeldFile(fd, st.st_size, st.st_mtime)


def _lists_image(manifest: object) -> bool:
    """Whether a manifest lists an image among its artifacts (False for one that does not say: what else it
    lacks is reported where it is read)."""
    artifacts = manifest.get("artifacts") if isinstance(manifest, dict) else None
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
        if (wrong := _wrong_arch(self.profile, new)) is not None:
            new.close()
            log.error("profile %s: keeping the previous build: %s", self.profile.name, wrong)
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
_LOADER_ARCH = re.compile(r"[a-z0-9_]{1,16}")  # iPXE's ${buildarch}, GRUB's $grub_cpu: x86_64, i386, arm64
_BUILD_FILES = (*BOOT_FILES, "overlay", UKI, IMAGE)  # machine/<mac>/<generation>/<file>
_PROFILE_FILES = (*ANY_FILE, UKI, IMAGE)  # profile/<name>/<file>, and with --dir at the root


@dataclass(frozen=True)
class Name:
    """A served name, parsed: `kind` is "chain" (boot.ipxe), "script" (a machine's), "build" (a file of the
    build a machine's script names), "profile" (a profile's current file) or "binary" (an iPXE binary, a loader
    or a GRUB module); "grub-chain" (grub/grub.cfg) and "grub" (a machine's GRUB configuration) for GRUB."""

    kind: str
    mac: str | None = None
    generation: str | None = None
    file: str | None = None
    profile: str | None = None
    facts: tuple[tuple[str, str], ...] = ()  # what the machine said of itself (FACT_KEYS), in its name
    path: str = ""  # the name without its facts, as log lines and the status record show it
    arch: str | None = None  # the machine's, as its loader says (machine/<mac>/<arch>/…, or ${buildarch})

    def fact(self, key: str) -> str:
        return next((value for k, value in self.facts if k == key), "")


@dataclass(frozen=True)
class Attribution:
    """Whom a name is for: the MAC and profile (None when not a machine's), the name as shown (without the
    machine's facts) and the facts its script's name carried."""

    mac: str | None
    profile: str | None
    path: str
    facts: tuple[tuple[str, str], ...] = ()


@dataclass
class Item:
    """What a name resolved to: a rendered script or a file, and who it was for (for the log line)."""

    name: str  # as shown: without the machine's facts
    data: bytes | None = None
    file: HeldFile | None = None
    mac: str | None = None
    profile: str | None = None
    facts: tuple[tuple[str, str], ...] = ()  # a script's: what the machine said of itself


class Namespace:
    def __init__(self, machines: Machines, *, single_dir: bool, grace: float = 600.0,
                 loaders: _loaders.Loaders | None = None) -> None:
        self.single_dir = single_dir
        # Where stage 1 downloads a --fetch build's image from, for a script asked for by another way than HTTP
        # (whose own Host is used): the HTTP listener's URL (server.py sets it once it listens).
        self.http_origin = ""
        self.grace = grace
        self.machines = machines
        self.profiles: dict[str, ProfileFiles] = {}
        self.arches: dict[str, str] = {}  # profile name -> its current build's architecture (for DHCP)
        self.binaries: dict[str, HeldFile] = {}
        self.loaders = loaders or _loaders.Loaders()
        # Where GRUB finds the HTTP side (set once it listens): a specific address, or the server GRUB came from.
        self.http_port = 0
        self.http_host = "${net_default_server}"
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
                if (wrong := _wrong_arch(profile, opened[name].current)) is not None:
                    raise NetbootError(wrong)
            self._check_loaders(machines, opened)
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
        self._note_arches()

    def _note_arches(self) -> None:
        self.arches = {name: files.current.arch for name, files in self.profiles.items()}

    def _check_loaders(self, machines: Machines, opened: dict[str, ProfileFiles]) -> None:
        """A profile booted through shim and GRUB needs them (and a uki profile a build with its UKI)."""
        for name, profile in machines.profiles.items():
            if profile.loader not in _loaders.SIGNED_CHAINS:
                continue
            # Builds are x86_64's until they say otherwise (the manifest's "arch", when a build records it).
            arch = _loaders.arch(opened[name].current.arch)
            why = self.loaders.missing(arch)
            if why is not None:
                raise NetbootError(f"profile {name}: loader {profile.loader} needs {arch.shim}, {arch.grub} and "
                                   f"{arch.mokmanager}: {why}")
            if profile.loader == "uki" and UKI not in opened[name].current.files:
                raise NetbootError(f"profile {name}: loader uki needs a build made with netboot build --uki: "
                                   f"{profile.dir} has no {UKI}")

    def reload(self, machines: Machines, overlays: Prepared | None = None) -> None:
        """Serve `machines`; `overlays`: its overlays, prepared off the event loop (Overlays.prepare), else
        prepared now (outside an event loop)."""
        self._adopt(machines)
        self.overlays.adopt(overlays or self.overlays.prepare(machines, strict=False))

    def refresh(self) -> None:
        for files in self.profiles.values():
            files.refresh(self.grace)
            files.expire()
        self._note_arches()
        self._refresh_binaries()

    def _refresh_binaries(self) -> None:
        """Hold Debian's iPXE binaries and the loaders open like a generation; reopen one when a package upgrade
        replaced it."""
        paths = {name: IPXE_DIR / name for name in IPXE_BINARIES} | self.loaders.served()
        for name in [n for n in self.binaries if n not in paths]:
            os.close(self.binaries.pop(name).fd)
        for name, path in paths.items():
            held = self.binaries.get(name)
            try:
                st = os.stat(path)
            except OSError:
                if held is not None:
                    os.close(self.binaries.pop(name).fd)
                continue
            if held is not None and (st.st_size, st.st_mtime) == (held.size, held.mtime):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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
            case ["machine", mac_text, *facts, "boot.ipxe"] if (said := _facts(facts)) is not None:
                return Name("script", mac=self._mac(mac_text), facts=said, path=f"machine/{mac_text}/boot.ipxe",
                            arch=_arch_said(said))
            case ["grub", "grub.cfg"]:
                return Name("grub-chain")
            case ["machine", mac_text, "grub.cfg"]:
                return Name("grub", mac=self._mac(mac_text), path=f"machine/{mac_text}/grub.cfg")
            case ["machine", mac_text, arch, "boot.ipxe" | "grub.cfg" as script] if _LOADER_ARCH.fullmatch(arch):
                kind = "script" if script == "boot.ipxe" else "grub"
                return Name(kind, mac=self._mac(mac_text), arch=_loaders.machine_arch(arch) or f"?{arch}",
                            path="/".join(parts))
            case ["machine", mac_text, *facts, gen_id, file] if file in _BUILD_FILES and (
                    _GENERATION.fullmatch(gen_id)) and (said := _facts(facts)) is not None:
                return Name("build", mac=self._mac(mac_text), generation=gen_id, file=file, facts=said,
                            path=f"machine/{mac_text}/{gen_id}/{file}")
            case ["profile", profile, file] if file in _PROFILE_FILES and profile in self.profiles:
                return Name("profile", profile=profile, file=file)
            case [file] if file in _PROFILE_FILES and self.single_dir:
                return Name("profile", profile=DEFAULT, file=file)
            case _ if (file := "/".join(parts)) in self.binaries:
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
                return Item("boot.ipxe", render("boot.ipxe", facts=FACTS_PATH).encode())
            case "grub-chain":
                return Item(name, render("grub.cfg").encode())
            case "script" | "grub":
                assert mac is not None
                return self._machine_script(mac, parsed, origin or self.http_origin, grub=parsed.kind == "grub")
            case "build":
                assert mac is not None and file is not None and parsed.generation is not None
                found = self._found(parsed)
                if found is None:
                    raise NotFound(f"{mac} has no profile")
                profile, _, machine = found
                # The build of whichever of the profile's architectures the machine's script named.
                gen, profile = next(((g, p) for p in self.machines.variants_of(profile)
                                     if (g := self.profiles[p.name].generation(parsed.generation)) is not None),
                                    (None, profile))
                if gen is None:
                    raise NotFound(f"build {parsed.generation} of profile {profile.name} is no longer served; "
                                   "fetch boot.ipxe again")
                if file == "overlay":
                    return Item(parsed.path, self._overlay(mac, profile, gen, machine), mac=mac, profile=profile.name)
                return Item(parsed.path, file=_held(gen, file), mac=mac, profile=profile.name)
            case "profile":
                assert parsed.profile is not None and file is not None
                return Item(name, file=_held(self.profiles[parsed.profile].current, file), profile=parsed.profile)
        assert file is not None
        return Item(name, file=self.binaries[file])

    def who(self, name: str) -> tuple[str | None, str | None]:
        """The MAC and profile a name is for, for log lines and the status record; never raises."""
        found = self.attribution(name)
        return found.mac, found.profile

    def attribution(self, name: str) -> Attribution:
        """Whom a name is for (see `who`), the name as shown and the facts a script's name carried; never raises.
        A machine's files are attributed to its MAC only when it has a profile (a made-up MAC has none to be
        served)."""
        try:
            parsed = self.parse(name)
        except BadRequest:
            return Attribution(None, None, name)
        if parsed is None:
            return Attribution(None, None, name)
        if parsed.mac is not None:
            facts = parsed.facts if parsed.kind == "script" else ()
            found = self._found(parsed)
            if found is None:
                if parsed.kind in ("script", "grub"):
                    return Attribution(parsed.mac, None, parsed.path, facts)
                return Attribution(None, None, name)
            return Attribution(parsed.mac, found[0].name, parsed.path, facts)
        return Attribution(None, parsed.profile, name)

    def _found(self, parsed: Name) -> tuple[Profile, str, Machine | None] | None:
        """What a machine's name boots: by its MAC, else by the UUID or serial the name carries."""
        assert parsed.mac is not None
        return self.machines.for_machine(parsed.mac, parsed.fact("uuid"), parsed.fact("serial"))

    @staticmethod
    def _mac(text: str) -> str:
        try:
            return macs.exact(text)
        except macs.BadMac:
            raise BadRequest(f"invalid MAC address '{clip(text)}'") from None

    def _machine_script(self, mac: str, parsed: Name, origin: str, grub: bool = False) -> Item:
        """A machine's iPXE script, or with `grub` its GRUB configuration: the same profile, build and appends;
        for a machine whose loader named its architecture (parsed.arch), its profile's build for it. `origin`: the
        HTTP URL the machine asked at (where stage 1 downloads the image of a --fetch build)."""
        name, facts, arch = parsed.path, parsed.facts, parsed.arch
        # Asking again carries the facts again, so that a table keyed by UUID or serial added meanwhile is found.
        again = f"/machine/{macs.hyphenated(mac)}/{FACTS_PATH}/boot.ipxe"
        retry = str(RETRY_SECONDS)
        found = self._found(parsed)
        if found is None:
            where = str(self.machines.source) if self.machines.source else "the machines file"
            if grub:
                script = render("unknown.grub", mac=mac, machines=_grub_text(where), retry=retry)
            else:
                script = render("unknown.ipxe", mac=mac, machines=where, retry=retry, again=again)
            return Item(name, script.encode(), mac=mac, facts=facts)
        profile, append, machine = found
        profile = self.machines.for_arch(profile, arch)
        gen = self.profiles[profile.name].current
        if arch is not None and arch != gen.arch:
            # Never hand a machine a kernel its CPU cannot run: it would hang where nobody sees why.
            error = f"profile {profile.name} is for {gen.arch}, and this machine is {clip(arch.lstrip('?'))}"
            log.warning("mac=%s profile=%s refused: %s", mac, profile.name, error)
            if grub:
                script = render("broken.grub", mac=mac, error=_grub_text(error), retry=retry)
            else:  # asks again with its facts, or by the same name (a MAC's and _LOADER_ARCH's characters)
                script = render("broken.ipxe", mac=mac, error=_echoable(error), retry=retry,
                                again=again if facts else "/" + name.lstrip("/"))
            return Item(name, script.encode(), mac=mac, profile=profile.name)
        base = f"/machine/{macs.hyphenated(mac)}{_match(mac, machine)}/{gen.id}"
        # With base_url, the kernel, the initrd and the image come from the mirror, by content address.
        files = f"{profile.base_url}/{gen.digest}" if profile.base_url else base
        # A --fetch build: stage 1 downloads the image over HTTP by this URL, before the appends (which may
        # name another).
        image_url = (files if profile.base_url else origin + base) + "/" + IMAGE
        # GRUB knows no iPXE settings: its stage 1 asks DHCP for an address, and finds the image by its URL alone.
        fetching = (f"{IMAGE_URL}={image_url}" if grub else fetch_args(image_url)) if gen.fetch else ""
        cmdline = " ".join(x for x in (gen.cmdline, fetching, append) if x)
        overlay = ("", "# no overlay")
        if profile.overlay is not None:
            rendered = self._rendered(mac, profile, machine)
            if isinstance(rendered, Broken):
                if grub:
                    script = render("broken.grub", mac=mac, error=_grub_text(rendered.error), retry=retry)
                else:
                    script = render("broken.ipxe", mac=mac, error=_echoable(rendered.error), retry=retry, again=again)
                return Item(name, script.encode(), mac=mac, profile=profile.name, facts=facts)
            # A second initrd: unpacked after the first, so its files win.
            overlay = (" initrd=overlay", f"initrd --name overlay {base}/overlay")
        if grub:
            return Item(name, self._grub_config(mac, profile, gen, cmdline, base).encode(), mac=mac,
                        profile=profile.name)
        script = render(
            "machine.ipxe", mac=mac, profile=profile.name, system=gen.system, cmdline=cmdline, files=files,
            kernel=gen.kernel, overlay_arg=overlay[0], overlay_initrd=overlay[1],
            binary=self._binary(ipxe_binary(profile, machine)),
        )
        return Item(name, script.encode(), mac=mac, profile=profile.name, facts=facts)

    def _binary(self, binary: str) -> str:
        """The script's lines that bring the machine into the iPXE binary it chose (see _DRIVERS)."""
        if binary not in _DRIVERS:
            return f"# the iPXE binary: {binary or 'any'} (chosen over DHCP)"
        if binary not in self.binaries:
            return f"echo netboot: {binary} is not installed (Debian's ipxe package): booting with this iPXE"
        platform, drivers = _DRIVERS[binary]
        tests = " || ".join(f"iseq ${{netX/chip}} {driver}" for driver in drivers)
        return (f"iseq ${{platform}} {platform} || goto netboot_binary\n"
                f"{tests} || chain /{binary}\n"
                ":netboot_binary")

    def _grub_config(self, mac: str, profile: Profile, gen: Generation, cmdline: str, base: str) -> str:
        """GRUB fetches from this server (a base_url mirror is iPXE's): over HTTP when it can, else TFTP."""
        where = dict(mac=mac, profile=profile.name, system=gen.system, files=base, retry=str(RETRY_SECONDS),
                     http_host=self.http_host, http_port=str(self.http_port))
        if profile.loader == "uki" and UKI in gen.files:
            return render("uki.grub", **where)
        # GRUB loads the initrds one after the other into one: the overlay's files win, as under iPXE.
        overlay = f" ${{netboot_files}}{base}/overlay" if profile.overlay is not None else ""
        return render("machine.grub", cmdline=grub_words(cmdline), overlay=overlay, kernel=gen.kernel, **where)

    def _rendered(self, mac: str, profile: Profile, machine: Machine | None) -> Rendered | Broken:
        listed = machine is not None and machine.mac == mac
        found = self.overlays.for_machine(mac, profile, listed=listed, machine=None if listed else machine)
        if isinstance(found, tuple):
            raise Pending(*found)
        return found

    def _overlay(self, mac: str, profile: Profile, gen: Generation, machine: Machine | None) -> bytes:
        if profile.overlay is None:
            raise NotFound(f"profile {profile.name} has no overlay")
        rendered = self._rendered(mac, profile, machine)
        if isinstance(rendered, Broken):
            raise NotFound(f"{mac} has no overlay: {rendered.error}")
        found = self.overlays.packed(rendered, gen.packing)
        if isinstance(found, tuple):
            raise Pending(*found)
        return found


def _facts(segments: list[str]) -> tuple[tuple[str, str], ...] | None:
    """The facts of a machine's name (`key=value` segments, FACT_KEYS), or None if a segment is none of them. A
    segment that is not `key=value` continues the value before it: a "/" of the value, decoded by iPXE or by
    aiohttp before the name was split (see FACTS_PATH). Empty values (what iPXE does not know) are left out."""
    found: dict[str, str] = {}
    last = None
    for segment in segments:
        key, equals, value = segment.partition("=")
        if equals and key in FACT_KEYS:
            found[key] = value
            last = key
        elif last is not None:
            found[last] += "/" + segment
        else:
            return None
    return tuple((key, value.strip()) for key, value in found.items() if value.strip())


def _arch_said(facts: tuple[tuple[str, str], ...]) -> str | None:
    """The architecture a script's name says by iPXE's ${buildarch}; None for x86 (x86_64, or i386: iPXE for
    BIOS runs on x86_64 machines), which a profile's own build serves, and when iPXE did not say."""
    said = next((value for key, value in facts if key == "buildarch"), "")
    if said in ("", "x86_64", "i386"):
        return None
    return _loaders.machine_arch(said) or f"?{said}"


def _match(mac: str, machine: Machine | None) -> str:
    """The segment a script names its machine's files with when the machine was matched by UUID or serial, so that
    they are matched again the same way; every character but the unreserved ones escaped (RFC 3986 §2.3), so that
    iPXE expands nothing in it."""
    if machine is None or machine.mac == mac:
        return ""
    kind, value = machine.key.split(":", 1)
    return f"/{kind}={urllib.parse.quote(value, safe='')}"


def _wrong_arch(profile: Profile, gen: Generation) -> str | None:
    """Why a profile's build for one architecture (dir = { ARCH = DIR }) cannot serve it: one of another."""
    if profile.arch is not None and gen.arch != profile.arch:
        return f"profile {profile.name}: {profile.dir} holds a build for {gen.arch}, not {profile.arch}"
    return None


def _unpacked(name: str) -> NotFound:
    return NotFound(f"{clip(name)}: the overlay cannot be packed")


def _echoable(text: str) -> str:
    """One line that iPXE's echo shows as it is (no ${...} expansion)."""
    return " ".join(text.replace("$", "").split())


def _grub_text(text: str) -> str:
    """One line that GRUB shows as it is inside double quotes, where $, \\ and " are special."""
    return " ".join(text.replace("$", "").replace("\\", "").replace('"', "'").split())


_GRUB_PLAIN = re.compile(r"[A-Za-z0-9_./,=:+@%-]+")


def grub_words(cmdline: str) -> str:
    """A kernel command line as the arguments of GRUB's `linux`, for the kernel to read the same parameters.
    Split as the kernel splits it (whitespace outside double quotes, lib/cmdline.c next_arg), its quotes dropped:
    GRUB puts an argument holding a space back in double quotes itself (lib/cmdline.c grub_create_loader_cmdline),
    which the kernel reads as the same parameter. A word of other than the plainest characters is single-quoted
    for GRUB's shell, where $ ; # \\ and quotes are special."""
    words, word, quoted = [], "", False
    for c in cmdline:
        if c == '"':
            quoted = not quoted
        elif c.isspace() and not quoted:
            if word:
                words.append(word)
            word = ""
        else:
            word += c
    if word:
        words.append(word)
    return " ".join(w if _GRUB_PLAIN.fullmatch(w) else "'" + w.replace("'", "'\\''") + "'" for w in words)


def _held(gen: Generation, file: str) -> HeldFile:
    held = gen.files.get(file)
    if held is None:  # the UKI of a build made without --uki, the image of one without --fetch; another
        # architecture's kernel name
        why = " (it was not built with --fetch)" if file == IMAGE else ""
        raise NotFound(f"build {gen.id} ({gen.arch}) has no {file}{why}")
    return held
