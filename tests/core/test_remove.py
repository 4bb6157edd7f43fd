"""The one tree remover: no recursion, no symlink followed, read-only directories, one descriptor at a time."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support import nobody_python

from netboot.core.remove import remove_tree


def deep_tree(top: Path, depth: int, outside: Path) -> None:
    """`top`/d/d/…/d, `depth` directories deep (deeper than a path can name), each holding a file and a
    symlink to `outside`, every tenth directory read-only."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            os.symlink(outside, "l", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if level % 10 == 0:
                os.fchmod(fd, 0o555)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """What symlinks in the trees point at: it must survive every removal."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "keep").write_text("kept\n")
    return path


def test_a_tree_deeper_than_the_recursion_limit_and_the_descriptor_limit(tmp_path: Path, outside: Path) -> None:
    descriptors = 512
    depth = max(sys.getrecursionlimit(), descriptors) + 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        deep_tree(tmp_path / "t", depth, outside)
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, hard))
        remove_tree(tmp_path / "t")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # Left behind, the tree would break pytest's own clean-up of old temporary directories (shutil.rmtree).
        subprocess.run(["rm", "-rf", str(tmp_path / "t")], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]
    assert (outside / "keep").read_text() == "kept\n"


def test_symlinks_are_removed_not_followed(tmp_path: Path, outside: Path) -> None:
    (tmp_path / "link").symlink_to(outside)
    remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and (outside / "keep").exists()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "to-outside").symlink_to(outside)
    (tree / "file").write_text("x")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree("tree", dir_fd=parent)
    finally:
        os.close(parent)
    assert not tree.exists() and (outside / "keep").exists()


def test_missing_is_no_error_and_files_are_removed(tmp_path: Path) -> None:
    remove_tree(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    remove_tree(tmp_path / "file")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_directories_of_an_unprivileged_user(tmp_path: Path) -> None:
    """As `nobody` (root reads every directory): its own 0000 and 0555 directories are opened up and removed."""
    base = Path("/tmp") / f"netboot-remove-{os.getpid()}"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    try:
        script = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from netboot.core.remove import remove_tree\n"
            "t = Path(sys.argv[1])\n"
            "(t / 'a' / 'b').mkdir(parents=True)\n"
            "(t / 'a' / 'b' / 'f').write_text('x')\n"
            "(t / 'r').mkdir()\n"
            "(t / 'r' / 'g').write_text('y')\n"
            "(t / 'a' / 'b').chmod(0)\n"
            "(t / 'a').chmod(0)\n"
            "(t / 'r').chmod(0o555)\n"
            "remove_tree(t)\n"
            "print(t.exists())\n"
        )
        python, env = nobody_python(base / "python")
        done = subprocess.run([*python, "-c", script, str(base / "t")], capture_output=True, text=True, cwd="/",
                              env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "False"
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)
