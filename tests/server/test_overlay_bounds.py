"""The overlays a real `netboot serve` keeps for machines not in its machines file are bounded in bytes: made-up
MACs, each rendering a large overlay, do not grow the server beyond that bound, and each still gets its own."""

from __future__ import annotations

import base64
import random
import re
import urllib.request
from pathlib import Path

from initrd_reader import decompress, items
from support import ServerProcess, fake_out

MADE_UP = 400
RENDERED = 1 << 20  # what each machine's overlay renders


def rss(pid: int) -> int:
    """The process's resident memory now, in bytes (the kernel's own count)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


def fetch(server: ServerProcess, path: str) -> bytes:
    with urllib.request.urlopen(server.url(path), timeout=60) as r:
        return r.read()


def made_up(i: int) -> str:
    return f"02-00-00-0d-{i >> 8:02x}-{i & 0xFF:02x}"


def test_400_made_up_macs_with_a_1mb_overlay_grow_the_server_by_less_than_64mb(tmp_path: Path) -> None:
    (tmp_path / "overlay/etc").mkdir(parents=True)
    # A megabyte that does not compress much, and the machine's own MAC: each machine's render is its own.
    blob = base64.b64encode(random.Random(1).randbytes(RENDERED * 3 // 4)).decode()
    (tmp_path / "overlay/etc/large.j2").write_text("{{ mac }}\n" + blob + "\n")
    out = fake_out(tmp_path / "out", "direct", "gzip", 6)
    machines = tmp_path / "machines.toml"
    machines.write_text(f'[profiles.default]\ndir = "{out}"\noverlay = "overlay"\n')
    server = ServerProcess("--machines", machines, "--http", "127.0.0.1:0", "--no-tftp")
    try:
        # Once, so that what any first render and pack brings (the render workers, the packing threads, their
        # imports) is in the baseline.
        script = fetch(server, f"machine/{made_up(MADE_UP)}/boot.ipxe").decode()
        overlay = re.search(r"^initrd --name overlay (\S+)$", script, re.M).group(1)  # type: ignore[union-attr]
        fetch(server, overlay)
        before = rss(server.proc.pid)
        for i in range(MADE_UP):
            assert b"initrd --name overlay" in fetch(server, f"machine/{made_up(i)}/boot.ipxe")
        after = rss(server.proc.pid)
        # The first machine's render has long given way to later ones: it is rendered again, and is its own.
        script = fetch(server, f"machine/{made_up(0)}/boot.ipxe").decode()
        overlay = re.search(r"^initrd --name overlay (\S+)$", script, re.M).group(1)  # type: ignore[union-attr]
        files = {e.name: e.data for e in items(decompress(fetch(server, overlay), "gzip"))}
        assert files["etc/large"] == f"{made_up(0).replace('-', ':')}\n{blob}\n".encode()
    finally:
        server.stop()
    grown = after - before
    print(f"{MADE_UP} made-up MACs of {RENDERED >> 20} MiB each: RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB "
          f"({grown / 1e6:+.0f} MB)")
    assert grown < 64 * 10**6, grown
