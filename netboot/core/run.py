"""Every external command goes through here: logged, and a failure becomes a clear NetbootError."""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from netboot.core.errors import NetbootError

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def dies_with_us() -> Callable[[], None]:
    """A `preexec_fn` that has the kernel kill the child (SIGKILL) when the thread that started it ends, so
    that a `kill -9` of netboot leaves no mksquashfs, compressor or worker running on. (The subprocess
    module has no such option; prctl is called through ctypes.)"""
    parent = os.getpid()
    return lambda: die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """In a child process: have the kernel kill it (SIGKILL) when the thread that started it ends; `parent`:
    the process that started it (if it is already gone, the child exits now)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists; one of another user counts (kill(2) says EPERM, not ESRCH)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def require(tool: str, hint: str) -> str:
    """Path of `tool` on PATH, or a NetbootError saying what to install."""
    path = shutil.which(tool)
    if path is None:
        raise NetbootError(f"{tool} not found on PATH ({hint})")
    return path


def describe(argv: Sequence[str]) -> str:
    shown = [*argv[:8], f"… ({len(argv) - 8} more arguments)"] if len(argv) > 12 else list(argv)
    return shlex.join(str(a) for a in shown)


def run(argv: Sequence[str], *, what: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion; on failure raise NetbootError naming `what` and the command's last words."""
    log.debug("running %s", describe(argv))
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("preexec_fn", dies_with_us())
    try:
        proc = subprocess.run(list(argv), check=False, **kwargs)
    except OSError as e:
        raise NetbootError(f"{what}: cannot run {argv[0]}: {e.strerror}") from e
    if proc.returncode != 0:
        raise failed(what, argv[0], proc.returncode, proc.stderr)
    return proc


def failed(what: str, program: str, returncode: int, stderr: bytes | None) -> NetbootError:
    """The one-line error for a command that exited non-zero."""
    return NetbootError(f"{what}: {Path(program).name} failed (exit {returncode}){last_words(stderr)}")


def last_words(stderr: bytes | None) -> str:
    """The last non-empty line a failed command printed, for a one-line error."""
    if not stderr:
        return ""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return f": {lines[-1]}" if lines else ""
