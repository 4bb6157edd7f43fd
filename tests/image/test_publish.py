"""`netboot publish` and base_url: a build in a content-addressed tree (a machine booting from such a mirror:
tests/vm/test_fetch_boot.py)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from support import built, cli, netboot_ok

from netboot.core.artifacts import FILES


def published(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir())


def test_publish_writes_the_build_under_its_manifest_hash(outs: dict[str, Path], tmp_path: Path) -> None:
    out, dest = outs["squashfs"], tmp_path / "mirror"
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    done = netboot_ok("publish", out, dest)
    assert done.stdout.strip() == f"{dest}/{digest}: published"
    assert published(dest) == [dest / digest]
    for name in FILES:
        assert (dest / digest / name).read_bytes() == (out / name).read_bytes()
        assert (dest / digest / name).stat().st_mode & 0o777 == 0o444
    before = {name: (dest / digest / name).stat() for name in FILES}
    # Again: found, not rewritten.
    again = netboot_ok("publish", out, dest)
    assert again.stdout.strip() == f"{dest}/{digest}: already published, left as it is"
    for name in FILES:
        st = (dest / digest / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    # Another build lands beside it.
    netboot_ok("publish", outs["direct"], dest)
    assert len(published(dest)) == 2


def test_an_artifact_that_does_not_match_its_manifest_is_not_published(outs: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(outs["direct"], out, symlinks=False)
    (out / "cmdline").write_text("tampered\n")
    done = cli("publish", out, tmp_path / "mirror")
    assert done.returncode == 2
    assert re.fullmatch(rf"netboot: error: {out}/cmdline does not match its manifest \(sha256 [0-9a-f]{{64}}, "
                        r"the manifest says [0-9a-f]{64}\); build it again\n", done.stderr), done.stderr
    assert published(tmp_path / "mirror") == []  # nothing half-written


def test_publish_refuses_what_is_not_a_build(tmp_path: Path) -> None:
    done = cli("publish", tmp_path, tmp_path / "mirror")
    assert done.returncode == 2
    assert done.stderr == f"netboot: error: {tmp_path} has no manifest.json; is it an output of netboot build?\n"
    assert not (tmp_path / "mirror").exists()


@pytest.mark.vm
def test_a_fetch_build_is_published_with_its_image(system: Path, tmp_path: Path) -> None:
    out = built(system, "--format", "squashfs", "--fetch")
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    netboot_ok("publish", out, tmp_path / "mirror")
    assert (tmp_path / "mirror" / digest / "image").read_bytes() == (out / "image").read_bytes()
    assert sorted(p.name for p in (tmp_path / "mirror" / digest).iterdir()) == sorted([*FILES, "image"])
