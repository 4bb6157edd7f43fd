"""The demos check first what they need and say so on one line: run by an unprivileged user, they stop before
building anything with "demo: FAILED: needs root (why)"."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from support import NOBODY, ROOT, need


@pytest.mark.root
@pytest.mark.parametrize(("script", "why"), [("qemu/demo", "/nix/store"), ("qemu/demo-proxy", "network namespaces")])
def test_a_demo_run_unprivileged_says_it_needs_root_before_anything_else(script: str, why: str) -> None:
    store = os.stat("/nix/store")
    # (with a store nobody may write and no daemon to build for others, as Debian's nix-bin installs it)
    assert store.st_uid == 0 and not store.st_mode & stat.S_IWOTH, "/nix/store is writable by others here"
    assert not Path("/nix/var/nix/daemon-socket/socket").exists(), "a nix-daemon builds for other users here"
    before = sorted(p.name for p in (ROOT / "out").iterdir()) if (ROOT / "out").is_dir() else []
    proc = subprocess.run([need("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           str(ROOT / script)], capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: FAILED: needs root (") and why in lines[0], lines
    assert f"sudo make {Path(script).name}" in lines[0]
    assert (sorted(p.name for p in (ROOT / "out").iterdir()) if (ROOT / "out").is_dir() else []) == before
