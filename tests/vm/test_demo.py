"""`make demo` as a user runs it: qemu/demo builds, packs, serves and network-boots the demo system, on a machine
where the status page's default port (9480) is taken by something else."""

from __future__ import annotations

import errno
import re
import socket
import subprocess

import pytest
from support import ROOT


@pytest.mark.nix
@pytest.mark.slow
def test_the_demo_succeeds_with_port_9480_taken() -> None:
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 9480))
            taken.listen()
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e  # taken already: what this test wants
        proc = subprocess.run([str(ROOT / "qemu/demo")], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("demo: SUCCESS"), proc.stdout[-3000:]
    status = re.search(r"the status page, while the demo runs: http://127\.0\.0\.1:(\d+)/", proc.stdout)
    assert status is not None and status.group(1) != "9480", proc.stdout[-3000:]
