"""The machines file: profiles (an output directory + kernel parameters) and the MACs that boot them.

    [profiles.default]            # for any MAC not listed (optional)
    dir = "out"                   # relative to this file; or one build per architecture, the machine's chosen
                                  # by its DHCP architecture: dir = { x86_64 = "out", arm64 = "out-arm64" }
                                  # or instead:
    # system = "/nix/var/nix/profiles/rack"   # built by netboot serve, rebuilt when it moves (autobuild.py)
    # format = "squashfs"; compress = "zstd"; level = 10   # its build's options (netboot build's)
    append = "console=ttyS0"
    overlay = "overlays/rack"     # files each machine gets its own copy of; *.j2 are templates (overlay.py)
    vars = { domain = "lab" }     # the overlay's template variables for every machine of the profile
    base_url = "http://mirror/nb" # kernel and initrd from a tree made by netboot publish (publish.py)
    loader = "grub"               # what UEFI machines boot first: "ipxe" (default), or shim and GRUB (loaders.py):
                                  # "grub" (kernel + initrds), "uki" (the build's signed netboot.efi)
    [machines."52:54:00:12:34:56"]
    profile = "rescue"            # default: "default"
    append = "hostname=node1"
    ip = "192.0.2.42"             # reserved address (netboot serve --dhcp START-END)
    hostname = "node1"            # DHCP option 12
    role = "db"                   # any other key: a template variable of its profile's overlay
    [machines."uuid:4c4c4544-0042-3510-8052-b4c04f4d3532"]   # or by SMBIOS UUID, or "serial:<SERIAL>"
    ipxe_binary = "snponly.efi"   # on a machine or a profile: the iPXE binary it boots (see IPXE_BINARIES)

A machine is found by its MAC, else by its SMBIOS UUID, else by its serial number (`Machines.find`): the UUID and
serial are what iPXE reports in the name of its script (server/namespace.py) or DHCP option 97 (the UUID).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import uuid as uuids
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netboot.core import artifacts, compress, loaders
from netboot.core import mac as macs
from netboot.core.errors import NetbootError
from netboot.core.logtext import clip

DEFAULT = "default"


PROFILE_KEYS = {"dir", "system", "format", "compress", "level", "append", "overlay", "vars", "base_url", "loader",
                "ipxe_binary"}
BUILD_KEYS = ("format", "compress", "level")  # netboot build's options, for a profile with a system
MACHINE_KEYS = {"profile", "append", "ip", "hostname", "ipxe_binary"}
# The iPXE binaries a machine or a profile may choose (Debian's ipxe package): undionly.kpxe for BIOS, ipxe.efi
# (iPXE's own NIC drivers) or snponly.efi (the firmware's network driver) for UEFI.
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")
UUID, SERIAL = "uuid:", "serial:"  # machine tables keyed by what the machine is, not by its MAC


@dataclass(frozen=True)
class Profile:
    name: str
    dir: Path
    append: str = ""
    overlay: Path | None = None  # a directory of files (and *.j2 templates) for each machine
    vars: dict[str, Any] = field(default_factory=dict)  # the overlay's variables for every machine
    base_url: str = ""  # where `netboot publish` put this profile's builds: the kernel and initrd come from there
    system: Path | None = None  # a Nix profile or store path that netboot serve builds into `dir` itself
    build_args: tuple[str, ...] = ()  # its netboot build options
    loader: str = "ipxe"  # what its UEFI machines boot first (loaders.LOADERS)
    ipxe_binary: str = ""  # the iPXE binary its machines boot (one of IPXE_BINARIES), unless a machine says
    # dir = { ARCH = DIR, ... }: the profile serving each architecture (this one for the first, a variant named
    # variant_name(name, ARCH) for each other), and the architecture this profile's dir was named for.
    variants: dict[str, str] = field(default_factory=dict)
    arch: str | None = None


@dataclass(frozen=True)
class Machine:
    mac: str  # normalized; "" for a table keyed by UUID or serial
    profile: str
    append: str = ""
    ip: str = ""  # reserved IPv4 address, handed out by the authoritative DHCP mode
    hostname: str = ""
    vars: dict[str, Any] = field(default_factory=dict)  # its table's other keys, for its profile's overlay
    ipxe_binary: str = ""
    key: str = ""  # its table's key, normalized: the MAC, "uuid:<uuid>" or "serial:<serial as written>"

    @property
    def matched_by(self) -> str:
        """"mac", "uuid" or "serial": what its table is keyed by."""
        return "mac" if self.mac else self.key.split(":", 1)[0]


def template_vars(mac: str, profile: Profile, machine: Machine | None) -> dict[str, Any]:
    """An overlay's variables for one machine: the profile's vars, then the machine's own keys, then what
    netboot knows of it (a machine not in the file has no hostname or ip)."""
    return {**profile.vars, **(machine.vars if machine else {}), "mac": mac,
            "hostname": machine.hostname if machine else "", "ip": machine.ip if machine else "",
            "profile": profile.name}


def ipxe_binary(profile: Profile, machine: Machine | None) -> str:
    """The iPXE binary a machine boots: its own choice, else its profile's; "" for the server's default."""
    return (machine.ipxe_binary if machine else "") or profile.ipxe_binary


def uuid_key(text: str) -> str | None:
    """An SMBIOS UUID in the spelling iPXE's ${uuid} shows (lower case, hyphenated), or None if it is not one."""
    try:
        return str(uuids.UUID(text.strip()))
    except ValueError:
        return None


def serial_key(text: str) -> str:
    """What serial numbers are compared by: without surrounding blanks, case folded (operators type them either
    way)."""
    return text.strip().casefold()


@dataclass(frozen=True)
class Machines:
    profiles: dict[str, Profile]
    machines: dict[str, Machine] = field(default_factory=dict)  # by MAC
    source: Path | None = None
    by_uuid: dict[str, Machine] = field(default_factory=dict)  # tables keyed uuid:…, by uuid_key()
    by_serial: dict[str, Machine] = field(default_factory=dict)  # tables keyed serial:…, by serial_key()
    from_database: frozenset[str] = frozenset()  # MACs whose tables are the site database's (with_tables)

    @classmethod
    def single(cls, out: Path) -> Machines:
        """`--dir OUT`: every machine boots OUT."""
        return cls({DEFAULT: Profile(DEFAULT, _checked_dir(out, f"--dir {out}"))})

    def for_arch(self, profile: Profile, arch: str | None) -> Profile:
        """The profile that serves `profile`'s machines of `arch` (itself when it names one build)."""
        name = profile.variants.get(arch) if arch is not None else None
        return self.profiles[name] if name is not None else profile

    def variants_of(self, profile: Profile) -> list[Profile]:
        """`profile` and the profiles serving its other architectures."""
        return [profile, *(self.profiles[n] for n in profile.variants.values() if n != profile.name)]

    def find(self, mac: str, uuid: str = "", serial: str = "") -> Machine | None:
        """A machine's table: by its MAC, else by its SMBIOS UUID, else by its serial number."""
        machine = self.machines.get(mac)
        if machine is None and uuid and self.by_uuid:
            machine = self.by_uuid.get(uuid_key(uuid) or "")
        if machine is None and serial and self.by_serial:
            machine = self.by_serial.get(serial_key(serial))
        return machine

    def for_machine(self, mac: str, uuid: str = "", serial: str = "") -> tuple[Profile, str, Machine | None] | None:
        """The profile a machine boots, its full extra kernel parameters and its table (None: the default
        profile's machine), or None if it has no profile."""
        machine = self.find(mac, uuid, serial)
        if machine is None:
            profile = self.profiles.get(DEFAULT)
            return (profile, profile.append, None) if profile else None
        profile = self.profiles[machine.profile]
        return profile, " ".join(x for x in (profile.append, machine.append) if x), machine

    def for_mac(self, mac: str) -> tuple[Profile, str] | None:
        """The profile a machine boots and its full extra kernel parameters, or None if it has none."""
        found = self.for_machine(mac)
        return found[:2] if found else None

    @classmethod
    def load(cls, path: Path, state_dir: Path | None = None) -> Machines:
        """Read a machines file; profiles with a system get their output directory in `state_dir`."""
        try:
            text = path.read_text()
        except OSError as e:
            raise NetbootError(f"cannot read machines file {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise NetbootError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.parse(text, path, state_dir)

    @classmethod
    def parse(cls, text: str, path: Path, state_dir: Path | None = None) -> Machines:
        """A machines file's text, checked as `load` checks it (`path`: where it lives, for relative dirs and
        messages)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise NetbootError(_unquoted_mac(text, path, str(e)) or f"{path}: invalid TOML: {e}") from None
        where = _Locator(path, text)
        unknown = set(data) - {"profiles", "machines"}
        if unknown:
            key = sorted(unknown)[0]
            raise NetbootError(f"{where.of(key)}: unknown section {key!r} (expected profiles and machines)")

        profiles: dict[str, Profile] = {}
        for name, entry in _table(data, "profiles", where).items():
            ref = f"profiles.{name}"
            at = where.of(ref)
            if not isinstance(entry, dict):
                raise NetbootError(f"{at}: {ref} must be a table")
            _only(entry, PROFILE_KEYS, ref, where)
            loader = _loader(entry, ref, at)
            system, build_args = _system(entry, ref, at)
            if system is not None and loader == "uki":
                build_args += ("--uki",)
            if system is not None:
                if state_dir is None:
                    raise NetbootError(f"{at}: {ref}: a system needs a state directory to be built into")
                directory = (state_dir / "profiles" / name).absolute()
            elif isinstance(entry.get("dir"), dict):
                per_arch = _arch_dirs(entry["dir"], path.parent, ref, at)
                directory = per_arch.get("x86_64") or next(iter(per_arch.values()))
            elif not isinstance(entry.get("dir"), str):
                raise NetbootError(f"{at}: {ref} needs dir = \"<an output directory of netboot build>\" or "
                                   "system = \"<a Nix profile or store path>\"")
            else:
                directory = _checked_dir(path.parent / entry["dir"], f"{at}: {ref}: dir {entry['dir']!r}")
            overlay = _overlay(entry, path.parent, ref, at)
            variables = entry.get("vars", {})
            if not isinstance(variables, dict):
                raise NetbootError(f"{at}: {ref}: vars must be a table of template variables")
            if "vars" in entry and overlay is None:
                raise NetbootError(f"{at}: {ref}: vars are for an overlay, and it has none")
            if loader == "uki":
                _sealed(entry, f"{at}: {ref}")
            profile = Profile(name, directory, _append(entry, ref, where, ref), overlay, variables,
                              _base_url(entry, ref, at), system, build_args, loader,
                              _ipxe_binary(entry, ref, at))
            if not isinstance(entry.get("dir"), dict):
                profiles[name] = profile
                continue
            # One profile per build, each checked to be of its architecture once its manifest is read.
            # The profile's own name serves x86_64 when it has a build for it: machines that do not say their
            # architecture (BIOS iPXE, a configuration asked for by name) are x86 PCs.
            first = "x86_64" if "x86_64" in per_arch else next(iter(per_arch))
            variants = {arch: name if arch == first else variant_name(name, arch) for arch in per_arch}
            for arch, directory in per_arch.items():
                if variants[arch] != name and (variants[arch] in profiles or
                                               variants[arch] in _table(data, "profiles", where)):
                    raise NetbootError(f"{at}: {ref}: dir.{arch} needs the name {variants[arch]!r}, which another "
                                       "profile has")
                profiles[variants[arch]] = replace(profile, name=variants[arch], dir=directory, variants=variants,
                                                   arch=arch)

        if not profiles:
            raise NetbootError(f"{path}: no [profiles.NAME] defined")
        machines: dict[str, Machine] = {}
        by_uuid: dict[str, Machine] = {}
        by_serial: dict[str, Machine] = {}
        spelled: dict[str, str] = {}
        reserved: dict[str, str] = {}
        for key, entry in _table(data, "machines", where).items():
            ref = f"machines.{key!r}"
            at = where.machine(key)
            machine, identity = _machine(key, entry, profiles, where)
            if identity in spelled:
                raise NetbootError(
                    f"{at}: {ref} is the same machine as machines.{spelled[identity]!r} ({identity})"
                )
            spelled[identity] = key
            if machine.ip and machine.ip in reserved:
                raise NetbootError(f"{at}: {ref}: ip {machine.ip} is already reserved for "
                                   f"machines.{reserved[machine.ip]!r}")
            if machine.ip:
                reserved[machine.ip] = key
            if machine.mac:
                machines[machine.mac] = machine
            elif identity.startswith(UUID):
                by_uuid[identity.removeprefix(UUID)] = machine
            else:
                by_serial[serial_key(identity.removeprefix(SERIAL))] = machine
        return cls(profiles, machines, path, by_uuid, by_serial)

    def with_tables(self, tables: Mapping[str, dict[str, Any] | None], strict: bool = True,
                    ) -> tuple[Machines, list[str]]:
        """These machines with the site database's tables laid over them (netboot.state.machine_tables): by MAC,
        each a table as the machines file has it, or None for a machine removed. A table that does not load with
        this file's profiles is an error (`strict`), or is left out and its error returned: the file's table of
        that machine, if any, stays."""
        machines = dict(self.machines)
        reserved = {m.ip: mac for mac, m in machines.items() if m.ip}
        where = _Locator("the database", "")
        errors: list[str] = []
        ours: set[str] = set()
        for mac, table in sorted(tables.items()):
            held = machines.pop(mac, None)
            if held is not None and held.ip:
                del reserved[held.ip]
            try:
                if table is None:
                    continue
                machine, _ = _machine(mac, table, self.profiles, where)
                if machine.mac != mac:
                    raise NetbootError(f"the database: machines.{mac!r}: not a MAC address as netboot writes it")
                if machine.ip and machine.ip in reserved:
                    raise NetbootError(f"the database: machines.{mac!r}: ip {machine.ip} is already reserved for "
                                       f"machines.{reserved[machine.ip]!r}")
            except NetbootError as e:
                if strict:
                    raise
                errors.append(str(e))
                machine = held  # type: ignore[assignment]
                if machine is None:
                    continue
            else:
                ours.add(mac)
            machines[mac] = machine
            if machine.ip:
                reserved[machine.ip] = mac
        return replace(self, machines=machines, from_database=frozenset(ours)), errors


def _machine(key: str, entry: Any, profiles: dict[str, Profile], where: _Locator) -> tuple[Machine, str]:
    """A machine's table checked against the profiles, and what tells it apart from every other (_identity)."""
    ref = f"machines.{key!r}"
    at = where.machine(key)
    mac, identity, normalized = _identity(key, ref, where)
    if not isinstance(entry, dict):
        raise NetbootError(f"{at}: {ref} must be a table")
    profile = entry.get("profile", DEFAULT)
    if profile not in profiles and "profile" not in entry:
        # A table that names no profile boots the default one; with none defined, a misspelt key (profle)
        # is the likelier mistake, and the one to name.
        _only(entry, MACHINE_KEYS, ref, where, "; it names no profile, and there is no [profiles.default]",
              at=where.machine_line(key))
        raise NetbootError(f"{at}: {ref} names no profile, and there is no [profiles.default]: add profile = "
                           f"\"NAME\" (one of {', '.join(sorted(profiles))}) or define [profiles.default]")
    if profile not in profiles:
        raise NetbootError(f"{at}: {ref}: profile {profile!r} is not defined in [profiles]")
    if profiles[profile].overlay is None:
        _only(entry, MACHINE_KEYS, ref, where, f"; other keys are variables of an overlay, and profile "
                                                f"{profile!r} has none", at=where.machine_line(key))
    elif "mac" in entry:
        raise NetbootError(f"{at}: {ref}: mac is the table's name; it cannot be set here")
    if profiles[profile].loader == "uki":
        _sealed(entry, f"{at}: {ref}")
    ip = _ip(entry, ref, where, key)
    if ip and not mac:
        raise NetbootError(f"{at}: {ref}: ip reserves an address for a MAC (DHCP knows no "
                           "serial numbers, nor UUIDs before the address); key this machine by its MAC")
    hostname = _hostname(entry, ref, where, key)
    variables = {k: v for k, v in entry.items() if k not in MACHINE_KEYS}
    machine = Machine(mac, profile, _append(entry, ref, where, key), ip, hostname, variables,
                      _ipxe_binary(entry, ref, at), normalized)
    return machine, identity


def _identity(key: str, ref: str, where: _Locator) -> tuple[str, str, str]:
    """A machine table's key: its MAC or "", what tells it apart from every other table (the MAC, or the UUID or
    serial as they are compared), and the key normalized (Machine.key)."""
    if key.startswith(UUID):
        found = uuid_key(key.removeprefix(UUID))
        if found is None:
            raise NetbootError(f"{where.of(key)}: {ref}: {key.removeprefix(UUID)!r} is not a UUID")
        return "", UUID + found, UUID + found
    if key.startswith(SERIAL):
        serial = key.removeprefix(SERIAL).strip()
        if not serial or any(not c.isprintable() for c in serial):
            raise NetbootError(f"{where.of(key)}: {ref}: a serial number must be printable text")
        # Two spellings of one serial (case, blanks) are one machine: the folded spelling tells them apart.
        return "", SERIAL + serial_key(serial), SERIAL + serial
    try:
        mac = macs.normalize(key)
    except macs.BadMac as e:
        raise NetbootError(f"{where.of(key)}: {ref}: {e} (or key it uuid:<UUID> or serial:<SERIAL>)") from None
    return mac, mac, mac


def _ipxe_binary(entry: dict, ref: str, at: str) -> str:
    value = entry.get("ipxe_binary", "")
    if value != "" and value not in IPXE_BINARIES:
        raise NetbootError(f"{at}: {ref}: ipxe_binary {value!r} is not one of {', '.join(IPXE_BINARIES)}")
    return value


class _Locator:
    """Line numbers for messages: tomllib reports them only for syntax errors, so look for the key's text."""

    def __init__(self, path: Path | str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def of(self, key: str, start: int = 0) -> str:
        """Where `key` first appears, on line `start` (0-based) or after; the file alone if it does not."""
        found = self._line(key, start)
        return str(self.path) if found is None else f"{self.path}:{found + 1}"

    def _line(self, key: str, start: int) -> int | None:
        for i in range(start, len(self.lines)):
            if key in self.lines[i] and not self.lines[i].lstrip().startswith("#"):
                return i
        return None

    def machine_line(self, key: str) -> int:
        """The line (0-based) where the table of machine `key` starts: the first with its key in the machines
        section, whose keys may also be written anywhere before it (in a comment-less `append`, say)."""
        section = next((i for i, line in enumerate(self.lines) if _MACHINES_SECTION.match(line)), 0)
        found = self._line(key, section)
        return section if found is None else found

    def machine(self, key: str) -> str:
        return self.of(key, self.machine_line(key))


_MACHINES_SECTION = re.compile(r"\s*(\[\s*machines\s*[.\]]|machines\s*[.=])")
# A MAC in the colon spelling, outside quotes: TOML's bare keys are letters, digits, - and _, so
# [machines.52:54:00:12:34:56] does not parse.
_BARE_MAC = re.compile(r"(?<![\w:-])[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}(?![\w:])")
_QUOTED = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


def _unquoted_mac(text: str, path: Path, error: str) -> str | None:
    """The message for a syntax error whose line holds a MAC address outside quotes, with that line as it should
    be written; None for any other syntax error."""
    at = re.search(r"\(at line (\d+), column \d+\)", error)
    lines = text.splitlines()
    if at is None or not 1 <= int(at.group(1)) <= len(lines):
        return None
    line = lines[int(at.group(1)) - 1]
    code = _QUOTED.sub(lambda m: " " * len(m.group(0)), line).split("#", 1)[0]  # (offsets kept: `line`'s)
    found = _BARE_MAC.search(code)
    if found is None:
        return None
    fixed = line[: found.start()] + f'"{found.group(0)}"' + line[found.end():]
    return (f"{path}:{at.group(1)}: a MAC address must be quoted in TOML (its colons are not allowed in a bare key): "
            f"{clip(fixed.strip(), 100)}")


def _table(data: dict, name: str, where: _Locator) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise NetbootError(f"{where.of(name)}: {name} must be a table")
    return value


def _only(entry: dict, allowed: set[str], ref: str, where: _Locator, more: str = "", at: int = 0) -> None:
    """Refuse a key not `allowed`, named at its line on line `at` (0-based, its table's) or after."""
    for key in entry:
        if key not in allowed:
            raise NetbootError(
                f"{where.of(key, at)}: {ref}: unknown key {key!r} (expected {', '.join(sorted(allowed))}{more})"
            )


def _system(entry: dict, ref: str, at: str) -> tuple[Path | None, tuple[str, ...]]:
    """A profile's system and its build options, checked the way netboot build checks them."""
    value = entry.get("system")
    if value is None:
        given = [k for k in BUILD_KEYS if k in entry]
        if given:
            raise NetbootError(f"{at}: {ref}: {given[0]} is a build option, for a profile with a system "
                               "(a dir was built with its own)")
        return None, ()
    if "dir" in entry:
        raise NetbootError(f"{at}: {ref}: give either dir or system, not both")
    if not isinstance(value, str) or not value.startswith("/"):
        raise NetbootError(f"{at}: {ref}: system must be the absolute path of a Nix profile or store path")
    args: list[str] = []
    fmt = entry.get("format")
    if fmt is not None:
        if fmt not in artifacts.FORMATS:
            raise NetbootError(f"{at}: {ref}: format {fmt!r} is not one of {', '.join(artifacts.FORMATS)}")
        args += ["--format", fmt]
    name = entry.get("compress")
    level = entry.get("level")
    try:
        if name is not None:
            if not isinstance(name, str):
                raise NetbootError("compress must be a compressor's name")
            args += ["--compress", compress.get(name).name]
        if level is not None:
            if not isinstance(level, int) or isinstance(level, bool):
                raise NetbootError("level must be an integer")
            compress.get(name or artifacts.DEFAULT_COMPRESSION[fmt or "squashfs"]).check_level(level)
            args += ["--level", str(level)]
    except NetbootError as e:
        raise NetbootError(f"{at}: {ref}: {e}") from None
    return Path(value), tuple(args)


def _loader(entry: dict, ref: str, at: str) -> str:
    value = entry.get("loader", "ipxe")
    if value not in loaders.LOADERS:
        raise NetbootError(f"{at}: {ref}: loader {value!r} is not one of {', '.join(loaders.LOADERS)}")
    return value


def _sealed(entry: dict, where: str) -> None:
    """A unified kernel image carries its initrd and command line inside its signature: nothing can be added to
    them per profile or per machine (systemd-stub ignores a loader's command line under Secure Boot)."""
    if "overlay" in entry:
        raise NetbootError(f"{where}: an overlay cannot reach the machines of a uki profile: the unified kernel "
                           "image's initrd is signed with it (use loader = \"grub\" for overlays)")
    if entry.get("append"):
        raise NetbootError(f"{where}: append cannot reach the machines of a uki profile: the unified kernel "
                           "image's command line is signed with it (netboot build --append)")


def _base_url(entry: dict, ref: str, at: str) -> str:
    value = entry.get("base_url", "")
    if value == "":
        return ""
    if (not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/$]+(/\S*)?", value) or "${" in value):
        raise NetbootError(f"{at}: {ref}: base_url {value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def _overlay(entry: dict, base: Path, ref: str, at: str) -> Path | None:
    value = entry.get("overlay")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise NetbootError(f"{at}: {ref}: overlay must name a directory")
    directory = base / value
    if not directory.is_dir():
        raise NetbootError(f"{at}: {ref}: overlay {value!r} is not a directory")
    return directory.absolute()


def _append(entry: dict, ref: str, where: _Locator, key: str) -> str:
    value = entry.get("append", "")
    if not isinstance(value, str) or any(c in value for c in "\n\r\0") or "${" in value:
        raise NetbootError(f"{where.of(key)}: {ref}: append must be one line of kernel parameters")
    return value.strip()


def _ip(entry: dict, ref: str, where: _Locator, key: str) -> str:
    value = entry.get("ip", "")
    if value == "":
        return ""
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise NetbootError(f"{where.of(key)}: {ref}: ip {value!r} is not an IPv4 address") from None


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _hostname(entry: dict, ref: str, where: _Locator, key: str) -> str:
    """RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens."""
    value = entry.get("hostname", "")
    if value == "":
        return ""
    if not isinstance(value, str) or len(value) > 253 or not all(_LABEL.fullmatch(x) for x in value.split(".")):
        raise NetbootError(f"{where.of(key)}: {ref}: hostname {value!r} is not a valid host name")
    return value


def variant_name(profile: str, arch: str) -> str:
    """The profile that serves `profile`'s machines of `arch`, besides the one of its first build."""
    return f"{profile}@{arch}"


def _arch_dirs(table: dict, base: Path, ref: str, at: str) -> dict[str, Path]:
    """dir = { x86_64 = "out", arm64 = "out-arm64" }: each architecture's build, the first the profile's own."""
    if not table:
        raise NetbootError(f"{at}: {ref}: dir = {{}} names no build (one per architecture: "
                           f"{', '.join(f'{a} = DIR' for a in artifacts.ARCHES)})")
    found: dict[str, Path] = {}
    for arch, value in table.items():
        if arch not in artifacts.ARCHES:
            raise NetbootError(f"{at}: {ref}: dir.{arch}: unknown architecture (expected "
                               f"{', '.join(artifacts.ARCHES)})")
        if not isinstance(value, str):
            raise NetbootError(f"{at}: {ref}: dir.{arch} must be an output directory of netboot build")
        found[arch] = _checked_dir(base / value, f"{at}: {ref}: dir.{arch} {value!r}")
    return found


def _checked_dir(directory: Path, what: str) -> Path:
    if not (directory / "manifest.json").is_file():
        if not directory.is_dir():
            raise NetbootError(f"{what} does not exist")
        raise NetbootError(f"{what} has no manifest.json; is it an output of netboot build?")
    return directory.absolute()
