"""`netboot publish`: a build's artifacts in a content-addressed tree that any static server, CDN or object store
can serve as it is.

    DEST/<sha256 of manifest.json>/bzImage (Image for arm64), initrd, cmdline, netboot.ipxe, manifest.json (and
    image, from --fetch)

The manifest records every other artifact's sha256, so its own hash names the whole build. A build's directory
is written under a temporary name, its files checked against the manifest and synced, then renamed into place
in one step; it is never rewritten (publishing the same build again finds it and changes nothing), so caches in
front of the tree may keep its files forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from netboot.core.artifacts import IMAGE, arch_of, files
from netboot.core.durable import sync_dir
from netboot.core.errors import NetbootError
from netboot.core.remove import remove_tree

_CHUNK = 1 << 20


def manifest_digest(manifest_bytes: bytes) -> str:
    """The content address of a build: the sha256 of its manifest."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def publish(out: Path, dest: Path) -> tuple[Path, bool]:
    """Publish the build in `out` under `dest`; returns its directory there, and whether it was written now
    (False: it was already there)."""
    try:
        manifest_bytes = (out / "manifest.json").read_bytes()
    except FileNotFoundError:
        raise NetbootError(f"{out} has no manifest.json; is it an output of netboot build?") from None
    except OSError as e:
        raise NetbootError(f"cannot read {out}/manifest.json: {e.strerror}") from None
    try:
        manifest = json.loads(manifest_bytes)
        artifacts = manifest["artifacts"]
        # A --fetch build's image is published with the rest: stage 1 fetches it from base_url.
        names = files(arch_of(manifest))
        if IMAGE in artifacts:
            names = (*names, IMAGE)
        expected = {name: str(artifacts[name]["sha256"]) for name in names if name != "manifest.json"}
    except (ValueError, KeyError, TypeError) as e:
        raise NetbootError(f"{out}/manifest.json is not a netboot manifest ({e})") from None
    final = dest / manifest_digest(manifest_bytes)
    if final.is_dir():
        return final, False
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name[:16]}.", dir=dest))
    except OSError as e:
        raise NetbootError(f"cannot write into {dest}: {e.strerror}") from None
    try:
        for name in names:
            digest = _copy(out / name, staging / name)
            if name in expected and digest != expected[name]:
                raise NetbootError(f"{out}/{name} does not match its manifest (sha256 {digest}, the manifest says "
                                   f"{expected[name]}); build it again")
        os.chmod(staging, 0o755)
        sync_dir(staging)
        try:
            os.rename(staging, final)
        except OSError:
            if final.is_dir():  # published by someone else meanwhile: the same bytes, by their name
                remove_tree(staging)
                return final, False
            raise
        sync_dir(dest)
    except OSError as e:
        with contextlib.suppress(OSError):
            remove_tree(staging)
        raise NetbootError(f"cannot publish into {dest}: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            remove_tree(staging)
        raise
    return final, True


def _copy(src: Path, dst: Path) -> str:
    """Copy a file, synced, returning the sha256 of the bytes written."""
    h = hashlib.sha256()
    try:
        fin = open(src, "rb")  # noqa: SIM115 (closed below, with the output)
    except OSError as e:
        raise NetbootError(f"cannot read {src}: {e.strerror}") from None
    with fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fchmod(fout.fileno(), 0o444)
        os.fsync(fout.fileno())
    return h.hexdigest()

