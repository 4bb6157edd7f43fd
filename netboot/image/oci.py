"""Unpack an OCI image archive into a directory, layer by layer, as a container runtime would.

Follows the OCI image spec: image-layout.md (oci-layout, index.json, blobs/sha256/<hex>), image-index.md and
manifest.md (descriptors, media types, choosing a platform), layer.md (changesets: whiteouts, opaque
directories, an entry replacing one of another type); and the older `docker save` layout (manifest.json
naming <id>/layer.tar files). Hand-written because Python has no maintained OCI library, and the tools that
do this (umoci, skopeo) would be two more Go programs to depend on, umoci needing an unpacked layout first.

The archive is untrusted: every name is resolved below `dest` through directory descriptors opened with
O_NOFOLLOW, a parent component that is a symlink is refused rather than followed, and `..` may not leave
the root, so nothing is ever written outside `dest`. Extended attributes (PAX SCHILY.xattr.* records: file
capabilities, SELinux labels) are not applied, and mtimes are left as they fall: the packer pins them.
What it may cost is bounded (limits.py): its entries and its decompressed bytes, counted as they are read and
checked against what each header declares before it is spent, the length and depth of its names, the size of
its JSON documents and tar extension headers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import zstandard

from netboot.core.beneath import DIRECTORY, Outside, components, open_dir
from netboot.core.errors import NetbootError
from netboot.core.remove import remove_tree
from netboot.image.limits import MAX_NAME, ImageLimits, LimitError, Tally, check_name, shown

log = logging.getLogger(__name__)

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
# The image chosen from an index for each kernel architecture (core/artifacts.ARCHES), in the OCI's own names
# (image-index.md: platform.architecture takes GOARCH's values).
PLATFORMS = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
# The OCI distribution spec has registries accept manifests up to 4 MiB: no index, manifest or config is larger.
_MAX_DOCUMENT = 4 << 20
_MAX_EXTENSION = 1 << 20  # one tar extension header's data (PAX records, a GNU long name)
_MAX_EXTENSIONS_IN_A_ROW = 8  # before one member: a PAX header, GNU long name and link, with room to spare
_MAX_GLOBAL = 4096  # global PAX headers of one tar: git archive writes 52 bytes, image builders none
_EXTENSIONS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)
_T = TypeVar("_T")


@dataclass(frozen=True)
class OciImage:
    digest: str  # "sha256:..." of the image manifest used; for the docker layout, which has none, of its config
    layers: int  # how many layers were applied
    layout: str  # "oci" or "docker"


class _Layer(NamedTuple):
    label: str  # its digest, or its file name in the docker layout
    member: str  # its file in the archive
    digest: str | None  # to check it against; None for a docker <id>/layer.tar


def unpack(archive: Path, dest: Path, *, keep_owners: bool, limits: ImageLimits | None = None,
           platform: str = PLATFORMS["x86_64"]) -> OciImage:
    """Apply the image's layers in order into `dest` (an existing empty directory), within `limits`; from an
    image index, the image for `platform` ("os/architecture")."""
    limits = limits or ImageLimits()
    tally = Tally(limits)
    with _open_archive(archive) as outer:
        files = _Archive(archive, outer, limits, platform)
        if "index.json" in files.members:
            image, layers = files.oci_layers()
        elif "manifest.json" in files.members:
            image, layers = files.docker_layers()
        else:
            raise NetbootError(f"{archive} is not an OCI image archive (no index.json or manifest.json)")
        tree = _Tree(dest, keep_owners, tally)
        try:
            for n, layer in enumerate(layers, 1):
                _apply_layer(tree, files.open(layer.member), layer.digest, f"{archive}: layer {layer.label}", tally)
                log.info("%s: applied layer %d of %d (%s)", archive, n, len(layers), layer.label)
            tree.finish()
        finally:
            tree.close()
    if tree.devices_skipped:
        log.warning("%s: skipped %d device nodes: they are created only when owners are kept (as root)",
                    archive, tree.devices_skipped)
    return image


class _Header(tarfile.TarInfo):
    """A tar header whose extensions are bounded before tarfile reads them.

    tarfile reads an extension header's data (PAX records, a GNU long name) whole into memory whatever size it
    declares, follows a run of them by recursion, copies the global PAX records into every later member, and
    reads a GNU sparse map into a list as long as it says. _proc_member is the hook tarfile leaves subclasses
    for its headers (see its comment there), so each of those is refused here before it is read.
    """

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        assert isinstance(tar, _Tar)
        if self.type in _EXTENSIONS:
            if self.size > _MAX_EXTENSION:
                raise LimitError(f"a tar extension header of {self.size:,} bytes (at most {_MAX_EXTENSION:,})")
            tar.extensions_in_a_row += 1
            if tar.extensions_in_a_row > _MAX_EXTENSIONS_IN_A_ROW:
                raise LimitError(f"more than {_MAX_EXTENSIONS_IN_A_ROW} tar extension headers in a row")
            if self.type == tarfile.XGLTYPE:
                tar.global_bytes += self.size
                if tar.global_bytes > _MAX_GLOBAL:
                    raise LimitError(f"global PAX headers of more than {_MAX_GLOBAL:,} bytes")
        else:
            tar.extensions_in_a_row = 0
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise _Refused(_SPARSE)
        return super()._proc_member(tar)

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict, tar: tarfile.TarFile) -> None:
        raise _Refused(_SPARSE)


class _Tar(tarfile.TarFile):
    """A tar read with _Header; what it counts of the headers read so far."""

    tarinfo = _Header
    extensions_in_a_row = 0
    global_bytes = 0


def _open_archive(archive: Path) -> tarfile.TarFile:
    try:
        return _Tar.open(archive, "r:")  # uncompressed, as skopeo and docker save write it: members are sought
    except OSError as e:
        raise NetbootError(f"cannot read {archive}: {e.strerror}") from e
    except tarfile.TarError as e:
        raise NetbootError(f"{archive} is not a tar archive") from e
    except (LimitError, _Refused) as e:
        raise NetbootError(f"{archive}: {e}") from None


class _Archive:
    """The outer tar: its files by name, read by random access."""

    def __init__(self, path: Path, tar: tarfile.TarFile, limits: ImageLimits, platform: str) -> None:
        self.path = path
        self.tar = tar
        self.platform = platform
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for n, m in enumerate(tar, 1):
                if n > limits.max_entries:
                    raise LimitError(f"more than {limits.max_entries:,} files (--max-image-entries)")
                # docker save writes a layer.tar equal to an earlier one as a symlink to it; tarfile follows it.
                if m.isreg() or m.issym() or m.islnk():
                    self.members[_clean(m.name)] = m
        except (LimitError, _Refused) as e:
            raise NetbootError(f"{path}: {e}") from None
        except tarfile.TarError as e:
            raise NetbootError(f"{path} is not a valid tar archive ({e})") from None

    def open(self, name: str) -> IO[bytes]:
        try:
            f = self.tar.extractfile(self.members[name])
        except KeyError:  # a link to a member that is not there
            f = None
        if f is None:
            raise NetbootError(f"{self.path}: {name} is a link to no file of the archive")
        return f

    def _blob_member(self, what: str, digest: str) -> str:
        if not _DIGEST.fullmatch(digest):
            raise NetbootError(f"{self.path}: {what} has an unsupported digest {digest!r} (not sha256)")
        name = f"blobs/sha256/{digest[7:]}"
        if name not in self.members:
            raise NetbootError(f"{self.path}: {what} {digest} is missing from the archive")
        return name

    def _json(self, name: str, where: str, digest: str | None = None) -> Any:
        data = self.open(name).read(_MAX_DOCUMENT + 1)
        if len(data) > _MAX_DOCUMENT:
            raise NetbootError(f"{self.path}: {where} is larger than {_MAX_DOCUMENT >> 20} MiB")
        if digest is not None:
            _check_digest(hashlib.sha256(data).hexdigest(), digest, f"{self.path}: {where}")
        try:
            return json.loads(data)
        except ValueError as e:
            raise NetbootError(f"{self.path}: {where} is not valid JSON: {e}") from e

    def oci_layers(self) -> tuple[OciImage, list[_Layer]]:
        """image-layout.md: index.json names a manifest, or an image index naming manifests (or indexes)."""
        where = "index.json"
        doc = self._json("index.json", where)
        while True:
            context = f"{self.path}: {where}"
            descriptor = _choose(_get(doc, "manifests", list, context), context, self.platform)
            media_type = _get(descriptor, "mediaType", str, context)
            digest = _get(descriptor, "digest", str, context)
            if media_type in INDEX_TYPES:
                kind = "image index"
            elif media_type in MANIFEST_TYPES:
                kind = "manifest"
            else:
                raise NetbootError(f"{context}: unsupported manifest media type {media_type!r}")
            where = f"{kind} {digest}"
            doc = self._json(self._blob_member(kind, digest), where, digest)
            if kind == "manifest":
                break
        layers = []
        for descriptor in _get(doc, "layers", list, f"{self.path}: {where}"):
            layer = _get(descriptor, "digest", str, f"{self.path}: {where}: a layer")
            layers.append(_Layer(layer, self._blob_member("layer", layer), layer))
        return OciImage(digest, len(layers), "oci"), layers

    def docker_layers(self) -> tuple[OciImage, list[_Layer]]:
        """The older docker save layout: manifest.json lists images, each a config file and layer files."""
        where = f"{self.path}: manifest.json"
        doc = self._json("manifest.json", "manifest.json")
        if not isinstance(doc, list) or len(doc) != 1:
            raise NetbootError(f"{where} should list exactly one image (save one image per archive)")
        config = _clean(_get(doc[0], "Config", str, where))
        if config not in self.members:
            raise NetbootError(f"{self.path}: config {config} is missing from the archive")
        image_id = "sha256:" + hashlib.file_digest(self.open(config), "sha256").hexdigest()
        layers = []
        for name in _get(doc[0], "Layers", list, where):
            if not isinstance(name, str):
                raise NetbootError(f"{where} has a layer that is not a file name: {name!r}")
            name = _clean(name)
            if name not in self.members:
                raise NetbootError(f"{self.path}: layer {name} is missing from the archive")
            # Docker 25+ names layers by their digest: check it; <id>/layer.tar names carry no digest.
            blob = _BLOB_NAME.fullmatch(name)
            layers.append(_Layer(name, name, f"sha256:{blob[1]}" if blob else None))
        return OciImage(image_id, len(layers), "docker"), layers


def _clean(name: str) -> str:
    """A member name of the outer archive without a leading "./" or "/"."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _get(doc: object, key: str, kind: type[_T], where: str) -> _T:
    """doc[key], which must be a `kind`: anything else in a JSON document is a one-line error, not a traceback."""
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise NetbootError(f"{where} has no {key!r} {'list' if kind is list else 'string'}")
    return value


def _platform(descriptor: object) -> str | None:
    platform = descriptor.get("platform") if isinstance(descriptor, dict) else None
    if not isinstance(platform, dict):
        return None
    return f"{platform.get('os')}/{platform.get('architecture')}"


def _choose(descriptors: list[Any], where: str, platform: str) -> Any:
    """The only image, or the first for `platform` among several (image-index.md: the first match is used); an
    only image that says it is for another platform is refused, as the kernel could not run it."""
    if len(descriptors) == 1:
        said = _platform(descriptors[0])
        if said is not None and said != platform:
            raise NetbootError(f"{where} holds one image, for {said}, and the kernel needs {platform}")
        return descriptors[0]
    for descriptor in descriptors:
        if _platform(descriptor) == platform:
            return descriptor
    if not descriptors:
        raise NetbootError(f"{where} lists no image")
    platforms = ", ".join(_platform(d) or "no platform" for d in descriptors)
    raise NetbootError(f"{where} lists {len(descriptors)} images and none for {platform} ({platforms})")


def _check_digest(sha256: str, digest: str, where: str) -> None:
    got = f"sha256:{sha256}"
    if got != digest:
        raise NetbootError(f"{where} does not match its digest: its content hashes to {got}")


class _Hashing:
    """A blob read front to back through sha256, to be checked against its digest once read to the end."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._sha.update(data)
        return data

    def check(self, digest: str | None, where: str) -> None:
        if digest is None:
            return
        while self.read(1 << 20):  # what the tar reader left: end-of-archive padding, a compressor's trailer
            pass
        _check_digest(self._sha.hexdigest(), digest, where)


class _Gunzip:
    """gzip members (RFC 1952), decompressed no further ahead than tarfile reads.

    tarfile's own "r|gz" slices its whole decompressed buffer on each 512-byte header read, which is
    quadratic on a layer that compresses well (50,000 small files: 24 s against 4 s this way).
    """

    def __init__(self, source: _Hashing) -> None:
        self._source = source
        self._zlib = zlib.decompressobj(wbits=31)
        self._input = b""

    def read(self, size: int) -> bytes:
        out = b""
        while not out:
            if not self._input:
                self._input = self._source.read(1 << 16)
                if not self._input:
                    if not self._zlib.eof:
                        raise EOFError("the gzip stream ends early")
                    return b""
            if self._zlib.eof:
                self._zlib = zlib.decompressobj(wbits=31)  # the next of concatenated members
            out = self._zlib.decompress(self._input, size)
            self._input = self._zlib.unconsumed_tail or self._zlib.unused_data
        return out


class _Counted:
    """A layer's decompressed tar stream, its bytes counted against the image's limit as they are read: a gzip
    or zstd bomb stops there, whatever its headers declared. tarfile reads it a record (10 KiB) at a time, and
    both decompressors return no more than is asked."""

    def __init__(self, source: Any, tally: Tally) -> None:
        self._source = source
        self._tally = tally

    def read(self, size: int) -> bytes:
        data = self._source.read(size)
        self._tally.spend(len(data))
        return data


def _apply_layer(tree: _Tree, blob: IO[bytes], digest: str | None, where: str, tally: Tally) -> None:
    """Streams one layer blob into the tree: a tar, gzip'd or zstd'd (told by its first bytes, not its media type)."""
    magic = blob.read(4)
    blob.seek(0)
    hashing = _Hashing(blob)
    try:
        source: Any = hashing
        if magic.startswith(_GZIP_MAGIC):
            source = _Gunzip(hashing)
        elif magic == _ZSTD_MAGIC:
            source = zstandard.ZstdDecompressor().stream_reader(hashing, read_across_frames=True, closefd=False)
        with _Tar.open(fileobj=_Counted(source, tally), mode="r|") as layer:
            tree.begin_layer()
            while (member := layer.next()) is not None:
                # tarfile keeps every member it reads, for random access a stream has not: memory would grow
                # with the entries.
                layer.members.clear()
                try:
                    _check(member, tally)
                    tree.apply(member, layer)
                except (_Refused, LimitError) as e:
                    raise NetbootError(f"{where}: entry {shown(member.name)}: {e}") from None
                except OSError as e:
                    raise NetbootError(f"{where}: entry {shown(member.name)}: cannot unpack it: {e.strerror}") from e
    except (_Refused, LimitError) as e:  # in a header, before there is an entry to name
        raise NetbootError(f"{where}: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as e:
        hashing.check(digest, where)  # a damaged blob is reported as such, not as what the damage made of it
        raise NetbootError(f"{where} is not a valid tar archive ({e})") from e
    hashing.check(digest, where)


def _check(member: tarfile.TarInfo, tally: Tally) -> None:
    """An entry within the image's limits, its data declared within them before it is read."""
    tally.entry()
    check_name(os.fsencode(member.name), len(components(member.name) or ()))
    if len(os.fsencode(member.linkname)) > MAX_NAME:
        raise LimitError(f"its link target is {len(os.fsencode(member.linkname)):,} bytes long, more than {MAX_NAME:,}")
    if member.sparse is not None:
        raise _Refused(_SPARSE)
    if member.isreg():
        tally.expect(member.size)


class _Refused(Exception):
    """An entry the tree will not take; the caller names the archive, layer and entry."""


_SPARSE = "a sparse file (GNU tar --sparse), which no image builder writes: not unpacked"


class _Tree:
    """`dest`, changed only through directory descriptors opened without following symlinks."""

    def __init__(self, dest: Path, keep_owners: bool, tally: Tally) -> None:
        try:
            self.root = os.open(dest, DIRECTORY)
        except OSError as e:
            raise NetbootError(f"cannot open {dest}: {e.strerror}") from e
        self.keep_owners = keep_owners
        self.tally = tally  # the parents a layer does not list count as entries too
        self.devices_skipped = 0
        self._layer_paths: set[str] = set()  # made by the current layer, with their parents: whiteouts spare them
        self._dir_modes: dict[str, int] = {}  # set at the end, so a read-only directory can still be filled
        self._parent_parts: list[str] | None = None
        self._parent_fd = -1

    def close(self) -> None:
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
        os.close(self.root)

    def begin_layer(self) -> None:
        self._layer_paths.clear()

    def apply(self, member: tarfile.TarInfo, layer: tarfile.TarFile) -> None:
        parts = components(member.name)
        if parts is None:
            raise _Refused("its name leaves the root")
        if (member.ischr() or member.isblk()) and not self.keep_owners:
            self.devices_skipped += 1  # mknod(2) of a device needs root
            return
        if not parts:
            if not member.isdir():
                raise _Refused("the root can only be a directory")
            if self.keep_owners:
                os.fchown(self.root, member.uid, member.gid)
            self._dir_modes[""] = stat.S_IMODE(member.mode)
            return
        *parents, base = parts
        fd = self._parent(parents)
        if base == _OPAQUE:  # layer.md: hide what lower layers put in this directory
            self._mark(parents)
            for child in os.listdir(fd):
                self._remove_lower(fd, child, "/".join([*parents, child]))
        elif base.startswith(_WHITEOUT):  # layer.md: remove what lower layers made at .wh.'s target
            target = base[len(_WHITEOUT):]
            if target in ("", ".", ".."):
                raise _Refused("is not a valid whiteout")
            self._remove_lower(fd, target, "/".join([*parents, target]))
        elif member.isdir():
            self._mark(parts)
            self._directory(fd, base, "/".join(parts), member)
        elif member.islnk():
            self._mark(parts)
            self._hardlink(fd, base, parts, member)
        elif member.isreg() or member.issym() or member.isfifo() or member.ischr() or member.isblk():
            self._mark(parts)
            self._remove(fd, base)  # layer.md: an entry replaces whatever was there, a whole tree included
            self._node(fd, base, member, layer)
        else:
            raise _Refused(f"has an unsupported type {member.type!r}")

    def _node(self, fd: int, name: str, member: tarfile.TarInfo, layer: tarfile.TarFile) -> None:
        """A file, symlink, FIFO or device that is not there yet, with its owner (if kept) and mode."""
        mode = stat.S_IMODE(member.mode)
        if member.isreg():
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
            with open(out, "wb") as f:
                data = layer.extractfile(member)
                assert data is not None  # a regular member always has data
                shutil.copyfileobj(data, f, 1 << 20)
                f.flush()
                if self.keep_owners:
                    os.fchown(out, member.uid, member.gid)
                os.fchmod(out, mode)  # after chown, which clears setuid and setgid
            return
        if member.issym():
            # As it is, absolute or not: it is resolved inside the booted system, never here.
            os.symlink(member.linkname, name, dir_fd=fd)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=fd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=fd)
        self._chown(fd, name, member)
        if not member.issym():
            os.chmod(name, mode, dir_fd=fd)  # a FIFO or device just made here, so no symlink to follow

    def _chown(self, fd: int, name: str, member: tarfile.TarInfo) -> None:
        # Numeric ids, as the image's own /etc/passwd means them; the header's user and group names are ignored.
        if self.keep_owners:
            os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)

    def _directory(self, fd: int, name: str, path: str, member: tarfile.TarInfo) -> None:
        """A directory merges with one already there and replaces anything else."""
        try:
            is_dir = stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode)
        except FileNotFoundError:
            is_dir = False
        else:
            if not is_dir:
                self._remove(fd, name)
        if not is_dir:
            os.mkdir(name, 0o755, dir_fd=fd)
        self._chown(fd, name, member)
        self._dir_modes[path] = stat.S_IMODE(member.mode)

    def _hardlink(self, fd: int, name: str, parts: list[str], member: tarfile.TarInfo) -> None:
        target = components(member.linkname)
        if target is None:
            raise _Refused(f"its hard link target {member.linkname} leaves the root")
        if not target:
            raise _Refused("is a hard link to the root")
        if target == parts:
            return
        target_fd = self._open(target[:-1], create=False)
        if target_fd is None:
            raise _Refused(f"its hard link target {member.linkname} is not in the image")
        try:
            self._remove(fd, name)
            os.link(target[-1], name, src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise _Refused(f"its hard link target {member.linkname} is not in the image") from None
        finally:
            os.close(target_fd)

    def _mark(self, parts: list[str]) -> None:
        for i in range(1, len(parts) + 1):
            self._layer_paths.add("/".join(parts[:i]))

    def _remove(self, fd: int, name: str) -> None:
        """Removes `name` in the directory `fd`, a whole tree if it is a directory, following no symlink."""
        remove_tree(name, dir_fd=fd)

    def _remove_lower(self, fd: int, name: str, path: str) -> None:
        """Removes what lower layers made at `path` (`name` in `fd`), keeping what the current layer made.

        layer.md: whiteouts apply only to lower layers, whatever their place in the layer's tar.
        """
        if path not in self._layer_paths:
            self._remove(fd, name)
            return
        try:
            sub = os.open(name, DIRECTORY, dir_fd=fd)
        except OSError:
            return  # the current layer's own file or symlink
        try:
            for child in os.listdir(sub):
                self._remove_lower(sub, child, f"{path}/{child}")
        finally:
            os.close(sub)

    def _parent(self, parts: list[str]) -> int:
        """The directory `parts`, made if missing. Its descriptor is kept for the next entry, which usually
        shares it: every removal is below the current entry's parent, so it never names a removed directory."""
        if parts != self._parent_parts:
            fd = self._open(parts, create=True)
            assert fd is not None
            if self._parent_fd >= 0:
                os.close(self._parent_fd)
            self._parent_parts, self._parent_fd = parts, fd
        return self._parent_fd

    def _open(self, parts: list[str], *, create: bool) -> int | None:
        """A new descriptor of the directory `parts`, walked one real directory at a time; None if missing."""
        try:
            return open_dir(self.root, parts, make=self._make if create else None)
        except Outside as e:
            raise _Refused(str(e)) from None

    def _make(self, fd: int, name: str, path: str) -> int:
        self.tally.entry()
        os.mkdir(name, 0o755, dir_fd=fd)  # a parent the layer does not list, as tar makes it
        child = os.open(name, DIRECTORY, dir_fd=fd)
        os.fchmod(child, 0o755)  # whatever the umask
        self._dir_modes.pop(path, None)  # a directory of that name removed earlier had its own
        return child

    def finish(self) -> None:
        """Sets the directories' modes, deepest first, now that nothing more is written into them."""
        for path in sorted(self._dir_modes, key=lambda p: p.count("/") if p else -1, reverse=True):
            try:
                fd = self._open(path.split("/") if path else [], create=False)
            except _Refused:
                continue  # a later layer put a file or symlink on its way
            if fd is None:
                continue
            try:
                os.fchmod(fd, self._dir_modes[path])
            finally:
                os.close(fd)
