"""The machines file: profiles (an output directory + kernel parameters) and the MACs that boot them.

    [profiles.default]            # for any MAC not listed (optional)
    dir = "out"                   # relative to this file
    append = "console=ttyS0"
    [machines."52:54:00:12:34:56"]
    profile = "rescue"            # default: "default"
    append = "hostname=node1"
    ip = "192.0.2.42"             # reserved address (netboot serve --dhcp START-END)
    hostname = "node1"            # DHCP option 12
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from netboot.errors import NetbootError
from netboot.serve import mac as macs

DEFAULT = "default"


@dataclass(frozen=True)
class Profile:
    name: str
    dir: Path
    append: str = ""


@dataclass(frozen=True)
class Machine:
    mac: str  # normalized
    profile: str
    append: str = ""
    ip: str = ""  # reserved IPv4 address, handed out by the authoritative DHCP mode
    hostname: str = ""


@dataclass(frozen=True)
class Machines:
    profiles: dict[str, Profile]
    machines: dict[str, Machine] = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def single(cls, out: Path) -> Machines:
        """`--dir OUT`: every machine boots OUT."""
        return cls({DEFAULT: Profile(DEFAULT, _checked_dir(out, f"--dir {out}"))})

    def for_mac(self, mac: str) -> tuple[Profile, str] | None:
        """The profile a machine boots and its full extra kernel parameters, or None if it has none."""
        machine = self.machines.get(mac)
        if machine is None:
            profile = self.profiles.get(DEFAULT)
            return (profile, profile.append) if profile else None
        profile = self.profiles[machine.profile]
        return profile, " ".join(x for x in (profile.append, machine.append) if x)

    @classmethod
    def load(cls, path: Path) -> Machines:
        try:
            text = path.read_text()
        except OSError as e:
            raise NetbootError(f"cannot read machines file {path}: {e.strerror}") from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise NetbootError(f"{path}: invalid TOML: {e}") from None
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
            _only(entry, {"dir", "append"}, ref, where)
            if not isinstance(entry.get("dir"), str):
                raise NetbootError(f"{at}: {ref} needs dir = \"<an output directory of netboot build>\"")
            directory = _checked_dir(path.parent / entry["dir"], f"{at}: {ref}: dir {entry['dir']!r}")
            profiles[name] = Profile(name, directory, _append(entry, ref, where, ref))

        if not profiles:
            raise NetbootError(f"{path}: no [profiles.NAME] defined")
        machines: dict[str, Machine] = {}
        spelled: dict[str, str] = {}
        reserved: dict[str, str] = {}
        for key, entry in _table(data, "machines", where).items():
            ref = f"machines.{key!r}"
            try:
                mac = macs.normalize(key)
            except macs.BadMac as e:
                raise NetbootError(f"{where.of(key)}: {ref}: {e}") from None
            if mac in spelled:
                raise NetbootError(
                    f"{where.of(key)}: {ref} is the same machine as machines.{spelled[mac]!r} ({mac})"
                )
            spelled[mac] = key
            if not isinstance(entry, dict):
                raise NetbootError(f"{where.of(key)}: {ref} must be a table")
            _only(entry, {"profile", "append", "ip", "hostname"}, ref, where)
            profile = entry.get("profile", DEFAULT)
            if profile not in profiles:
                raise NetbootError(f"{where.of(key)}: {ref}: profile {profile!r} is not defined in [profiles]")
            ip = _ip(entry, ref, where, key)
            if ip and ip in reserved:
                raise NetbootError(f"{where.of(key)}: {ref}: ip {ip} is already reserved for machines.{reserved[ip]!r}")
            if ip:
                reserved[ip] = key
            hostname = _hostname(entry, ref, where, key)
            machines[mac] = Machine(mac, profile, _append(entry, ref, where, key), ip, hostname)
        return cls(profiles, machines, path)


class _Locator:
    """Line numbers for messages: tomllib reports them only for syntax errors, so look for the key's text."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def of(self, key: str) -> str:
        for i, line in enumerate(self.lines, 1):
            if key in line and not line.lstrip().startswith("#"):
                return f"{self.path}:{i}"
        return str(self.path)


def _table(data: dict, name: str, where: _Locator) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise NetbootError(f"{where.of(name)}: {name} must be a table")
    return value


def _only(entry: dict, allowed: set[str], ref: str, where: _Locator) -> None:
    for key in entry:
        if key not in allowed:
            raise NetbootError(f"{where.of(key)}: {ref}: unknown key {key!r} (expected {', '.join(sorted(allowed))})")


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


def _checked_dir(directory: Path, what: str) -> Path:
    if not (directory / "manifest.json").is_file():
        if not directory.is_dir():
            raise NetbootError(f"{what} does not exist")
        raise NetbootError(f"{what} has no manifest.json; is it an output of netboot build?")
    return directory.absolute()
