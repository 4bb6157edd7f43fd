"""Log lines of one kind under a flood: a hundred a second one by one, then one line a second that counts the rest.

A line costs about as much as answering a datagram (Python's logging), and the rule is to keep logging off the
per-packet path under load (fbtftp, tftpy #59); a rack powering on stays within the budget. The UDP servers log
through it what anyone can make them log (DHCP's answers and requests not answered, TFTP's refusals), since a
spoofed flood costs its sender nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

PER_SECOND = 100


class LogBudget:
    """Lines logged at INFO by `logger`, at most `per_second` a second: beyond, the count of the rest comes a
    second after the first of them, whether more follow or not."""

    def __init__(self, loop: asyncio.AbstractEventLoop, logger: logging.Logger, what: str, prefix: str = "",
                 per_second: int = PER_SECOND) -> None:
        self._loop = loop
        self._logger = logger
        self._counted = f"{prefix}and %d more {what} in the last second, not logged one by one"
        self._per_second = per_second
        self._second = 0.0  # the second whose lines are being logged, how many were, how many not
        self._logged = self._unlogged = 0

    def log(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._second >= 1.0 and not self._unlogged:
            self._second, self._logged = now, 0
        if self._logged < self._per_second:
            self._logged += 1
            self._logger.info(message, *args)
            return
        self._unlogged += 1
        if self._unlogged == 1:
            self._loop.call_at(self._loop.time() + self._second + 1.0 - now, self._count)

    def _count(self) -> None:
        self._logger.info(self._counted, self._unlogged)
        self._second, self._logged, self._unlogged = time.monotonic(), 0, 0


class Dropped:
    """Datagrams dropped as malformed: one WARNING line every `quiet` seconds at most, naming the last one's sender
    and reason, with the count of the others since the previous line."""

    def __init__(self, logger: logging.Logger, prefix: str, quiet: float = 10.0) -> None:
        self._logger = logger
        self._prefix = prefix
        self._quiet = quiet
        self._dropped = 0
        self._logged = 0.0

    def __call__(self, source: str, why: str) -> None:
        """`source`: the sender as the line shows it; `why`: escaped and cut short by the caller."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._logged < self._quiet:
            return
        more = f" (and {self._dropped - 1} more dropped in the last {self._quiet:.0f} s)" if self._dropped > 1 else ""
        self._logger.warning("%sdropped a datagram from %s: %s%s", self._prefix, source, why, more)
        self._dropped = 0
        self._logged = now


class OncePer:
    """A line per (who, reason) once every `again` seconds, within a LogBudget: a machine asking again and again is
    not logged each time. The keys kept are bounded: a flood of made-up ones forgets them all."""

    def __init__(self, budget: LogBudget, again: float = 600.0, most: int = 10_000) -> None:
        self._budget = budget
        self._again = again
        self._most = most
        self._seen: dict[tuple[str, str], float] = {}

    def log(self, who: str, reason: str, message: str, *args: object) -> None:
        now = time.monotonic()
        key = (who, reason)
        if now - self._seen.get(key, -self._again) < self._again:
            return
        if len(self._seen) > self._most:
            self._seen.clear()
        self._seen[key] = now
        self._budget.log(message, *args)
