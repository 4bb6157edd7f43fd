"""The OCI unpacker against real archives: layer order, whiteouts, entry types, owners, and every refusal."""

from __future__ import annotations

import json
import logging
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from ocimake import (
    Entry,
    Layer,
    compress,
    device,
    directory,
    fifo,
    file,
    hardlink,
    layer_tar,
    manifest,
    oci_archive,
    oci_index_archive,
    opaque,
    read_members,
    rewrite,
    sha256,
    symlink,
    whiteout,
    write_members,
)

from netboot.core.errors import NetbootError
from netboot.image.limits import ImageLimits
from netboot.image.oci import OciImage, unpack

DIR = "dir"


def listing(root: Path) -> dict[str, object]:
    """Everything below `root`: a file's content, DIR, or "-> target" for a symlink; never following symlinks."""
    found: dict[str, object] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = DIR
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = stat.filemode(path.lstat().st_mode)
    return dict(sorted(found.items()))


def dest_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "root"
    dest.mkdir()
    return dest


def unpacked(tmp_path: Path, layers: list[Layer], *, keep_owners: bool = False, **options) -> Path:
    archive = oci_archive(tmp_path / "image.tar", layers, **options)
    dest = dest_dir(tmp_path)
    unpack(archive, dest, keep_owners=keep_owners)
    return dest


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_layers_apply_in_order(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "image.tar", [
        [directory("etc"), file("etc/hostname", b"one\n"), file("etc/motd", b"hi\n")],
        [file("etc/hostname", b"two\n"), file("/etc/absolute", b"abs\n"), file("./etc/dotted", b"dot\n")],
    ])
    dest = dest_dir(tmp_path)
    image = unpack(archive, dest, keep_owners=False)
    index = json.loads(read_members(archive)["index.json"])
    assert image == OciImage(index["manifests"][0]["digest"], 2, "oci")
    assert listing(dest) == {
        "etc": DIR, "etc/absolute": b"abs\n", "etc/dotted": b"dot\n", "etc/hostname": b"two\n", "etc/motd": b"hi\n",
    }


def test_whiteouts_remove_files_and_trees_of_lower_layers(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, [
        [file("a/f", b"f"), directory("a/t"), file("a/t/x"), directory("a/t/y"), file("a/t/y/z"),
         file("a/keep", b"k"), symlink("a/l", "/gone")],
        # The last whiteout names an entry of its own layer, which only a later layer's whiteout can remove.
        [whiteout("a/f"), whiteout("a/t"), whiteout("a/l"), whiteout("a/never-there"),
         file("a/new", b"n"), whiteout("a/new")],
    ])
    assert listing(dest) == {"a": DIR, "a/keep": b"k", "a/new": b"n"}


def test_opaque_directory_keeps_its_own_layers_entries(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, [
        [directory("d"), file("d/old"), directory("d/sub"), file("d/sub/old"), file("other", b"o")],
        [directory("d"), file("d/before", b"b"), directory("d/sub"), file("d/sub/mine"), opaque("d"),
         file("d/after", b"a"), opaque("fresh")],
    ])
    assert listing(dest) == {
        "d": DIR, "d/after": b"a", "d/before": b"b", "d/sub": DIR, "d/sub/mine": b"", "fresh": DIR, "other": b"o",
    }


def test_an_entry_replaces_one_of_another_type(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, [
        [directory("p"), file("p/child"), file("q", b"q"), directory("r"), file("r/x"), symlink("s", "/elsewhere"),
         directory("t"), file("t/kept", b"kept")],
        [file("p", b"now a file"), directory("q"), file("q/inside"), symlink("r", "/target"), directory("s"),
         directory("t", 0o700)],
    ])
    assert listing(dest) == {
        "p": b"now a file", "q": DIR, "q/inside": b"", "r": "-> /target", "s": DIR, "t": DIR, "t/kept": b"kept",
    }
    assert mode(dest / "t") == 0o700


def test_hard_links(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, [
        [file("bin/busybox", b"BB", 0o755)],
        [hardlink("bin/sh", "bin/busybox"), file("lib/a", b"A"), hardlink("lib/b", "/lib/a")],
    ])
    assert (dest / "bin/sh").stat().st_ino == (dest / "bin/busybox").stat().st_ino
    assert (dest / "lib/b").stat().st_ino == (dest / "lib/a").stat().st_ino
    assert (dest / "bin/sh").read_bytes() == b"BB"


def test_symlinks_are_made_as_they_are(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, [[
        symlink("bin/sh", "/nix/store/abc-busybox/bin/busybox"), symlink("etc/mtab", "../proc/self/mounts"),
        symlink("lib64", "lib"), symlink("etc/passwd", "/etc/passwd"),
    ]])
    assert listing(dest) == {
        "bin": DIR, "bin/sh": "-> /nix/store/abc-busybox/bin/busybox", "etc": DIR, "etc/mtab": "-> ../proc/self/mounts",
        "etc/passwd": "-> /etc/passwd", "lib64": "-> lib",
    }


def test_modes_with_setuid_setgid_and_sticky_bits(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, [
        [directory("usr/bin"), file("usr/bin/su", b"su", 0o4755), file("usr/bin/wall", b"w", 0o2755),
         directory("tmp", 0o1777), file("etc/shadow", b"", 0o600), directory("setgid", 0o2775),
         directory("ro", 0o555), file("ro/inside", b"", 0o444)],
        [file("ro/later", b"l", 0o640)],  # a later layer fills a read-only directory
    ])
    assert mode(dest / "usr/bin/su") == 0o4755
    assert mode(dest / "usr/bin/wall") == 0o2755
    assert mode(dest / "tmp") == 0o1777
    assert mode(dest / "etc/shadow") == 0o600
    assert mode(dest / "ro") == 0o555
    assert mode(dest / "ro/inside") == 0o444
    assert mode(dest / "ro/later") == 0o640
    assert mode(dest / "setgid") == 0o2775
    assert mode(dest / "usr") == 0o755  # a parent the layer does not list


OWNED = [[
    directory("home/user", 0o2750, uid=1000, gid=100), file("home/user/tool", b"", 0o4711, uid=1000, gid=100),
    symlink("home/user/link", "/x", uid=1000, gid=101), file("root-file", b""),
]]


def test_owners_kept(tmp_path: Path) -> None:
    assert os.getuid() == 0, "applying owners needs root: run this test as root"
    dest = unpacked(tmp_path, OWNED, keep_owners=True)
    owners = {p: (st.st_uid, st.st_gid) for p in listing(dest) if (st := (dest / p).lstat())}
    assert owners == {"home": (0, 0), "home/user": (1000, 100), "home/user/link": (1000, 101),
                      "home/user/tool": (1000, 100), "root-file": (0, 0)}
    assert mode(dest / "home/user/tool") == 0o4711  # chown clears setuid: the mode is set after it
    assert mode(dest / "home/user") == 0o2750


def test_owners_not_applied_without_keep_owners(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, OWNED, keep_owners=False)
    assert {((dest / p).lstat().st_uid, (dest / p).lstat().st_gid) for p in listing(dest)} == {
        (os.getuid(), os.getgid())
    }
    assert mode(dest / "home/user/tool") == 0o4711


DEVICES = [[directory("dev"), device("dev/null", 1, 3, 0o666), device("dev/loop0", 7, 0, 0o660, block=True),
            fifo("dev/initctl", 0o600)]]


def test_devices_made_when_owners_are_kept(tmp_path: Path) -> None:
    dest = unpacked(tmp_path, DEVICES, keep_owners=True)
    null, loop, initctl = ((dest / "dev" / name).lstat() for name in ("null", "loop0", "initctl"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0) and stat.S_IMODE(loop.st_mode) == 0o660
    assert stat.S_ISFIFO(initctl.st_mode) and stat.S_IMODE(initctl.st_mode) == 0o600


def test_devices_skipped_with_a_warning_otherwise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="netboot.image.oci"):
        dest = unpacked(tmp_path, DEVICES, keep_owners=False)
    assert listing(dest) == {"dev": DIR, "dev/initctl": "prw-------"}  # a FIFO needs no root
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 device nodes" in warnings[0], warnings


def test_gzip_zstd_and_uncompressed_layers_told_by_their_bytes(tmp_path: Path) -> None:
    # Every layer claims to be a plain tar: the unpacker must look at the bytes.
    archive = oci_archive(tmp_path / "image.tar", [[file("a", b"gz")], [file("b", b"zst")], [file("c", b"plain")]],
                          compression=["gzip", "zstd", "none"], media_type="application/vnd.oci.image.layer.v1.tar")
    members = read_members(archive)
    heads = [members[f"blobs/sha256/{layer['digest'][7:]}"][:4] for layer in manifest(archive)["layers"]]
    assert heads[0][:2] == b"\x1f\x8b" and heads[1] == b"\x28\xb5\x2f\xfd" and heads[2] == b"c\0\0\0"
    dest = dest_dir(tmp_path)
    assert unpack(archive, dest, keep_owners=False).layers == 3
    assert listing(dest) == {"a": b"gz", "b": b"zst", "c": b"plain"}


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_docker_save_layout(tmp_path: Path, compression: str) -> None:
    # The third layer equals the first, so docker save writes its layer.tar as a symlink to the first one.
    archive = oci_archive(tmp_path / "image.tar", [[file("etc/os-release", b"1")], [file("etc/os-release", b"2")],
                                                   [file("etc/os-release", b"1")]],
                          layout="docker", compression=compression)
    members = read_members(archive)
    entry = json.loads(members["manifest.json"])[0]
    assert "index.json" not in members and [isinstance(members[name], str) for name in entry["Layers"]] == [
        False, False, True
    ]
    dest = dest_dir(tmp_path)
    image = unpack(archive, dest, keep_owners=False)
    assert image == OciImage(sha256(members[entry["Config"]]), 3, "docker")
    assert listing(dest) == {"etc": DIR, "etc/os-release": b"1"}


def test_image_index_chooses_linux_amd64(tmp_path: Path) -> None:
    archive = oci_index_archive(tmp_path / "image.tar", {
        "linux/arm64": [[file("arch", b"arm64")]],
        "linux/amd64": [[file("arch", b"amd64")], [file("more")]],
        "linux/riscv64": [[file("arch", b"riscv64")]],
    })
    dest = dest_dir(tmp_path)
    image = unpack(archive, dest, keep_owners=False)
    members = read_members(archive)
    index_digest = json.loads(members["index.json"])["manifests"][0]["digest"]
    amd64 = json.loads(members[f"blobs/sha256/{index_digest[7:]}"])["manifests"][1]
    assert amd64["platform"] == {"architecture": "amd64", "os": "linux"}
    assert image == OciImage(amd64["digest"], 2, "oci")
    assert listing(dest) == {"arch": b"amd64", "more": b""}


def test_image_index_chooses_the_platform_asked(tmp_path: Path) -> None:
    """An arm64 kernel's build takes linux/arm64 from an index; an index of one image for another platform is
    refused rather than unpacked for a kernel that could not run it."""
    images = {"linux/amd64": [[file("arch", b"amd64")]], "linux/arm64": [[file("arch", b"arm64")]]}
    archive = oci_index_archive(tmp_path / "image.tar", images)
    dest = dest_dir(tmp_path)
    unpack(archive, dest, keep_owners=False, platform="linux/arm64")
    assert listing(dest) == {"arch": b"arm64"}
    only = oci_index_archive(tmp_path / "only.tar", {"linux/amd64": images["linux/amd64"]})
    index_digest = json.loads(read_members(only)["index.json"])["manifests"][0]["digest"]
    with pytest.raises(NetbootError) as e:
        unpack(only, tmp_path / "other", keep_owners=False, platform="linux/arm64")
    assert str(e.value) == (f"{only}: image index {index_digest} holds one image, for linux/amd64, and the kernel "
                            "needs linux/arm64")


# Errors: one line each, naming what is wrong.


def error(archive: Path, dest: Path | None = None) -> str:
    with pytest.raises(NetbootError) as e:
        unpack(archive, dest or archive.parent / "root", keep_owners=True)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_image_index_without_linux_amd64(tmp_path: Path) -> None:
    archive = oci_index_archive(tmp_path / "image.tar", {"linux/arm64": [[file("a")]], "linux/riscv64": [[file("a")]]})
    index_digest = json.loads(read_members(archive)["index.json"])["manifests"][0]["digest"]
    assert error(archive, dest_dir(tmp_path)) == (
        f"{archive}: image index {index_digest} lists 2 images and none for linux/amd64 (linux/arm64, linux/riscv64)"
    )


def test_missing_blob(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "image.tar", [[file("a")], [file("b")]])
    digest = manifest(archive)["layers"][1]["digest"]
    rewrite(archive, lambda name, data: None if name == f"blobs/sha256/{digest[7:]}" else data)
    dest = dest_dir(tmp_path)
    assert error(archive, dest) == f"{archive}: layer {digest} is missing from the archive"
    assert listing(dest) == {}  # found out before anything is written


def test_missing_layer_in_docker_layout(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "image.tar", [[file("a")]], layout="docker")
    layer = json.loads(read_members(archive)["manifest.json"])[0]["Layers"][0]
    rewrite(archive, lambda name, data: None if name == layer else data)
    assert error(archive, dest_dir(tmp_path)) == f"{archive}: layer {layer} is missing from the archive"


@pytest.mark.parametrize("damage", ["other layer", "truncated"])
def test_digest_mismatch(tmp_path: Path, damage: str) -> None:
    other = oci_archive(tmp_path / "other.tar", [[file("x", b"something else")]])
    other_blob = read_members(other)[f"blobs/sha256/{manifest(other)['layers'][0]['digest'][7:]}"]
    archive = oci_archive(tmp_path / "image.tar", [[file("x", b"expected")]])
    digest = manifest(archive)["layers"][0]["digest"]
    replace = {"other layer": lambda data: other_blob, "truncated": lambda data: data[: len(data) // 2]}[damage]
    rewrite(archive, lambda name, data: replace(data) if name == f"blobs/sha256/{digest[7:]}" else data)
    message = error(archive, dest_dir(tmp_path))
    assert message.startswith(f"{archive}: layer {digest} does not match its digest: its content hashes to sha256:")


def test_layer_that_is_not_a_tar(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "image.tar", [[file("a")], b"this is no tar archive" * 50])
    digest = manifest(archive)["layers"][1]["digest"]
    assert error(archive, dest_dir(tmp_path)).startswith(f"{archive}: layer {digest} is not a valid tar archive (")


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    path.write_bytes(b"hello, not a tar\n" * 100)
    assert error(path) == f"{path} is not a tar archive"
    assert error(tmp_path / "missing.tar") == f"cannot read {tmp_path / 'missing.tar'}: No such file or directory"


def test_no_index(tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    write_members(path, {"hello.txt": b"hi", "blobs/sha256/00": b""})
    assert error(path) == f"{path} is not an OCI image archive (no index.json or manifest.json)"


def test_unsupported_manifest_media_type(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "image.tar", [[file("a")]])
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    rewrite(archive, lambda name, data: data.replace(b"application/vnd.oci.image.manifest.v1+json",
                                                     schema1.encode()) if name == "index.json" else data)
    assert error(archive) == f"{archive}: index.json: unsupported manifest media type {schema1!r}"


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("index.json", b"{not json", "index.json is not valid JSON: "),
    ("index.json", b'{"manifests": [{"digest": "sha256:00"}]}', "index.json has no 'mediaType' string"),
    ("index.json", b'{"manifests": {}}', "index.json has no 'manifests' list"),
    ("index.json", b'{"manifests": []}', "index.json lists no image"),
    ("index.json", b'{"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "md5:1"}]}',
     "manifest has an unsupported digest 'md5:1' (not sha256)"),
    ("manifest.json", b'{"Config": "c.json"}', "manifest.json should list exactly one image"),
    ("manifest.json", b'[{"Layers": []}]', "manifest.json has no 'Config' string"),
])
def test_malformed_json(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / "image.tar"
    write_members(path, {name: content})
    assert error(path).startswith(f"{path}: {expected}")


# Refusals: nothing may be written outside dest, whatever the layers say.


def _sentinel(tmp_path: Path) -> Path:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"keep")
    return sentinel


REFUSED: dict[str, tuple[Callable[[Path], list[Layer]], str, str]] = {
    "dotdot": (lambda s: [[file("../sentinel/pwned", b"x")]], "../sentinel/pwned", "its name leaves the root"),
    "dotdot inside a name": (lambda s: [[file("a/../../sentinel/pwned")]], "a/../../sentinel/pwned",
                             "its name leaves the root"),
    "hard link target": (lambda s: [[hardlink("pwned", "../sentinel/keep")]], "pwned",
                         "its hard link target ../sentinel/keep leaves the root"),
    "hard link to nothing": (lambda s: [[hardlink("h", "nowhere")]], "h",
                             "its hard link target nowhere is not in the image"),
    "hard link through a symlink": (lambda s: [[symlink("s", "../sentinel"), hardlink("h", "s/keep")]], "h",
                                    "goes through the symlink s"),
    "symlink pointing outside": (lambda s: [[symlink("escape", "../sentinel"), file("escape/pwned")]],
                                 "escape/pwned", "goes through the symlink escape"),
    "absolute symlink": (lambda s: [[symlink("etc", str(s)), file("etc/pwned")]], "etc/pwned",
                         "goes through the symlink etc"),
    "symlink pointing inside": (lambda s: [[directory("real"), symlink("alias", "real"), file("alias/x")]],
                                "alias/x", "goes through the symlink alias"),
    "symlink of a lower layer": (lambda s: [[symlink("etc", "../sentinel")], [directory("etc/sub"),
                                                                              file("etc/sub/pwned")]],
                                 "etc/sub", "goes through the symlink etc"),
    "whiteout through a symlink": (lambda s: [[symlink("s", "../sentinel")], [whiteout("s/keep")]], "s/.wh.keep",
                                   "goes through the symlink s"),
    "opaque through a symlink": (lambda s: [[symlink("s", str(s))], [opaque("s")]], "s/.wh..wh..opq",
                                 "goes through the symlink s"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused(tmp_path: Path, case: str) -> None:
    layers, entry, reason = REFUSED[case]
    sentinel = _sentinel(tmp_path)
    archive = oci_archive(tmp_path / "image.tar", layers(sentinel))
    digest = manifest(archive)["layers"][-1]["digest"]
    assert error(archive, dest_dir(tmp_path)) == f"{archive}: layer {digest}: entry {entry}: {reason}"
    assert listing(sentinel) == {"keep": b"keep"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.tar", "root", "sentinel"]


def test_layer_tar_is_what_tarfile_reads(tmp_path: Path) -> None:
    # ocimake's layers are plain POSIX tars: tarfile lists what was put in, in order.
    data = layer_tar([directory("d"), file("d/f", b"x", 0o600), whiteout("d/g"), opaque("d")])
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    with tarfile.open(path) as tar:
        assert [(m.name, m.mode) for m in tar] == [("d", 0o755), ("d/f", 0o600), ("d/.wh.g", 0o644),
                                                   ("d/.wh..wh..opq", 0o644)]


# Limits: what an image may cost is bounded, each bound a one-line refusal before it is spent.


def limited(tmp_path: Path, layers: list[Layer], **limits: int) -> tuple[str, Path]:
    """The error unpacking `layers` within `limits`, and the root it was unpacked into."""
    tmp_path.mkdir(exist_ok=True)
    archive = oci_archive(tmp_path / "image.tar", layers)
    dest = dest_dir(tmp_path)
    with pytest.raises(NetbootError) as e:
        unpack(archive, dest, keep_owners=False, limits=ImageLimits(**limits))
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return message, dest


def last_layer(tmp_path: Path) -> str:
    return f"{tmp_path / 'image.tar'}: layer {manifest(tmp_path / 'image.tar')['layers'][-1]['digest']}"


def test_entries_of_all_layers_counted(tmp_path: Path) -> None:
    layers: list[Layer] = [[file(f"a{i}") for i in range(6)], [file(f"b{i}") for i in range(5)]]
    message, dest = limited(tmp_path, layers, max_entries=10)
    assert message == (f"{last_layer(tmp_path)}: entry b4: the image has more than 10 entries "
                       "(--max-image-entries)")
    assert "b4" not in listing(dest)
    (tmp_path / "x").mkdir()
    unpack(oci_archive(tmp_path / "fits.tar", layers), dest_dir(tmp_path / "x"), keep_owners=False,
           limits=ImageLimits(max_entries=11))


def test_parents_a_layer_does_not_list_count_as_entries(tmp_path: Path) -> None:
    # The archive's own 7 members are within the limit; the layer's one entry and 9 parents are not.
    message, _ = limited(tmp_path, [[file("a/b/c/d/e/f/g/h/i/j")]], max_entries=9)
    assert message.endswith("entry a/b/c/d/e/f/g/h/i/j: the image has more than 9 entries (--max-image-entries)")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_declared_size_refused_before_it_is_spent(tmp_path: Path, compression: str) -> None:
    # 64 MiB of zeros: a few kilobytes compressed, refused at its header, not after decompressing it.
    bomb = compress(layer_tar([file("small", b"s" * 1000), file("big", bytes(64 << 20)), file("after")]),
                    compression)
    assert len(bomb) < 1 << 20
    message, dest = limited(tmp_path, [bomb], max_bytes=1 << 20)
    assert message.endswith("entry big: the image is larger than 1 MiB (--max-image-bytes)"), message
    assert listing(dest) == {"small": b"s" * 1000}


def test_bytes_counted_as_they_are_read(tmp_path: Path) -> None:
    # Files of no data, each after a PAX header of 512 KiB: the headers declare nothing, the stream is counted.
    entries = []
    for i in range(8):
        entry = file(f"f{i}")
        entry.info.pax_headers = {"comment": "x" * (512 << 10)}
        entries.append(entry)
    message, dest = limited(tmp_path, [entries], max_bytes=2 << 20)
    assert message == f"{last_layer(tmp_path)}: the image is larger than 2 MiB (--max-image-bytes)"
    assert len(listing(dest)) < 4


def test_names_longer_than_path_max(tmp_path: Path) -> None:
    long_name = "/".join(["n" * 250] * 17)  # each component within NAME_MAX, the whole beyond PATH_MAX
    message, dest = limited(tmp_path, [[file("ok"), file(long_name)]])
    assert message.startswith(f"{last_layer(tmp_path)}: entry {'n' * 120}… (4,266 characters): ")
    assert message.endswith(": its name is 4,266 bytes long, more than 4,096")
    assert listing(dest) == {"ok": b""}
    link = symlink("l", "t" * 4097)
    message, _ = limited(tmp_path / "link", [[link]])
    assert message.endswith("entry l: its link target is 4,097 bytes long, more than 4,096")


def test_paths_deeper_than_256(tmp_path: Path) -> None:
    message, dest = limited(tmp_path, [[file("d/" * 256 + "f")]])
    assert message.endswith(": it is 257 directories deep, more than 256")
    assert listing(dest) == {}
    (tmp_path / "x").mkdir()
    unpack(oci_archive(tmp_path / "fits.tar", [[file("d/" * 255 + "f")]]), dest_dir(tmp_path / "x"),
           keep_owners=False)


def raw_layer(headers: list[bytes], *entries: Entry) -> bytes:
    """A layer tar of raw header blocks (each with its data), then `entries`."""
    return b"".join(headers) + layer_tar(list(entries))


def extension(kind: bytes, data: bytes) -> bytes:
    """A tar extension header (PAX "x" or "g", GNU long name "L") with its data, padded to blocks."""
    info = tarfile.TarInfo("././@Extension")
    info.type, info.size = kind, len(data)
    return info.tobuf(tarfile.USTAR_FORMAT if kind != tarfile.GNUTYPE_LONGNAME else tarfile.GNU_FORMAT) + \
        data + bytes(-len(data) % 512)


def pax(records: dict[str, str]) -> bytes:
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        n = len(body) + 1
        n = len(body) + len(str(n + len(str(n))))
        out += str(n).encode() + body
    return out


@pytest.mark.parametrize(("case", "expected"), [
    ("extension header of 2 MiB", "a tar extension header of 2,097,152 bytes (at most 1,048,576)"),
    ("2,000 extension headers in a row", "more than 8 tar extension headers in a row"),
    ("global headers over 4 KiB", "global PAX headers of more than 4,096 bytes"),
    ("GNU sparse file", "a sparse file (GNU tar --sparse), which no image builder writes: not unpacked"),
])
def test_tar_extensions_bounded_before_they_are_read(tmp_path: Path, case: str, expected: str) -> None:
    # tarfile would read each whole into memory, follow a run of them by recursion (RecursionError at about
    # a thousand), and copy global records into every later member.
    match case:
        case "extension header of 2 MiB":
            layer = raw_layer([extension(tarfile.XHDTYPE, pax({"comment": "x" * (2 << 20)})[: 2 << 20])], file("f"))
        case "2,000 extension headers in a row":
            layer = raw_layer([extension(tarfile.XHDTYPE, pax({"comment": "x"}))] * 2000, file("f"))
        case "global headers over 4 KiB":
            layer = raw_layer([extension(tarfile.XGLTYPE, pax({f"k{i}": "v" * 1000})) for i in range(5)], file("b"))
        case _:
            sparse = tarfile.TarInfo("holes")
            sparse.type = tarfile.GNUTYPE_SPARSE
            layer = sparse.tobuf(tarfile.GNU_FORMAT) + layer_tar([file("after")])
    message, _ = limited(tmp_path, [layer])
    assert message.startswith(last_layer(tmp_path)) and message.endswith(expected), message


def test_json_documents_bounded(tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    write_members(path, {"index.json": b"{" + b" " * (5 << 20) + b"}"})
    assert error(path) == f"{path}: index.json is larger than 4 MiB"


def test_members_of_the_archive_counted(tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "image.tar", [[file("a")]])
    with pytest.raises(NetbootError) as e:
        unpack(archive, dest_dir(tmp_path), keep_owners=False, limits=ImageLimits(max_entries=3))
    assert str(e.value) == f"{archive}: more than 3 files (--max-image-entries)"
