"""Shared fixtures: real systems built with Nix, built outputs, a private build cache."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import build_system, netboot_ok


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every netboot the tests run keeps its build cache in a directory of this test session."""
    path = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(path)
    return path / "netboot"


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test system: kernel, modules, busybox, an init that checks the whole closure."""
    return build_system(tmp_path_factory.mktemp("system") / "result")


@pytest.fixture(scope="session")
def closure(system: Path) -> list[str]:
    return (system / "closure-paths").read_text().split()


@pytest.fixture(scope="session")
def outs(system: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test system built once in each format."""
    base = tmp_path_factory.mktemp("outs")
    netboot_ok("build", system, "--out", base / "squashfs")
    netboot_ok("build", system, "--out", base / "direct", "--format", "direct")
    netboot_ok("build", system, "--out", base / "erofs", "--format", "erofs")
    return {"squashfs": base / "squashfs", "direct": base / "direct", "erofs": base / "erofs"}


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for thousands of connections in the test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
