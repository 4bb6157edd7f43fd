"""A DHCP client for many machines, one after another, acting as a relay (RFC 3046: giaddr, port 67), so that
one socket speaks for any number of MACs. Run inside a LAN namespace:

    python dora.py --server 192.0.2.10 --relay 192.0.2.50 [--count 100] [--first 0] [--timeout 1] [--tries 3]
                   [--give-up N]

For each machine it sends DISCOVER, then REQUEST for the address offered, and prints "MAC ADDRESS SECONDS OFFER"
once the ACK is in (SECONDS: from DISCOVER sent to ACK received; OFFER: to the OFFER received); a machine not
answered after --tries prints "MAC - timeout". Messages are built and read with tests/dhcp/dhcp_support.py,
independent of netboot's codec.
"""

from __future__ import annotations

import argparse
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dhcp_support import ACK, DISCOVER, OFFER, REQUEST, Reply, ip, parse_reply, plain


def mac_of(n: int) -> str:
    return "02:" + n.to_bytes(5, "big").hex(":")


def ask(sock: socket.socket, server: tuple[str, int], datagram: bytes, xid: int, kind: int, timeout: float,
        tries: int) -> Reply | None:
    for _ in range(tries):
        sock.sendto(datagram, server)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            reply = parse_reply(sock.recv(4096))
            if reply.xid == xid and reply.type == kind:
                return reply
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--relay", required=True, help="this host's address: giaddr, and where answers come")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--give-up", type=int, default=0, help="stop after this many machines in a row unanswered")
    args = p.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.relay, 67))
    server = (args.server, 67)
    unanswered = 0
    for n in range(args.first, args.first + args.count):
        mac, xid = mac_of(n), n & 0xFFFFFFFF
        start = time.perf_counter()
        offer = ask(sock, server, plain(DISCOVER, mac, giaddr=args.relay, xid=xid, flags=0), xid, OFFER,
                    args.timeout, args.tries)
        offered = time.perf_counter()
        ack = offer and ask(sock, server, plain(REQUEST, mac, giaddr=args.relay, xid=xid, flags=0, extra=[
            (50, ip(offer.yiaddr)), (54, offer.options[54])]), xid, ACK, args.timeout, args.tries)
        if ack is None:
            print(f"{mac} - timeout", flush=True)
            unanswered += 1
            if unanswered == args.give_up:
                break
            continue
        unanswered = 0
        print(f"{mac} {ack.yiaddr} {time.perf_counter() - start:.6f} {offered - start:.6f}", flush=True)


if __name__ == "__main__":
    main()
