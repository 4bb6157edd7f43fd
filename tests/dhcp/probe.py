"""A DHCP client's socket, run inside a LAN namespace: send datagrams, print what comes back.

    python probe.py [--to ADDR:PORT] [--port 68] [--wait SECONDS] [--expect N] [--device eth0] HEX...

Sends each datagram (hex) to ADDR:PORT (default the broadcast address, port 67) from port --port, then prints
every datagram received for --wait seconds as "ADDR:PORT HEX", one a line; with --expect, until N have come and
then GRACE seconds more (for one too many, which a server that answers twice sends at once).
"""

from __future__ import annotations

import argparse
import select
import socket
import time

GRACE = 0.3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--to", default="255.255.255.255:67")
    p.add_argument("--port", type=int, default=68)
    p.add_argument("--wait", type=float, default=2.0)
    p.add_argument("--expect", type=int)
    p.add_argument("--device", default="eth0")
    p.add_argument("datagrams", nargs="*")
    args = p.parse_args()
    host, port = args.to.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.device.encode())
    s.bind(("0.0.0.0", args.port))
    for text in args.datagrams:
        s.sendto(bytes.fromhex(text), (host, int(port)))
    deadline = time.monotonic() + args.wait
    received = 0
    while (left := deadline - time.monotonic()) > 0:
        if select.select([s], [], [], left)[0]:
            data, source = s.recvfrom(65536)
            print(f"{source[0]}:{source[1]} {data.hex()}", flush=True)
            received += 1
            if received == args.expect:
                deadline = min(deadline, time.monotonic() + GRACE)


if __name__ == "__main__":
    main()
