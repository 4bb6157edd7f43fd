"""OCI image archives made by hand, as `skopeo copy ... oci-archive:` and the older `docker save` write them.

A layer is a list of entries made by the small functions below, kept in the order given (the order inside a
layer is part of what the unpacker must get right); everything else is deterministic: fixed mtimes, owners
0:0 unless asked, sorted archive members and JSON keys.

    oci_archive(tmp_path / "image.tar", [
        [directory("etc"), file("etc/motd", b"hi\\n"), symlink("bin/sh", "/nix/store/x-busybox/bin/sh")],
        [whiteout("etc/motd"), opaque("var/cache")],
    ])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

MTIME = 1_700_000_000
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


# A layer: its entries, or raw bytes to use as the layer blob as they are (a corrupt layer).
Layer = list[Entry] | bytes


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = MTIME
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, *, uid: int = 0, gid: int = 0) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    return Entry(info, data)


def directory(name: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(_info(name, tarfile.DIRTYPE, mode, uid, gid))


def symlink(name: str, target: str, *, uid: int = 0, gid: int = 0) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777, uid, gid)
    info.linkname = target
    return Entry(info)


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return Entry(info)


def device(name: str, major: int, minor: int, mode: int = 0o600, *, block: bool = False) -> Entry:
    info = _info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode)
    info.devmajor, info.devminor = major, minor
    return Entry(info)


def fifo(name: str, mode: int = 0o644) -> Entry:
    return Entry(_info(name, tarfile.FIFOTYPE, mode))


def whiteout(name: str) -> Entry:
    """Removes `name`, made by a lower layer (layer.md, Whiteouts)."""
    parent, _, base = name.rstrip("/").rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(dirname: str) -> Entry:
    """Hides everything lower layers put in `dirname` (layer.md, Opaque Whiteout)."""
    return file(f"{dirname.rstrip('/')}/.wh..wh..opq")


def layer_tar(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            tar.addfile(e.info, io.BytesIO(e.data) if e.info.isreg() else None)
    return out.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    assert compression == "none", compression
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class _Blobs(dict[str, bytes]):
    """Archive members by name; blobs are added under blobs/sha256/<hex> and described for a manifest."""

    def add(self, data: bytes, media_type: str, **extra: object) -> dict[str, object]:
        digest = sha256(data)
        self[f"blobs/sha256/{digest[7:]}"] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def _compressions(compression: str | Sequence[str], n: int) -> list[str]:
    return [compression] * n if isinstance(compression, str) else list(compression)


def _image(blobs: _Blobs, layers: list[Layer], compression: str | Sequence[str], platform: str,
           media_type: str | None = None) -> dict[str, object]:
    """Adds one image's layers, config and manifest; returns the manifest's descriptor."""
    os_, arch = platform.split("/")
    descriptors, diff_ids = [], []
    for layer, how in zip(layers, _compressions(compression, len(layers)), strict=True):
        tar = layer if isinstance(layer, bytes) else layer_tar(layer)
        diff_ids.append(sha256(tar))
        descriptors.append(blobs.add(tar if isinstance(layer, bytes) else compress(tar, how), media_type or LAYER[how]))
    config = {"architecture": arch, "os": os_, "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": blobs.add(_json(config), CONFIG),
                "layers": descriptors}
    return blobs.add(_json(manifest), MANIFEST, platform={"architecture": arch, "os": os_})


def _finish(path: Path, blobs: _Blobs, index: dict[str, object]) -> Path:
    blobs["oci-layout"] = _json({"imageLayoutVersion": "1.0.0"})
    blobs["index.json"] = _json({"schemaVersion": 2, "mediaType": INDEX, "manifests": [index]})
    write_members(path, blobs)
    return path


def oci_archive(path: Path, layers: list[Layer], *, layout: str = "oci",
                compression: str | Sequence[str] = "gzip", media_type: str | None = None) -> Path:
    """An archive of one linux/amd64 image; `compression` is "gzip", "zstd" or "none", or one for each layer.

    `media_type`, if given, is written for every layer whatever its compression.
    layout="oci": the OCI image layout (image-layout.md), as skopeo's oci-archive and docker save 25+ write it;
    layout="docker": the older docker save layout (manifest.json, <id>/layer.tar, <id>.json config).
    """
    if layout == "docker":
        return _docker_archive(path, layers, compression)
    assert layout == "oci", layout
    blobs = _Blobs()
    descriptor = _image(blobs, layers, compression, "linux/amd64", media_type)
    descriptor.pop("platform")  # index.json of a single image, as skopeo writes it
    descriptor["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    return _finish(path, blobs, descriptor)


def oci_index_archive(path: Path, images: dict[str, list[Layer]], *, compression: str = "gzip") -> Path:
    """An archive whose index.json names an image index (image-index.md) of one image per platform ("os/arch")."""
    blobs = _Blobs()
    manifests = [_image(blobs, layers, compression, platform) for platform, layers in images.items()]
    index = blobs.add(_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}), INDEX)
    index["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    return _finish(path, blobs, index)


def _docker_archive(path: Path, layers: list[Layer], compression: str | Sequence[str]) -> Path:
    members: dict[str, bytes | str] = {}
    names, diff_ids = [], []
    saved: dict[str, str] = {}  # diff ID -> the layer.tar that holds it
    for n, (layer, how) in enumerate(zip(layers, _compressions(compression, len(layers)), strict=True)):
        tar = layer if isinstance(layer, bytes) else layer_tar(layer)
        layer_id = hashlib.sha256(f"{n}:{sha256(tar)}".encode()).hexdigest()  # a chain ID, in spirit
        members[f"{layer_id}/VERSION"] = b"1.0"
        members[f"{layer_id}/json"] = _json({"id": layer_id})
        if sha256(tar) in saved:  # as docker save does: a layer equal to an earlier one is a symlink to it
            members[f"{layer_id}/layer.tar"] = f"../{saved[sha256(tar)]}"
        else:
            members[f"{layer_id}/layer.tar"] = tar if isinstance(layer, bytes) else compress(tar, how)
            saved[sha256(tar)] = f"{layer_id}/layer.tar"
        names.append(f"{layer_id}/layer.tar")
        diff_ids.append(sha256(tar))
    config = _json({"architecture": "amd64", "os": "linux", "config": {},
                    "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    members[config_name] = config
    members["manifest.json"] = _json([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": names}])
    members["repositories"] = _json({"test": {"latest": names[-1].split("/")[0]}})
    write_members(path, members)
    return path


def write_members(path: Path, members: dict[str, bytes] | dict[str, bytes | str]) -> None:
    """An uncompressed tar of `members` (content, or a str: a symlink's target), sorted, directories first."""
    dirs = {name.rsplit("/", i)[0] for name in members for i in range(1, name.count("/") + 1)}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(dirs | set(members)):
            content = members.get(name)
            if content is None:
                tar.addfile(directory(name).info)
            elif isinstance(content, str):
                tar.addfile(symlink(name, content).info)
            else:
                entry = file(name, content)
                tar.addfile(entry.info, io.BytesIO(entry.data))


def read_members(path: Path) -> dict[str, bytes | str]:
    """The archive's files by name: content, or a str for a symlink's target."""
    with tarfile.open(path) as tar:
        return {m.name: m.linkname if m.issym() else tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isreg() or m.issym()}


def rewrite(path: Path, change: Callable[[str, bytes | str], bytes | str | None]) -> None:
    """Rewrites the archive member by member: `change(name, data)` returns new data, or None to drop the member."""
    members: dict[str, bytes | str] = {}
    for name, data in read_members(path).items():
        new = change(name, data)
        if new is not None:
            members[name] = new
    write_members(path, members)


def manifest(path: Path) -> dict:
    """The manifest index.json names, in an archive of one image."""
    members = read_members(path)
    digest = json.loads(members["index.json"])["manifests"][0]["digest"]
    return json.loads(members[f"blobs/sha256/{digest[7:]}"])
