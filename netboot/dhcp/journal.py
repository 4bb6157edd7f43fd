"""The leases on disk: an append-only journal, one line per change, made durable in groups.

As Kea's memfile (a CSV file, one appended line per change, compacted by `kea-lfc` apart from the server), the
hot path never rewrites the file: each event-loop tick's changes are appended as one group and made durable
with one fdatasync in the journal's own thread (`write`), and the ACKs of that tick go out once it returns.
A group ends with a line counting its records and holding their CRC-32, so a group cut short by a crash (`kill
-9`, power) is recognised: the last group of a journal may be torn and is ignored, as Kea's memfile ignores a
torn last line; those changes were never acknowledged. Anything else that does not read is a corrupt journal:
the server does not start, says so in one line, and leaves the file as it was. Whatever a file holds, reading
it raises nothing else, and costs time linear in its size: no line is longer than MAX_LINE, and each is read by
splitting and one pass over each field (a host name is a JSON string, never any JSON value).

    dhcp-leases.journal      the active journal (generation G), appended to
    dhcp-leases.journal.2    the previous active journal, while it is being compacted
    dhcp-leases.journal.1    the compacted base: every lease as of generation `through`

At start the three are read (a journal whose generation the base already holds is skipped), and the leases are
written as a new base and a new empty active journal; a lease file of earlier versions (`dhcp-leases.json`) is
converted the same way and removed once the journal is durable. While serving, an active journal that has grown
past its leases is renamed to `.2` between two groups and a thread folds it into a new base.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from netboot.core import mac as macs
from netboot.core.durable import replace as _replace
from netboot.core.durable import sync_dir
from netboot.core.durable import write_all as _write_all
from netboot.core.errors import NetbootError
from netboot.dhcp.leases import Lease, bind, drop

log = logging.getLogger("netboot.dhcp")

JOURNAL = "dhcp-leases.journal"
LEGACY = "dhcp-leases.json"  # the lease file of earlier versions: converted at start
LOCK = LEGACY + ".lock"  # the lock earlier versions take too, so that no two servers of any version share leases
FORMAT = "netboot-dhcp-journal"
VERSION = 1
COMPACT_AFTER = 10_000  # records in the active journal before it is compacted (or as many as there are leases)
# The longest line of a journal: a record netboot writes is under 900 bytes (a MAC, an address, an expiry, a client
# identifier of at most 255 bytes in hex, a host name of at most 253 characters quoted), so anything much longer
# is damage, refused before it is parsed. A lease that would not fit is refused where it comes from (_legacy).
MAX_LINE = 4096
_MAX_WHY = 200  # characters of a problem quoted in the error: it names what is wrong, never echoes a whole line

Change = Lease | str  # a lease recorded, or the MAC whose lease is dropped


@dataclass(frozen=True)
class Kind:
    """What a journal holds: its file name and lock, how a record's key (a lease's `mac` field) and address are
    written, and the lease file of earlier versions it converts, if any. DHCPv4's leases are by MAC; DHCPv6's
    (netboot.dhcp6.leases) by DUID and IAID, in a journal of their own beside them."""

    name: str
    lock: str
    key: Callable[[str], str]  # the key as written, from anything read (raises ValueError if it is not one)
    address: Callable[[str], object]  # an orderable address from its text (raises ValueError if it is not one)
    legacy: str | None = None


V4 = Kind(JOURNAL, LOCK, macs.normalize, IPv4Address, LEGACY)  # key: a MAC


def _cut(why: object) -> str:
    text = str(why)
    return text if len(text) <= _MAX_WHY else text[:_MAX_WHY] + "..."


class _Unreadable(ValueError):
    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"line {line}: {_cut(why)}")


@dataclass(frozen=True)
class _File:
    generation: int  # of an active journal
    through: int  # of a base: the generations it holds
    groups: list[list[Change]]
    torn: bool


def _header(generation: int, through: int) -> bytes:
    return f"{FORMAT} version={VERSION} generation={generation} through={through}\n".encode()


def _encode(change: Change) -> str:
    if isinstance(change, str):
        return f"drop {change}\n"
    return (f"lease {change.mac} {change.ip} {change.expires!r} {change.client_id.hex() or '-'} "
            f"{json.dumps(change.hostname)}\n")


def _group(changes: list[Change]) -> bytes:
    records = "".join(map(_encode, changes)).encode()
    return records + f"commit {len(changes)} {zlib.crc32(records):08x}\n".encode()


def _decode(line: bytes, kind: Kind = V4) -> Change:
    words = line.decode("ascii").split(" ", 5)
    if words[0] == "drop" and len(words) == 2:
        return kind.key(words[1])
    if words[0] != "lease" or len(words) != 6:
        raise ValueError(f"not a record: {line[:40]!r}")
    _, mac, ip, expires, client_id, hostname = words
    if kind.key(mac) != mac or str(kind.address(ip)) != ip:
        raise ValueError(f"not a lease's key and address: {mac[:20]!r} {ip[:20]!r}")
    seconds = float(expires)
    # A JSON string and nothing else: given `[[[…`, json.loads would recurse once per bracket (RecursionError).
    # From its opening quote the decoder reads one string and stops, so anything after it is "Extra data".
    if not hostname.startswith('"'):
        raise ValueError(f"bad hostname: {hostname[:40]!r}")
    name = json.loads(hostname)
    if not math.isfinite(seconds) or not isinstance(name, str):
        raise ValueError(f"bad expiry or hostname: {expires[:20]!r} {hostname[:40]!r}")
    return Lease(mac, ip, seconds, name, b"" if client_id == "-" else bytes.fromhex(client_id))


def _read(path: Path, torn_allowed: bool, kind: Kind = V4) -> _File:
    """One journal file; raises _Unreadable for anything but a torn last group (where that is allowed)."""
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: a line cut short, if anything
    if not lines:
        raise _Unreadable(1, "no header")
    if len(lines[0]) > MAX_LINE:
        raise _Unreadable(1, "not a netboot lease journal")
    fields = dict(w.split(b"=", 1) for w in lines[0].split(b" ")[1:] if b"=" in w)
    if not lines[0].startswith(FORMAT.encode() + b" "):
        raise _Unreadable(1, "not a netboot lease journal")
    if fields.get(b"version") != str(VERSION).encode():
        raise _Unreadable(1, f"version {fields.get(b'version', b'?').decode(errors='replace')!r}, expected {VERSION}")
    try:
        generation, through = int(fields[b"generation"]), int(fields[b"through"])
    except (KeyError, ValueError):
        raise _Unreadable(1, "a header without generation and through") from None
    groups: list[list[Change]] = []
    pending: list[Change] = []
    raw: list[bytes] = []
    start = 1  # where the group being read starts
    problem: _Unreadable | None = None
    for number, line in enumerate(lines[1:], start=1):
        if len(line) > MAX_LINE:
            problem = _Unreadable(number + 1, f"a line of {len(line)} bytes, longer than any record ({MAX_LINE})")
            break
        if line.startswith(b"commit "):
            words = line.split(b" ")
            body = b"".join(raw)
            if len(words) != 3 or words[1] != str(len(pending)).encode() or words[2] != b"%08x" % zlib.crc32(body):
                problem = _Unreadable(number + 1, "a group whose count or CRC does not match its records")
                break
            groups.append(pending)
            pending, raw, start = [], [], number + 1
            continue
        try:
            pending.append(_decode(line, kind))
        except (ValueError, UnicodeDecodeError, macs.BadMac) as e:
            problem = _Unreadable(number + 1, str(e))
            break
        raw.append(line + b"\n")
    if problem is None and not pending and not tail.strip(b"\0"):
        return _File(generation, through, groups, torn=bool(tail))
    # What follows the last whole group: torn when it is a group cut short (at most its own commit line, last).
    rest = lines[start:]
    torn = torn_allowed and not any(line.startswith(b"commit ") for line in rest[:-1])
    if not torn:
        raise problem or _Unreadable(len(lines) + 1, "a record cut short")
    return _File(generation, through, groups, torn=True)


def _replay(files: Iterable[tuple[Path, _File]]) -> tuple[dict[str, Lease], int]:
    """The leases after the base and the journals it does not hold, and the newest generation seen."""
    by_mac: dict[str, Lease] = {}
    by_ip: dict[str, Lease] = {}
    through = newest = 0
    for path, f in files:
        if path.name.endswith(".1"):
            through = newest = f.through
        elif f.generation <= through:
            continue  # already folded into the base (a compaction stopped before removing it)
        newest = max(newest, f.generation)
        if f.torn:
            log.warning("dhcp: %s: ignored a last group of changes cut short (never acknowledged)", path)
        for group in f.groups:
            for change in group:
                if isinstance(change, str):
                    drop(by_mac, by_ip, change)
                else:
                    bind(by_mac, by_ip, change)
    return by_mac, newest


def _corrupt(path: Path, why: object) -> NetbootError:
    return NetbootError(f"{path}: corrupt lease journal ({why}); left as it is: repair or remove it to start")



def _base(leases: Iterable[Lease], through: int, kind: Kind = V4) -> bytes:
    changes: list[Change] = sorted(leases, key=lambda x: kind.address(x.ip))  # type: ignore[arg-type,return-value]
    return _header(0, through) + (_group(changes) if changes else b"")


class Journal:
    """The lease store of netboot.dhcp.leases (LeaseStore): the journal files in `directory`, locked so that
    two servers never share them."""

    def __init__(self, directory: Path, kind: Kind = V4) -> None:
        self.directory = directory
        self.kind = kind
        self.path = directory / kind.name
        self.base = directory / (kind.name + ".1")
        self.rotated = directory / (kind.name + ".2")
        self.legacy = directory / kind.legacy if kind.legacy is not None else None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(directory / kind.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise NetbootError(f"--state-dir {directory}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise NetbootError(f"--state-dir {directory} is in use by another netboot serve") from None
        self._fd = -1
        self._generation = 0
        self._changes: list[Change] = []
        self._records = 0  # in the active journal
        self._leases = 0  # at the last compaction
        self._compactor: threading.Thread | None = None

    # At start

    def load(self) -> list[Lease]:
        """Read the journal (or convert the lease file of earlier versions), then start a new base and an empty
        active journal. Nothing is written unless everything read."""
        legacy = self.legacy is not None and self.legacy.exists()
        journal = any(p.exists() for p in (self.base, self.rotated, self.path))
        if journal:  # a lease file beside it is what was converted when a start stopped before removing it
            leases, newest = read(self.directory, self.kind)
        else:
            leases, newest = (_legacy(self.legacy) if self.legacy is not None and legacy else {}), 0
        try:
            _replace(self.base, _base(leases.values(), newest, self.kind))
            sync_dir(self.directory)
            with contextlib.suppress(FileNotFoundError):
                self.rotated.unlink()
            self._generation = newest + 1
            _replace(self.path, _header(self._generation, 0))
            sync_dir(self.directory)
            if self.legacy is not None and legacy:
                self.legacy.unlink()  # only now: the journal holds every lease durably
                sync_dir(self.directory)
                if not journal:
                    log.info("dhcp: converted %s to %s (%d leases)", self.legacy, self.path, len(leases))
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise NetbootError(f"cannot write the lease journal in {self.directory}: {e.strerror}") from None
        self._leases = len(leases)
        return list(leases.values())

    # On the event loop

    def record(self, lease: Lease) -> None:
        self._changes.append(lease)

    def forget(self, mac: str) -> None:
        self._changes.append(mac)

    def take(self) -> list[Change] | None:
        if not self._changes:
            return None
        batch, self._changes = self._changes, []
        return batch

    def restore(self, batch: object) -> None:
        assert isinstance(batch, list)
        self._changes[:0] = batch

    # In the journal's thread

    def write(self, batch: object) -> None:
        """Append one group and make it durable; on failure the journal is cut back to where it was."""
        assert isinstance(batch, list)
        data = _group(batch)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            _write_all(self._fd, data)
            os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)
            raise
        self._records += len(batch)
        if (self._records > max(COMPACT_AFTER, self._leases) and self._compactor is None
                and not self.rotated.exists()):  # a `.2` not folded yet (a compaction failed): the next start will
            try:
                self._rotate()
            except OSError as e:  # the group is durable; the journal goes on as it was, to be compacted later
                log.warning("dhcp: cannot start compacting the lease journal: %s", e)

    def flush(self) -> None:
        """Write what was recorded, here and now (at close, and in tests)."""
        batch = self.take()
        if batch is not None:
            self.write(batch)

    def _rotate(self) -> None:
        """The active journal becomes `.2`, folded into the base by a thread; a new one takes the changes. The new
        one is made first, so that a failure before the renames changes nothing."""
        fresh = self.path.with_name(self.path.name + ".new")
        _replace(fresh, _header(self._generation + 1, 0))
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.rename(self.path, self.rotated)
            try:
                os.rename(fresh, self.path)
            except OSError:
                os.rename(self.rotated, self.path)  # back as it was
                raise
            sync_dir(self.directory)  # the new journal's name is durable before any change is acknowledged in it
        except OSError:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        self._generation += 1
        self._records = 0
        self._compactor = threading.Thread(target=self._compact, name="dhcp-journal-compaction", daemon=True)
        self._compactor.start()

    def _compact(self) -> None:
        try:
            files = [(p, _read(p, torn_allowed=p == self.rotated, kind=self.kind))
                     for p in (self.base, self.rotated) if p.exists()]
            leases, newest = _replay(files)
            _replace(self.base, _base(leases.values(), newest, self.kind))
            sync_dir(self.directory)
            self.rotated.unlink()
            sync_dir(self.directory)
            self._leases = len(leases)
            self._compactor = None
        except (OSError, _Unreadable) as e:  # left for the next start, which reads .2 again
            log.warning("dhcp: compacting the lease journal failed: %s", e)

    def settle(self) -> None:
        """Wait for a compaction under way, if any."""
        compactor = self._compactor
        if compactor is not None:
            compactor.join()

    def close(self) -> None:
        self.settle()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.flush()
            os.close(self._fd)
            self._fd = -1
        os.close(self._lock)


def read(directory: Path, kind: Kind = V4) -> tuple[dict[str, Lease], int]:
    """The leases in a state directory's journal by MAC (or `kind`'s key), and its newest generation; NetbootError
    if corrupt."""
    files = []
    base, rotated, active = (directory / (kind.name + s) for s in (".1", ".2", ""))
    for path in (base, rotated, active):
        try:
            files.append((path, _read(path, torn_allowed=path != base, kind=kind)))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise NetbootError(f"cannot read the lease journal {path}: {e.strerror}") from None
        except _Unreadable as e:
            raise _corrupt(path, e) from None
    return _replay(files)


def _legacy(path: Path) -> dict[str, Lease]:
    """The lease file of earlier versions (JSON, rewritten whole on every change)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise NetbootError(f"cannot read the lease state {path}: {e}") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != "netboot-dhcp-leases":
            raise ValueError("not a netboot lease file")
        if data.get("version") != 1:
            raise ValueError(f"version {data.get('version')!r}, expected 1")
        by_mac: dict[str, Lease] = {}
        ips: set[str] = set()
        for number, entry in enumerate(data["leases"], start=1):
            bad = ValueError(f"lease {number} is not a mac, an ip, a finite expires and a hostname")
            if not isinstance(entry, dict) or set(entry) - {"mac", "ip", "expires", "hostname"}:
                raise bad
            mac, ip, expires, hostname = entry["mac"], entry["ip"], entry["expires"], entry.get("hostname", "")
            # What earlier versions wrote: strings and a number of seconds. A number that is not a finite float would
            # be converted into a journal that cannot be read back; compared, not converted (an int past float's
            # range raises OverflowError in float(), and NaN compares false).
            if (not isinstance(mac, str) or not isinstance(ip, str) or not isinstance(hostname, str)
                    or not isinstance(expires, int | float) or isinstance(expires, bool)
                    or not -sys.float_info.max <= expires <= sys.float_info.max):
                raise bad
            lease = Lease(macs.normalize(mac), str(IPv4Address(ip)), float(expires), hostname)
            if len(_encode(lease)) > MAX_LINE:  # the journal it becomes could not be read back
                raise ValueError(f"{lease.mac}: a hostname of {len(lease.hostname)} characters")
            if lease.mac in by_mac or lease.ip in ips:
                raise ValueError(f"{lease.mac} / {lease.ip} appears twice")
            by_mac[lease.mac] = lease
            ips.add(lease.ip)
        return by_mac
    # RecursionError: JSON arrays or objects nested past the interpreter's limit (json.loads recurses), which no
    # lease file is.
    except (ValueError, KeyError, TypeError, RecursionError, macs.BadMac) as e:
        raise NetbootError(f"{path}: corrupt lease state ({_cut(e)}); left as it is: repair or remove it to start"
                           ) from None
