"""Boot storms: many machines booting at once, for `make bench-load` and the load tests.

HTTP: each simulated machine does what iPXE does on one keep-alive connection: GET /boot.ipxe, follow its
`chain` line with its own MAC, then GET the kernel and the initrd its script names. The client reads into one
buffer per connection (asyncio.BufferedProtocol), so that a thousand machines on two cores measure the server
more than the client.

TFTP: each client is a real `curl` process bound to its own loopback address (`--interface`), fetching the
given files one after the other at the given blksize.

    python3 bench/storm.py tftp --port 69 --clients 200 --files undionly.kpxe,boot.ipxe --expect DIR
    python3 bench/storm.py http --port 8080 --machines 1000

print a JSON summary; the load benchmark runs the TFTP storm this way inside a lossy namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit


def _expand(chain: str, mac: str) -> str:
    """boot.ipxe's chain line as iPXE on a BIOS PC expands it: its MAC, its architecture, and nothing for what it
    does not know (the SMBIOS of a machine that has none)."""
    known = {"mac:hexhyp": mac, "buildarch:uristring": "i386", "platform:uristring": "pcbios"}
    return re.sub(r"\$\{([^}]*)\}", lambda m: known.get(m.group(1), ""), chain)


@dataclass
class Storm:
    clients: int
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    bytes: int = 0
    script_latencies: list[float] = field(default_factory=list)  # HTTP: the per-MAC script requests
    digests: dict[str, str] = field(default_factory=dict)  # path -> sha256 of what was received (check=True)

    def p99_ms(self) -> float:
        lat = sorted(self.script_latencies)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0

    def median_ms(self) -> float:
        return statistics.median(self.script_latencies) * 1000 if self.script_latencies else 0.0


# -- HTTP ----------------------------------------------------------------------------------------------------

class _Connection(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; bodies are counted (and hashed when asked),
    and kept only when small."""

    def __init__(self) -> None:
        self.buffer = memoryview(bytearray(256 * 1024))
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.remaining: int | None = None
        self.status = 0
        self.body = bytearray()
        self.keep = False
        self.count = 0
        self.hash: hashlib._Hash | None = None
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buffer[:nbytes]
        if self.remaining is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._fail(ConnectionError("response head too long"))
                return
            head, rest = bytes(self.head[:end]), bytes(self.head[end + 4:])
            self.head = bytearray()
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            self.remaining = int(headers.get("content-length", "0"))
            self._body(memoryview(rest))
        else:
            self._body(data)

    def _body(self, data: memoryview) -> None:
        assert self.remaining is not None
        take = data[: self.remaining]
        self.remaining -= len(take)
        self.count += len(take)
        if self.keep:
            self.body += take
        if self.hash is not None:
            self.hash.update(take)
        if self.remaining == 0 and self.done is not None and not self.done.done():
            self.remaining = None
            self.done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by the server"))

    async def get(self, path: str, *, keep: bool, check: bool) -> tuple[int, bytes, int, str]:
        """Status, body (when `keep`), bytes received, sha256 (when `check`)."""
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.body, self.keep, self.count = bytearray(), keep, 0
        self.hash = hashlib.sha256() if check else None
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: netboot\r\nUser-Agent: iPXE/1.21.1\r\n\r\n".encode())
        await self.done
        return self.status, bytes(self.body), self.count, self.hash.hexdigest() if self.hash else ""


def _script_lines(body: bytes) -> list[list[str]]:
    return [ln.split() for ln in body.decode().splitlines() if ln.strip() and not ln.startswith("#")]


async def _machine(host: str, port: int, mac: str, storm: Storm, check: bool) -> None:
    loop = asyncio.get_running_loop()
    base = f"http://{host}:{port}/"
    transport, conn = await loop.create_connection(_Connection, host, port)
    try:
        async def fetch(url: str, keep: bool) -> bytes:
            path = urlsplit(urljoin(base, url)).path
            status, body, count, digest = await conn.get(path, keep=keep, check=check)
            if status != 200:
                raise ConnectionError(f"{path}: HTTP {status}")
            storm.bytes += count
            if check:
                storm.digests[path.replace(mac, "MAC")] = digest
            return body

        boot = await fetch("/boot.ipxe", True)
        chain = next((w[1] for w in _script_lines(boot) if w[0] == "chain"), None)
        if chain is None:
            raise ConnectionError("boot.ipxe has no chain line")
        started = time.perf_counter()
        script = await fetch(_expand(chain, mac), True)
        storm.script_latencies.append(time.perf_counter() - started)
        lines = _script_lines(script)
        kernel = next((w[1] for w in lines if w[0] == "kernel"), None)
        initrd = next((w[-1] for w in lines if w[0] == "initrd"), None)
        if kernel is None or initrd is None:
            raise ConnectionError(f"the script for {mac} names no kernel or initrd")
        await fetch(kernel, False)
        await fetch(initrd, False)
    finally:
        transport.close()


async def _http_storm(host: str, port: int, machines: int, check: bool) -> Storm:
    storm = Storm(machines)
    macs = [f"52-54-00-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}" for i in range(machines)]

    async def one(mac: str) -> None:
        try:
            await _machine(host, port, mac, storm, check)
        except (OSError, ConnectionError, ValueError) as e:
            storm.failures.append(f"{mac}: {e}")

    started = time.perf_counter()
    await asyncio.gather(*(one(mac) for mac in macs))
    storm.seconds = time.perf_counter() - started
    return storm


def http_storm(host: str, port: int, machines: int, *, check: bool = False) -> Storm:
    """`machines` simulated iPXE machines booting at once from http://host:port/boot.ipxe."""
    return asyncio.run(_http_storm(host, port, machines, check))


# -- TFTP ----------------------------------------------------------------------------------------------------

def tftp_sources(count: int) -> list[str]:
    """`count` distinct loopback addresses, 127.0.1.1 onwards."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


def tftp_storm(host: str, port: int, clients: int, files: list[str], *, blksize: int = 1432,
               expect: Path | None = None, sources: list[str] | None = None) -> Storm:
    """`clients` curl processes at once, each from its own loopback address (or all from `sources[0]` when
    one is given), fetching `files` in turn. With `expect`, each download must equal the file of that name
    there."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("storm: curl is not installed (Debian: curl)")
    sources = sources or tftp_sources(clients)
    storm = Storm(clients)
    with tempfile.TemporaryDirectory(prefix="tftp-storm-") as tmp:
        procs = []
        started = time.perf_counter()
        for i in range(clients):
            # --connect-timeout 5 makes curl ask for timeout=1 (a lost packet costs a second, as with iPXE
            # or tftpd-hpa's default) and retransmit its own packets every second. --max-time: a client whose
            # server gave up on it waits for nothing more (curl's own limit is an hour).
            argv = [curl, "-s", "-S", "--connect-timeout", "5", "--max-time", "120",
                    "--interface", sources[i % len(sources)],
                    "--tftp-blksize", str(blksize)]
            for name in files:
                argv += ["-o", f"{tmp}/{i}-{name}", f"tftp://{host}:{port}/{name}"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        failed = set()
        for i, proc in enumerate(procs):
            _, err = proc.communicate()
            if proc.returncode != 0:
                failed.add(i)
                storm.failures.append(f"client {i} ({sources[i % len(sources)]}): curl exit status "
                                      f"{proc.returncode}: {err.strip()}")
        storm.seconds = time.perf_counter() - started
        for i in sorted(set(range(clients)) - failed):  # one failure a client
            for name in files:
                got = Path(f"{tmp}/{i}-{name}")
                if not got.exists():
                    continue  # a failure already recorded
                storm.bytes += got.stat().st_size
                if expect is not None and got.read_bytes() != (expect / name).read_bytes():
                    storm.failures.append(f"client {i}: {name} differs from what was served")
    return storm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["http", "tftp"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--machines", "--clients", type=int, default=100, dest="clients")
    p.add_argument("--files", default="undionly.kpxe,boot.ipxe", help="TFTP: the files each client fetches")
    p.add_argument("--blksize", type=int, default=1432)
    p.add_argument("--expect", type=Path, help="TFTP: a directory holding what each file must be")
    args = p.parse_args()
    if args.kind == "http":
        storm = http_storm(args.host, args.port, args.clients)
    else:
        storm = tftp_storm(args.host, args.port, args.clients, args.files.split(","), blksize=args.blksize,
                           expect=args.expect)
    summary = asdict(storm)
    summary.pop("digests")
    summary["script_p99_ms"] = storm.p99_ms()
    summary["script_latencies"] = len(storm.script_latencies)
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
