"""Shared fixtures: real systems built with Nix, built outputs, a private build cache; the suite's markers.

Markers come from where a test lives and what it uses, so that a new test gets them without a line:
`vm` (boots QEMU: everything in tests/vm/, and the few boots marked where their subject lives), `root` (network
namespaces, mounts, other users: tests/load/ and every test on a namespace LAN), `nix` (builds a system with
Nix: every test of the `system`, `closure` or `outs` fixtures). `make test-quick` runs neither VMs nor root.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from support import ROOT, build_system, built, memoized

from devtools.postgres import Cluster

TESTS = Path(__file__).resolve().parent
FOLDER_MARKS = {"vm": ("vm",), "load": ("root",)}
FIXTURE_MARKS = {
    "lan": ("root",),
    "root": ("root",),  # image/test_rootfs.py's root filesystem: device nodes, files of other owners
    "system": ("nix",), "closure": ("nix",), "outs": ("nix",), "arm64_system": ("nix",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        marks = {*FOLDER_MARKS.get(folder, ())}
        for fixture in getattr(item, "fixturenames", ()):
            marks.update(FIXTURE_MARKS.get(fixture, ()))
        for mark in sorted(marks):
            item.add_marker(mark)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Longest first, so that the run ends on short tests with every worker busy: with --dist load the tests
        # are handed out one at a time in this order (pytest_xdist_make_scheduler), each worker taking the
        # longest left. Stable: tests of one weight keep their order, and a module's stay together.
        items.sort(key=weight, reverse=True)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist load` (make test) as one test at a time in collection order, as workers free up, except that a
    class's tests go to one worker together, for what a class fixture makes once (VMs booted for several
    tests). xdist's own `load` hands out runs of consecutive tests, and its `loadgroup` does not group under
    pytest 9 (it renames items through `_nodeid`, which pytest 9 no longer reads)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneAtATime(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.split("::")
            return "::".join(parts[:2]) if len(parts) > 2 else nodeid  # a method's class, else the test

    config.option.loadscopereorder = False  # the order above, not the largest scope first
    return OneAtATime(config, log)


def weight(item: pytest.Item) -> int:
    """A rough rank of a test's time: VM boots marked slow (minutes of emulated CPU in one VM), VMs on a namespace
    LAN (firmware, often two VMs at once), other VM boots, then namespaces, Nix builds and large packing, then the
    rest."""
    marks = {m.name for m in item.iter_markers()}
    if "vm" in marks:
        if "slow" in marks:
            return 4
        return 3 if "lan" in getattr(item, "fixturenames", ()) else 2
    return 1 if marks & {"root", "nix", "slow"} else 0


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every netboot the tests run keeps its build cache in a directory of this test session (of this worker,
    with pytest-xdist); `support.memoized` keeps what the workers share beside the workers' directories."""
    base = tmp_path_factory.getbasetemp()
    support.SHARED[:] = [base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base]
    path = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(path)
    return path / "netboot"


@pytest.fixture(scope="session")
def system() -> Path:
    """The test system: kernel, modules, busybox, an init that checks the whole closure."""
    made = memoized("system", lambda path: (path / "path").write_text(str(build_system(path / "result"))))
    return Path((made / "path").read_text())


@pytest.fixture(scope="session")
def arm64_system() -> Path:
    """The test system for arm64, from Debian's arm64 kernel, modules and busybox-static (downloaded once a
    session; nothing of arm64 runs to build it)."""
    made = memoized("arm64-system",
                    lambda path: (path / "path").write_text(str(build_system(path / "result", arch="arm64"))))
    return Path((made / "path").read_text())


@pytest.fixture(scope="session")
def arm64_loaders() -> Path:
    """A --loaders arm64=DIR directory: Debian's signed shimaa64.efi, grubaa64.efi (network GRUB) and mmaa64.efi,
    from their arm64 packages (downloaded and unpacked once a session; nothing is installed)."""
    def make(path: Path) -> None:
        proc = subprocess.run([str(ROOT / "tests/system/arm64-loaders"), str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"fetching Debian's arm64 loaders failed:\n{proc.stderr[-3000:]}"
    return memoized("arm64-loaders", make) / "loaders"


@pytest.fixture(scope="session")
def closure(system: Path) -> list[str]:
    return (system / "closure-paths").read_text().split()


@pytest.fixture(scope="session")
def outs(system: Path) -> dict[str, Path]:
    """The test system built once in each format (once for the whole session, whatever the workers)."""
    formats = ["squashfs", "direct", "erofs"]
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    first = worker % len(formats)  # workers start on different builds, not all waiting for the same one
    return {fmt: built(system, "--format", fmt) for fmt in formats[first:] + formats[:first]}


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for thousands of connections in the test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def postgres() -> Iterator[Cluster]:
    """A started throwaway PostgreSQL cluster (devtools/postgres.py): role and database netboot, `postgres.url` to
    connect; removed after the test."""
    with Cluster() as cluster:
        yield cluster
