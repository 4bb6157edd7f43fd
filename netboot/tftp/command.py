"""Command-line options of the TFTP server, shared by `python -m netboot.tftp` and the serving commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from netboot.core.errors import NetbootError, cannot_listen
from netboot.tftp.content import FileSystemResolver
from netboot.tftp.server import TftpConfig, start_tftp_server
from netboot.tftp.session import SessionConfig
from netboot.tftp.transfer import format_peer

log = logging.getLogger("netboot.tftp")


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPV6]:PORT, or :PORT (all addresses, IPv6 and IPv4)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    return host or "::", int(port)


def _positive(kind: type[int] | type[float]):
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The TFTP limits and tunables (everything but what is served and where)."""
    d, s = TftpConfig(), SessionConfig()
    g = p.add_argument_group("TFTP")
    g.add_argument("--tftp-max-transfers", type=_positive(int), default=d.max_transfers, metavar="N",
                   help=f"concurrent transfers at most (default {d.max_transfers})")
    g.add_argument("--tftp-max-per-source", type=_positive(int), default=d.max_per_source, metavar="N",
                   help=f"concurrent transfers from one address (IPv6: one /64) at most (default {d.max_per_source})")
    g.add_argument("--tftp-max-waiting", type=int, default=d.max_waiting, metavar="N",
                   help=f"requests over those limits waiting for a transfer to end, at most (default {d.max_waiting})")
    g.add_argument("--tftp-max-blksize", type=int, default=s.max_blksize, metavar="BYTES",
                   help=f"largest block size granted, 8-65464 (default {s.max_blksize}; the MTU caps it too)")
    g.add_argument("--tftp-max-windowsize", type=int, default=s.max_windowsize, metavar="N",
                   help=f"largest RFC 7440 window granted (default {s.max_windowsize})")
    g.add_argument("--tftp-timeout", type=_positive(float), default=s.timeout, metavar="SECONDS",
                   help=f"first retransmission timeout, doubling on each retry (default {s.timeout:g})")
    g.add_argument("--tftp-retries", type=int, default=s.retries, metavar="N",
                   help=f"retransmissions before a transfer is dropped (default {s.retries})")
    g.add_argument("--tftp-idle-timeout", type=_positive(float), default=s.idle_timeout, metavar="SECONDS",
                   help=f"drop a transfer without progress for this long (default {s.idle_timeout:g})")
    cores = os.cpu_count() or 1
    workers = cores if cores > 1 else 0
    g.add_argument("--tftp-workers", type=int, default=workers, metavar="N",
                   help=f"processes that run file transfers, 0 for all in this one (default {workers}: one a core)")
    g.add_argument("--tftp-no-mtu", action="store_true",
                   help="do not cap blksize to the MTU of the interface a request arrives on")


def config_from_args(args: argparse.Namespace) -> TftpConfig:
    try:
        session = SessionConfig(
            max_blksize=args.tftp_max_blksize,
            max_windowsize=args.tftp_max_windowsize,
            timeout=args.tftp_timeout,
            max_timeout=max(SessionConfig.max_timeout, args.tftp_timeout),
            retries=args.tftp_retries,
            idle_timeout=args.tftp_idle_timeout,
        )
        return TftpConfig(session=session, max_transfers=args.tftp_max_transfers,
                          max_per_source=args.tftp_max_per_source, max_waiting=args.tftp_max_waiting,
                          use_mtu=not args.tftp_no_mtu,
                          workers=args.tftp_workers)
    except ValueError as e:
        raise NetbootError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m netboot.tftp", description="Read-only TFTP server.")
    p.add_argument("--root", required=True, help="directory to serve")
    p.add_argument("--listen", type=parse_listen, action="append", metavar="ADDR:PORT",
                   help="address to listen on, repeatable (default [::]:69, IPv6 and IPv4)")
    p.add_argument("--interface", metavar="NAME",
                   help="answer only requests arriving on this network interface (the boot network's)")
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="a directory symlinks under the root may point into, e.g. /nix/store (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings, not each transfer")
    add_arguments(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    resolver = FileSystemResolver(args.root, args.allow_root)
    config = config_from_args(args)
    listen = args.listen or [("::", 69)]
    try:
        server = await start_tftp_server(listen[0][0], listen[0][1], resolver, config, interface=args.interface)
    except OSError as e:
        raise cannot_listen("TFTP", format_peer(listen[0]), listen[0][1], e) from e
    try:
        for host, port in listen[1:]:
            try:
                server.listen(host, port, args.interface)
            except OSError as e:
                raise cannot_listen("TFTP", format_peer((host, port)), port, e) from e
    except NetbootError:
        server.close()
        await server.wait_closed()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for address in server.addresses:
        log.warning("listening on %s", format_peer(address))
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="netboot-tftp: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(serve(args))
    except (NetbootError, OSError) as e:
        print(f"netboot-tftp: error: {e}", file=sys.stderr)
        return 2
    return 0
