"""Run a command and measure it: wall time, its own peak RSS, and the peak RSS of its whole process tree."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    seconds: float
    own_rss_mb: float  # peak resident memory of the command's own process (VmHWM)
    tree_rss_mb: float  # peak of the summed resident memory of it and its children


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children of all its threads included."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            pass
    return found


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(
    argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, shell: bool = False
) -> Run:
    started = time.monotonic()
    proc = subprocess.Popen(argv if not shell else argv[0], shell=shell, env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    own = tree = 0
    while proc.poll() is None:
        own = max(own, _status_kb(proc.pid, "VmHWM:"))
        tree = max(tree, sum(_status_kb(p, "VmRSS:") for p in [proc.pid, *descendants(proc.pid)]))
        time.sleep(0.05)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr.read().decode()[-2000:]}")
    return Run(seconds, own / 1024, tree / 1024)


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.seconds for r in runs),
        max(r.own_rss_mb for r in runs),
        max(r.tree_rss_mb for r in runs),
    )


def tree_rss_kb(pid: int) -> int:
    """The summed resident memory of a process and all its descendants, in KiB."""
    return sum(_status_kb(p, "VmRSS:") for p in [pid, *descendants(pid)])


class PeakRss:
    """Samples `tree_rss_kb(pid)` every 50 ms in a thread while the block runs: `with PeakRss(pid) as peak:`,
    then `peak.mb`."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.kb = max(self.kb, tree_rss_kb(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.kb = max(self.kb, tree_rss_kb(self.pid))

    @property
    def mb(self) -> float:
        return self.kb / 1024
