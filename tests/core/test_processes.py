"""Whether a process runs: one answer (core.run.pid_alive) for the build cache and the output directory's staging."""

from __future__ import annotations

import os
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from netboot.core.run import pid_alive
from netboot.image.outdir import Staging

NOBODY = 65534


def as_another_user(work: Callable[[], object]) -> str:
    """`work()` in a forked child that is not root (nor this process's user): its result, or its traceback."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(read)
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            answer = repr(work())
        except BaseException:
            answer = traceback.format_exc()
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


def test_a_running_and_an_ended_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)  # reaped: no such process


def test_a_process_of_another_user_is_alive() -> None:
    """kill(pid, 0) on a process of another user fails with EPERM: it exists all the same."""
    me = os.getpid()  # root's, when the tests run as root; the child asks as nobody
    assert as_another_user(lambda: pid_alive(me if os.getuid() == 0 else 1)) == "True"


def test_staging_keeps_what_a_live_build_of_another_user_is_writing() -> None:
    """An unfinished output is removed only when its build has ended, whoever's build it was (and only when it is
    the building user's own directory: never another user's)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        base.chmod(0o777)  # the build below runs as nobody
        live = base / f".out.netboot-{os.getpid()}-abc"  # this process's
        ended = subprocess.Popen(["true"])
        ended.wait()
        dead = base / f".out.netboot-{ended.pid}-def"
        for d in (live, dead):
            d.mkdir()
            if os.getuid() == 0:
                os.chown(d, NOBODY, NOBODY)  # the building user's, as its own leftovers would be

        def build() -> bool:
            with Staging(base / "out"):
                return True

        assert as_another_user(build) == "True"
        assert live.is_dir()
        assert not dead.exists()
