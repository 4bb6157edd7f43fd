"""Fixtures for the TFTP tests: a served directory, and the real server running on loopback."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netboot.tftp import (
    FileSystemResolver,
    Resolver,
    TftpConfig,
    TftpServer,
    TransferStats,
    start_tftp_server,
)


def tool(name: str) -> str:
    """Path of a client the tests run; its absence fails the test (it is installed on every test machine)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (make test installs it; docs/dependencies.md)")
    return path


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ block by block, so a misplaced or repeated block shows."""
    import random

    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="session")
def tftp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tftp-root")
    (root / "small.bin").write_bytes(pattern(1000, 1))
    (root / "3m.bin").write_bytes(pattern(3 * 1024 * 1024 + 17, 2))
    (root / "exact.bin").write_bytes(pattern(512 * 8, 3))  # a multiple of 512: ends with an empty block
    (root / "empty.bin").write_bytes(b"")
    (root / "text.txt").write_bytes(b"line one\nline two\r\nbare CR\r at the end\n" * 300)
    (root / "sub").mkdir()
    (root / "sub" / "inner.bin").write_bytes(pattern(4000, 4))
    return root


class ServerThread:
    """The real server, in its own event loop on a thread, so that tests can run blocking clients."""

    def __init__(self, resolver: Resolver, config: TftpConfig, hosts: tuple[str, ...],
                 interface: str | None = None) -> None:
        self.stats: list[TransferStats] = []
        self.loop_errors: list[dict[str, object]] = []
        self._changed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: TftpServer | None = None
        args = (resolver, config, hosts, interface)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        assert self.server is not None
        self.port = self.server.addresses[0][1]

    def _record(self, stats: TransferStats) -> None:
        with self._changed:
            self.stats.append(stats)
            self._changed.notify_all()

    def _run(self, resolver: Resolver, config: TftpConfig, hosts: tuple[str, ...], interface: str | None
             ) -> None:
        asyncio.set_event_loop(self.loop)
        # Anything that escapes a callback on the server's loop is a bug: recorded, and fails the test.
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))

        async def start() -> None:
            server = await start_tftp_server(hosts[0], 0, resolver, config, interface=interface,
                                             on_transfer=self._record)
            for host in hosts[1:]:
                server.listen(host, server.addresses[0][1], interface)
            self.server = server

        try:
            self.loop.run_until_complete(start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the server's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(self._call(fn), self.loop)
        return future.result(10)

    @staticmethod
    async def _call(fn: Callable[[], object]) -> object:
        return fn()

    def wait_stats(self, count: int, timeout: float = 20) -> list[TransferStats]:
        """The first `count` finished transfers, waiting for them to finish."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.stats) >= count, timeout):
                pytest.fail(f"only {len(self.stats)} of {count} transfers finished within {timeout} s")
            return list(self.stats[:count])

    def stop(self) -> None:
        if self.loop.is_closed():
            return

        async def close() -> None:
            assert self.server is not None
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        assert not self.loop_errors, f"exceptions on the server's loop: {self.loop_errors}"


@pytest.fixture
def tftp_server(tftp_root: Path) -> Iterator[Callable[..., ServerThread]]:
    """A factory: tftp_server(config=..., resolver=..., hosts=...) -> a server, stopped after the test."""
    started: list[ServerThread] = []

    def start(config: TftpConfig | None = None, resolver: Resolver | None = None,
              hosts: tuple[str, ...] = ("127.0.0.1",), interface: str | None = None) -> ServerThread:
        resolver = resolver or FileSystemResolver(tftp_root)
        server = ServerThread(resolver, config or TftpConfig(), hosts, interface)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def served(tftp_server: Callable[..., ServerThread], request: pytest.FixtureRequest,
           monkeypatch: pytest.MonkeyPatch) -> ServerThread:
    """The server with its defaults on 127.0.0.1; transfers in its own event loop, or in as many worker
    processes as the test's indirect parameter says (see `EACH`); "python": two workers without their
    native lock-step loop."""
    workers = getattr(request, "param", 0)
    if workers == "python":
        monkeypatch.setenv("NETBOOT_TFTP_PURE_PYTHON", "1")  # the workers inherit it
        workers = 2
    return tftp_server(config=TftpConfig(workers=workers))


# Runs a test against the server running transfers in its own loop, then in two worker processes (with their
# native loop, then in Python alone).
EACH = pytest.mark.parametrize("served", [0, 2, "python"], ids=["in-process", "workers", "workers-python"],
                               indirect=True)
