"""Send DHCPv6 datagrams (hex arguments) from port 546 to a server, print what comes back: `SOURCE HEX` lines.

Run inside a LAN host's namespace: `probe6.py --interface eth0 [--to ADDR] [--wait S] [--expect N] HEX...`.
Sends to All_DHCP_Relay_Agents_and_Servers (ff02::1:2) on the interface unless --to names an address.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--interface", default="eth0")
    p.add_argument("--to", default="ff02::1:2")
    p.add_argument("--port", type=int, default=546)
    p.add_argument("--server-port", type=int, default=547)
    p.add_argument("--wait", type=float, default=2.0)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("datagrams", nargs="*")
    args = p.parse_args()
    index = socket.if_nametoindex(args.interface)
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    s.bind(("::", args.port))
    scope = index if args.to.startswith(("ff02", "fe80")) else 0
    for d in args.datagrams:
        s.sendto(bytes.fromhex(d), (args.to, args.server_port, 0, scope))
    got = 0
    deadline = time.monotonic() + args.wait
    while True:
        left = deadline - time.monotonic()
        if args.expect and got >= args.expect:
            left = min(left, 0.2)
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, source = s.recvfrom(65535)
        print(f"[{source[0]}]:{source[1]} {data.hex()}", flush=True)
        got += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
