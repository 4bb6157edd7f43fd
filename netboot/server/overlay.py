"""Per-machine overlays: a directory of files every machine gets its own copy of, as a second initrd.

A profile's `overlay = "DIR"` names the directory. Files ending in `.j2` are Jinja2 templates, rendered for each
machine (the file loses `.j2`); every other file, directory and symlink is taken as it is. A machine's overlay is
packed as one small newc cpio, compressed like its build's initrd, and its script loads it after the main initrd:
- direct format: the kernel unpacks it over the root, so its files replace the image's;
- squashfs and erofs formats: its files arrive under /netboot-overlay/ (beside stage 1's own), and stage 1 copies
  them into the booted root before switching to it.

The directory is read into memory once per (re)load, so rendering never touches the disk: a template can include
only another template of the same overlay, and a symlink that leads out of the directory is refused. Templates
run in Jinja2's sandbox, and an undefined variable is an error rather than an empty string. A machine's rendered
files are at most MAX_RENDERED bytes; rendering runs in worker processes (`render_in_worker`, see
overlay_cache.py) that bound its time and memory too, since a sandboxed template can still loop for hours or
ask for gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from netboot.core.artifacts import STAGE1_PREFIX
from netboot.core.beneath import NotRegular, Outside, components, open_file
from netboot.core.compress import Compressor
from netboot.core.errors import NetbootError
from netboot.image.cpio import NewcWriter, StreamSink
from netboot.image.initrd import compress_bytes

TEMPLATE_SUFFIX = ".j2"
MTIME = 1  # every entry's mtime, as in the Nix store: the same inputs give the same bytes
MAX_BYTES = 16 << 20  # an overlay is a handful of configuration files, not a second image
MAX_RENDERED = 16 << 20  # a machine's rendered files, in all


class OverlayError(NetbootError):
    pass


@dataclass(frozen=True)
class Entry:
    name: str  # relative, '/'-separated; a template's without .j2
    kind: str  # "dir", "file", "link" or "template"
    mode: int  # permission bits
    data: bytes  # a file's bytes, a link's target, a template's source


@dataclass(frozen=True)
class Rendered:
    """One machine's overlay: its entries, and a digest of all of them (which names its packed bytes)."""

    entries: tuple[Entry, ...]
    digest: str


class OverlayDir:
    """An overlay directory, read whole; its templates compiled."""

    def __init__(self, path: Path, entries: tuple[Entry, ...] | None = None) -> None:
        """The directory at `path`, read now, or its `entries` as read before (in a worker process)."""
        self.path = path
        self.entries = _read(path) if entries is None else entries
        self.digest = _digest(list(self.entries))  # names the entries, for the worker processes' caches
        self._files = {e.name + TEMPLATE_SUFFIX: path / (e.name + TEMPLATE_SUFFIX)
                       for e in self.entries if e.kind == "template"}
        sources = {e.name + TEMPLATE_SUFFIX: e.data for e in self.entries if e.kind == "template"}

        def load(name: str) -> tuple[str, str, Any] | None:
            if name not in sources:
                return None
            return sources[name].decode(), str(self._files[name]), lambda: True

        self._env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            loader=jinja2.FunctionLoader(load), undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
            autoescape=False,
        )
        self._templates: dict[str, jinja2.Template] = {}
        for name, file in self._files.items():
            try:
                sources[name].decode()
            except UnicodeDecodeError as e:
                raise OverlayError(f"{file}: a template must be UTF-8 text ({e.reason} at byte {e.start})") from None
            try:
                self._templates[name] = self._env.get_template(name)
            except jinja2.TemplateSyntaxError as e:
                raise OverlayError(f"{e.filename or file}:{e.lineno}: {e.message}") from None

    def render(self, variables: Mapping[str, Any], machine: str) -> Rendered:
        """The overlay for one machine; `machine` names it in errors."""
        entries = []
        total = 0
        for e in self.entries:
            if e.kind != "template":
                entries.append(e)
                continue
            template = self._templates[e.name + TEMPLATE_SUFFIX]
            chunks = []
            try:
                # Streamed, so that a template that would render gigabytes stops at the bound.
                for chunk in template.generate(variables):
                    data = chunk.encode()
                    total += len(data)
                    if total > MAX_RENDERED:
                        raise OverlayError(f"{self._files[e.name + TEMPLATE_SUFFIX]}: machine {machine}: renders "
                                           f"more than {MAX_RENDERED >> 20} MiB")
                    chunks.append(data)
            except OverlayError:
                raise
            except Exception as exc:  # whatever a template raises is that template's error
                raise OverlayError(f"{self._where(exc, e.name)}: machine {machine}: {_message(exc)}") from None
            entries.append(Entry(e.name, "file", e.mode, b"".join(chunks)))
        return Rendered(tuple(entries), _digest(entries))

    def _where(self, exc: BaseException, name: str) -> str:
        """file:line of the template line that raised (Jinja2 puts template lines in the traceback)."""
        if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
            return f"{exc.filename or self._files[name + TEMPLATE_SUFFIX]}:{exc.lineno}"
        files = {str(f) for f in self._files.values()}
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename in files:
                return f"{frame.filename}:{frame.lineno}"
        return str(self._files[name + TEMPLATE_SUFFIX])


# -- in the worker processes (overlay_cache.Renderer) ---------------------------------------------------------

_COMPILED: dict[str, OverlayDir] = {}  # the overlays this worker was sent, compiled, by digest
_KEEP_COMPILED = 8


class SourceMissing(Exception):
    """The worker has not been sent this overlay's entries yet: the job is sent again with them."""


def init_worker(memory: int) -> None:
    """A worker process's limits: `memory` bytes of address space beyond what it uses now (a template asking
    for gigabytes gets MemoryError, which is its error), and it ends with the server."""
    import resource

    from netboot.core.run import die_with_parent

    die_with_parent(os.getppid())
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + memory, size + memory))


def render_in_worker(path: Path, digest: str, entries: tuple[Entry, ...] | None, variables: Mapping[str, Any],
                     machine: str) -> Rendered:
    overlay = _COMPILED.get(digest)
    if overlay is None:
        if entries is None:
            raise SourceMissing(digest)
        overlay = OverlayDir(path, entries)
        if len(_COMPILED) >= _KEEP_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[digest] = overlay
    return overlay.render(variables, machine)


def _message(exc: BaseException) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return exc.message or str(exc)
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {text}"


def _read(root: Path) -> tuple[Entry, ...]:
    """Every entry under `root`, sorted by name; nothing outside it is read."""
    try:
        st = os.stat(root)
    except OSError as e:
        raise OverlayError(f"overlay {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OverlayError(f"overlay {root} is not a directory")
    entries: list[Entry] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            try:
                st = os.lstat(path)
            except OSError as e:
                raise OverlayError(f"{path}: {e.strerror}") from None
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, "dir", mode, b""))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                if os.path.isabs(target) or components(f"{Path(rel).parent.as_posix()}/{target}") is None:
                    raise OverlayError(f"{path} is a symlink out of the overlay directory (to {target}); "
                                       "an overlay may link only within itself")
                entries.append(Entry(rel, "link", 0o777, os.fsencode(target)))
            elif stat.S_ISREG(st.st_mode):
                data = _read_file(root, rel)
                total += len(data)
                if total > MAX_BYTES:
                    raise OverlayError(f"overlay {root} holds more than {MAX_BYTES >> 20} MiB; "
                                       "put bulk into the system image")
                if rel.endswith(TEMPLATE_SUFFIX) and len(rel) > len(TEMPLATE_SUFFIX):
                    entries.append(Entry(rel[: -len(TEMPLATE_SUFFIX)], "template", mode, data))
                else:
                    entries.append(Entry(rel, "file", mode, data))
            else:
                raise OverlayError(f"{path} is not a regular file, directory or symlink")
        # os.walk would not descend into symlinked directories anyway; they are kept as links.
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise OverlayError(f"overlay {root} has both {twice} and {twice}{TEMPLATE_SUFFIX}")
    return tuple(sorted(entries, key=lambda e: e.name))


def tree_stat(root: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    """What changes when anything under `root` is edited, added or removed (each entry's stat)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found.append((path, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def _walk_error(e: OSError) -> None:
    raise OverlayError(f"{e.filename}: {e.strerror}")


def _read_file(root: Path, rel: str) -> bytes:
    """A file of the overlay, opened beneath it: a directory swapped for a symlink since the walk leads nowhere."""
    try:
        fd, _ = open_file(root, rel)
    except (Outside, NotRegular) as e:
        raise OverlayError(f"overlay {root}: {e}") from None
    except OSError as e:
        raise OverlayError(f"{root / rel}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _digest(entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(b"%s\0%s\0%o\0%d\0" % (e.name.encode(), e.kind.encode(), e.mode, len(e.data)))
        h.update(e.data)
    return h.hexdigest()


def pack(rendered: Rendered, *, stage1: bool, compressor: Compressor, level: int | None) -> bytes:
    """The overlay as one compressed newc member: the same entries and options give the same bytes."""
    buf = io.BytesIO()
    w = NewcWriter(StreamSink(buf), MTIME)
    prefix = ""
    if stage1:
        prefix = STAGE1_PREFIX + "/"
        w.directory(STAGE1_PREFIX.encode(), 0o755)
    for e in rendered.entries:
        name = (prefix + e.name).encode()
        match e.kind:
            case "dir":
                w.directory(name, e.mode)
            case "link":
                w.symlink(name, e.data)
            case _:
                w.data(name, e.data, e.mode)
    w.trailer()
    return compress_bytes(buf.getvalue(), compressor, level)
