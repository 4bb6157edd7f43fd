"""Group commit of lease changes, for the DHCPv4 and DHCPv6 servers: an answer that tells a client of a lease (or,
with a shared store, of an offer) waits until the change is durable; the changes of a burst are written as one
group, and a group's end starts the next.

The journal (netboot.dhcp.journal) writes in a thread of its own (its fdatasync must not hold up the loop); a
store that several servers share (netboot.dhcp.lease_database) writes on the loop, and its write says which claims
were lost to another server: the server decides what to do with those answers (`claimed`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from netboot.dhcp.leases import LeaseStore

T = TypeVar("T")
QUIET = 10.0  # seconds between log lines about failed journal writes


class GroupCommit(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop, store: LeaseStore | None, shared: bool,
                 send: Callable[[T], None], claimed: Callable[[list[T], set[str] | None], None],
                 logger: logging.Logger, part: str, answers: str) -> None:
        """`send`: an answer out; `claimed(answers, lost)`: a shared store's write returned, `lost` the addresses
        whose claims did not hold (None: the write failed, every claim is lost). `part`, `answers`: what the log
        lines say ("dhcp", "ACKs")."""
        self._loop = loop
        self._store = store
        self._shared = shared
        self._send = send
        self._claimed = claimed
        self._log = logger
        self._part, self._answers = part, answers
        self.waiting: list[T] = []  # answers for the next write
        self._writing = False
        self._write_failed = 0.0
        self._closed = False
        self._journal = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{part}-journal")
                         if store is not None and not shared else None)
        if self._journal is not None:
            # Once its fdatasync returns, the journal's thread waits for the GIL, and the answers with it: by
            # default up to 5 ms while the loop is busy answering. At 0.5 ms, ACKs to perfdhcp at 500 exchanges a
            # second averaged 10.8 ms instead of 19 ms (bench/dhcp_perf.py, same load).
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))

    def commit(self) -> None:
        """Write the lease changes recorded so far as one group, unless a write is under way (its end starts the
        next); the answers waiting for them go out when it returns."""
        if self._store is None or self._writing or self._closed:
            return
        batch = self._store.take()
        answers, self.waiting = self.waiting, []
        if batch is None:  # nothing new: what they wait for was written already
            for answer in answers:
                self._send(answer)
            return
        self._writing = True
        if self._shared:
            future: asyncio.Future = asyncio.ensure_future(self._store.write(batch))  # type: ignore[arg-type]
        else:
            future = self._loop.run_in_executor(self._journal, self._store.write, batch)
        future.add_done_callback(lambda f: self._written(batch, answers, f))

    def _written(self, batch: object, answers: list[T], future: asyncio.Future) -> None:
        self._writing = False
        if self._closed or future.cancelled():
            return
        error = future.exception()
        if self._shared:
            if error is not None:  # (a bug: the store reports what it expects as lost claims)
                self._log.error("%s: claims not made: %s", self._part, fault(error))
            self._claimed(answers, future.result() if error is None else None)
            self.commit()
            return
        if error is not None:
            assert self._store is not None
            self._store.restore(batch)  # tried again; the clients, unanswered, ask again
            now = time.monotonic()
            if now - self._write_failed >= QUIET:
                self._log.error("%s: cannot write the lease journal (%s): %d %s not sent", self._part, error,
                                len(answers), self._answers)
                self._write_failed = now
            self._loop.call_later(1.0, self.commit)
            return
        for answer in answers:
            self._send(answer)
        self.commit()

    def close(self) -> None:
        self._closed = True
        if self._journal is not None:
            self._journal.shutdown(wait=True)  # a write under way ends first
        if self._store is not None:
            self._store.close()  # writes what is left


def fault(e: BaseException) -> str:
    """An unexpected exception on one line: its type, message and where it was raised (file:line in function)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(e).__name__}: {str(e)[:200]!r}{where}"
