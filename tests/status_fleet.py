"""`netboot serve` with a status record already holding a fleet: MACHINES machines of EVENTS events each, as
if they had booted, so that the tests can read it at that size without making 200,000 requests first.

    python tests/status_fleet.py MACHINES EVENTS netboot-serve-arguments...
"""

from __future__ import annotations

import asyncio
import logging
import sys

from netboot.cli import parser, serve_options
from netboot.server import server
from netboot.status import BootRecord


def fill(record: BootRecord, machines: int, events: int) -> None:
    for i in range(machines):
        mac = f"02:00:00:{i >> 16 & 0xFF:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"
        hyphens = mac.replace(":", "-")
        for k in range(events):
            path = f"/machine/{hyphens}/boot.ipxe" if k % 3 == 0 else f"/machine/{hyphens}/0123456789abcdef/initrd"
            record.record(f"192.0.2.{i % 250 + 1}", "http", path, "200", True, 1000 + k, mac, "default")
    record.flush()


async def main(machines: int, events: int, argv: list[str]) -> None:
    args = parser().parse_args(["serve", *argv])
    opts = serve_options(args)
    server.raise_file_limit(opts)
    served = server.Server(opts)
    assert served.record is not None
    served.record.max_machines = machines
    fill(served.record, machines, events)
    try:
        await served.start()
        await served.run()
    finally:
        await served.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="netboot: %(message)s", stream=sys.stderr)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
