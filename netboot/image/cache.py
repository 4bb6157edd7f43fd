"""The build cache: one compressed newc member per store path (and squashfs images), reused across builds.

Store paths are immutable, so a member is keyed by the path, its NAR hash from the registration, the
tool version and every option that changes its bytes. Entries are written to a temporary name and renamed
into place (atomic, read-only once written), so builds sharing a cache never see half an entry and never
wait for one another; the cache is capped in size, least recently used entries going first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from netboot.core.errors import NetbootError
from netboot.core.run import pid_alive

DEFAULT_MAX = 5 << 30
LAYOUT = 1  # bump whenever the bytes made for the same inputs change
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


_HOST = os.uname().nodename.replace("-", "_")


def _tmp_prefix() -> str:
    """Temporary entries are named for the host and process writing them, so a later build can tell the
    ones of a killed build."""
    return f".tmp-{_HOST}-{os.getpid()}-"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "netboot"


def parse_size(text: str) -> int:
    """'5G', '500M', '1.5GiB', '1048576' → bytes (powers of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise NetbootError(f"invalid size {text!r} (like 500M or 5G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def nar_hashes(registration: bytes) -> dict[str, str]:
    """Store path → NAR hash from `nix-store --load-db` input (path, hash, size, deriver, n, n references)."""
    lines = registration.decode(errors="replace").split("\n")
    found, i = {}, 0
    try:
        while i + 4 < len(lines) and lines[i]:
            found[lines[i]] = lines[i + 1]
            i += 5 + int(lines[i + 4])
    except ValueError:
        pass  # not the format we know: no hashes, no caching
    return found


class Cache:
    def __init__(self, root: Path | None, max_bytes: int = DEFAULT_MAX) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        if root is not None:
            try:
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
                    pass
            except OSError as e:
                raise NetbootError(f"cache directory {root} is not writable: {e.strerror}") from e

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @staticmethod
    def key(**parts: object) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]

    def open(self, key: str, suffix: str) -> tuple[int, dict] | None:
        """A descriptor of the entry and its metadata, or None; the descriptor stays valid if it is evicted."""
        if self.root is None:
            return None
        path = self.root / f"{key}{suffix}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            meta = json.loads((self.root / f"{key}.json").read_text())
        except (OSError, ValueError):
            os.close(fd)  # written by a build that died between the two renames: make it again
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used goes first
        self.hits += 1
        return fd, meta

    def put(self, key: str, suffix: str, make: Callable[[Path], dict], scratch: Path) -> tuple[int, dict]:
        """Make an entry with `make(path) -> metadata` and return it open; without a cache, in `scratch`."""
        where = self.root if self.root is not None else scratch
        fd_tmp, tmp_name = tempfile.mkstemp(dir=where, prefix=f"{_tmp_prefix()}{key}-", suffix=suffix)
        os.close(fd_tmp)
        tmp = Path(tmp_name)
        try:
            meta = make(tmp)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            if self.root is not None:
                tmp.chmod(0o444)
                meta_tmp = tmp.with_suffix(".json-tmp")
                meta_tmp.write_text(json.dumps(meta))
                os.replace(tmp, self.root / f"{key}{suffix}")
                os.replace(meta_tmp, self.root / f"{key}.json")
            else:
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            tmp.with_suffix(".json-tmp").unlink(missing_ok=True)
            raise
        return fd, meta

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        if self.root is None or not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or p.suffix == ".json":
                continue
            with contextlib.suppress(FileNotFoundError):
                found.append((p, p.stat()))
        return found

    def evict(self, keep: set[str]) -> int:
        """Remove least recently used entries until the cache fits its cap; never those in `keep`."""
        if self.root is None:
            return 0
        entries = sorted(self.entries(), key=lambda e: e[1].st_mtime)
        total = sum(st.st_size for _, st in entries)
        removed = 0
        for path, st in entries:
            if total <= self.max_bytes:
                break
            if path.name.split(".", 1)[0] in keep:
                continue
            for p in (path, path.with_name(path.name.split(".", 1)[0] + ".json")):
                p.unlink(missing_ok=True)
            total -= st.st_size
            removed += 1
        # Temporary files of builds that were killed: of this host's processes that no longer run, and of any
        # (the cache may be shared) a day old.
        for p in self.root.glob(".tmp-*"):
            _, host, pid, _ = [*p.name.split("-", 3), "", "", ""][:4]
            with contextlib.suppress(FileNotFoundError):
                if (host == _HOST and pid.isdigit() and not pid_alive(int(pid))) or (
                        p.stat().st_mtime < time.time() - 86400):
                    p.unlink()
        return removed

    def clear(self) -> int:
        if self.root is None or not self.root.is_dir():
            return 0
        n = 0
        for p in self.root.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n
