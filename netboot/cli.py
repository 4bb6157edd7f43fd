"""Command line: `netboot build`, `netboot serve`, `netboot cache`, `netboot publish`."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from netboot import __version__
from netboot.core import artifacts, compress
from netboot.core.errors import NetbootError
from netboot.core.loaders import Loaders
from netboot.dhcp import command as dhcp_command
from netboot.dhcp6 import command as dhcp6_command
from netboot.image import cache, pack
from netboot.image.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, MAX_DEPTH, MAX_NAME, ImageLimits
from netboot.server.http_limits import HttpLimits
from netboot.status import StatusConfig
from netboot.tftp import command as tftp_command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _level(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid level {text!r}: expected an integer") from None


def _count(text: str) -> int:
    try:
        return int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected an integer") from None


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="pack a system's closure into bzImage (Image on arm64) + initrd + cmdline + netboot.ipxe",
        description=(
            "Pack the whole store closure of SYSTEM (a NixOS toplevel or any directory with kernel, init, "
            "kernel-params and kernel-modules) into DIR: bzImage, initrd, cmdline, netboot.ipxe, manifest.json. "
            "Or, instead of SYSTEM, any root filesystem (--rootfs DIR, or an OCI image archive with --oci) with "
            "--kernel. The kernel says the architecture: an x86_64 bzImage, or an arm64 Image (Image.gz is "
            "unpacked), whose build has Image where an x86_64 one has bzImage; any host builds for either. "
            "DIR is replaced atomically; a failed build leaves it as it was."
        ),
    )
    p.add_argument("system", metavar="SYSTEM", type=Path, nargs="?",
                   help="the system's top-level directory (e.g. ./result)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output directory (replaced atomically; missing parents are created)")
    p.add_argument(
        "--format", choices=artifacts.FORMATS, default="squashfs",
        help="squashfs: store image in the initrd, mounted by a small stage 1 under a writable overlay "
        "(default); erofs: the same with an erofs image; direct: every store file in the initrd, rdinit= runs "
        "the system's init",
    )
    p.add_argument(
        "--compress", choices=list(compress.COMPRESSORS), dest="compression",
        help="compressor for the initrd and the squashfs image (default zstd); for erofs, lz4 (the default) "
        "compresses the image itself, another leaves it uncompressed and compresses its initrd member",
    )
    p.add_argument(
        "--level", type=_level, metavar="N",
        help="compression level: zstd 1-19 (default 10), xz 0-9 (6), gzip 1-9 (6), lz4 1-12 (9; for erofs 1, "
        "and 3 and above is lz4hc)",
    )
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel parameters, after the system's own")
    p.add_argument(
        "--fetch", action="store_true",
        help="squashfs and erofs: write the image as a file of its own (image) instead of into the initrd, which "
        "then holds stage 1 alone; stage 1 brings up the network and downloads the image into memory over HTTP, "
        "checked against the sha256 on the kernel command line (for systems too large for one initrd)",
    )
    p.add_argument("--rootfs", type=Path, metavar="DIR",
                   help="a root filesystem directory to boot instead of a Nix system (owners and modes kept)")
    p.add_argument("--oci", type=Path, metavar="IMAGE.tar",
                   help="an OCI image archive (skopeo's oci-archive, docker save) to boot instead of a Nix system")
    p.add_argument("--kernel", type=Path, metavar="KERNEL",
                   help="the kernel for --rootfs or --oci: an x86_64 bzImage or an arm64 Image; from an --oci "
                   "image index, the image for its architecture is chosen (linux/amd64 or linux/arm64)")
    p.add_argument("--busybox", type=Path, metavar="PATH",
                   help="the static busybox stage 1 runs (squashfs, erofs), for the kernel's architecture "
                   "(default: the system's own, else this machine's /bin/busybox when it is for that architecture)")
    p.add_argument("--modules", type=Path, metavar="DIR",
                   help="its modules, like /lib/modules/<version>: for stage 1, and added to the booted root "
                   "(default: the root's own)")
    p.add_argument("--init", default="/sbin/init", metavar="PATH",
                   help="the init of --rootfs or --oci, in the root (default /sbin/init)")
    p.add_argument("--max-image-bytes", default=f"{DEFAULT_MAX_BYTES >> 30}G", metavar="SIZE",
                   help="refuse an --oci image whose layers unpack to more than SIZE (their tar streams, "
                   f"decompressed), or a --rootfs whose files hold more (default {DEFAULT_MAX_BYTES >> 30}G)")
    p.add_argument("--max-image-entries", type=_count, default=DEFAULT_MAX_ENTRIES, metavar="N",
                   help="refuse an --oci image or a --rootfs of more than N files, directories, links and nodes "
                   f"(an image's: in all its layers; default {DEFAULT_MAX_ENTRIES:,}). Names longer than "
                   f"{MAX_NAME:,} bytes or deeper than {MAX_DEPTH} directories are refused always")
    p.add_argument(
        "--closure-info", type=Path, metavar="DIR",
        help="a nixpkgs closureInfo output (store-paths, registration) instead of asking nix-store",
    )
    p.add_argument(
        "--cache-dir", type=Path, metavar="DIR",
        help="where packed store paths are kept for the next build (default $XDG_CACHE_HOME/netboot)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither use nor fill the cache")
    p.add_argument(
        "--cache-max", default="5G", metavar="SIZE",
        help="cap on the cache's size; least recently used entries go first (default 5G)",
    )
    g = p.add_argument_group("Secure Boot")
    g.add_argument("--sign-key", type=Path, metavar="KEY",
                   help="sign the kernel (and with --uki the unified kernel image) for UEFI Secure Boot with this PEM "
                   "private key, after removing the signatures it had: it then boots on machines that trust "
                   "--sign-cert (in their MOK list or db); the manifest records the certificate's fingerprint")
    g.add_argument("--sign-cert", type=Path, metavar="CERT", help="the PEM certificate of --sign-key")
    g.add_argument("--uki", action="store_true",
                   help="also write netboot.efi: a unified kernel image (systemd's UEFI stub with the kernel, the "
                   "initrd, the command line and os-release), signed as a whole with --sign-key")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="also print every command run")
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    opts = pack.BuildOptions(
        system=args.system,
        out=args.out,
        format=args.format,
        compression=args.compression,
        level=args.level,
        append=args.append,
        closure_info=args.closure_info,
        progress=sys.stderr.isatty() and not args.quiet,
        cache_dir=None if args.no_cache else (args.cache_dir or cache.default_dir()),
        cache_max=cache.parse_size(args.cache_max),
        rootfs=args.rootfs,
        oci=args.oci,
        kernel=args.kernel,
        modules=args.modules,
        init=args.init,
        limits=ImageLimits(cache.parse_size(args.max_image_bytes), args.max_image_entries),
        busybox=args.busybox,
        sign_key=args.sign_key,
        sign_cert=args.sign_cert,
        uki=args.uki,
        fetch=args.fetch,
    )
    pack.build(opts)
    return 0


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="show or clear the build cache",
        description="Show the build cache (entries, size), or clear it with --clear.",
    )
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="default $XDG_CACHE_HOME/netboot")
    p.add_argument("--clear", action="store_true", help="remove every entry")
    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    root = args.cache_dir or cache.default_dir()
    c = cache.Cache(root)
    if args.clear:
        print(f"{root}: removed {c.clear()} files")
        return 0
    entries = c.entries()
    total = sum(st.st_size for _, st in entries)
    print(f"{root}: {len(entries)} entries, {total / 2**20:,.1f} MiB")
    return 0


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="copy a build into a content-addressed tree for a mirror, CDN or object store",
        description=(
            "Copy the build in OUT (an output directory of netboot build) to DEST/<sha256>/, named by the sha256 "
            "of its manifest: bzImage (Image for arm64), initrd, cmdline, netboot.ipxe, manifest.json, checked "
            "against the manifest. The directory appears whole (written under a temporary name, then renamed) and "
            "is never rewritten. Serve DEST with any static server and set base_url in a profile of the machines file: "
            "its machines then fetch the kernel and initrd from there."
        ),
    )
    p.add_argument("out", metavar="OUT", type=Path, help="an output directory of netboot build")
    p.add_argument("dest", metavar="DEST", type=Path, help="the content-addressed tree (created if needed)")
    p.set_defaults(func=_run_publish)


def _run_publish(args: argparse.Namespace) -> int:
    from netboot.image.publish import publish

    where, written = publish(args.out, args.dest)
    print(f"{where}: {'published' if written else 'already published, left as it is'}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve output directories over HTTP and TFTP with per-MAC iPXE scripts",
        description=(
            "Serve boot.ipxe, per-MAC iPXE scripts, kernels and initrds over HTTP and TFTP from one process. "
            "boot.ipxe (the boot file to hand out by DHCP) chains to /machine/<mac>/boot.ipxe, which boots the "
            "machine's profile. Reloads on SIGHUP and when the machines file or an output directory changes. "
            "With --dhcp it answers DHCP too, so that PXE firmware boots with nothing else configured: as proxy "
            "DHCP beside the site's DHCP server, or as the DHCP server of an isolated provisioning network."
        ),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--dir", type=Path, metavar="OUT", dest="out", help="every machine boots this output of netboot build"
    )
    what.add_argument(
        "--machines", type=Path, metavar="FILE", help="machines.toml: profiles and the MACs that boot them"
    )
    p.add_argument("--http", default="0.0.0.0:8080", metavar="ADDR:PORT", help="HTTP address (default 0.0.0.0:8080)")
    p.add_argument("--tftp", default="0.0.0.0:69", metavar="ADDR:PORT", help="TFTP address (default 0.0.0.0:69)")
    p.add_argument("--no-tftp", action="store_true", help="serve HTTP only")
    p.add_argument(
        "--grace", type=float, default=600, metavar="SECONDS",
        help="how long a replaced build stays available to machines that started booting it (default 600)",
    )
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/netboot"), metavar="DIR",
                   help="netboot serve's own files: the DHCP leases, and the builds of profiles that name a system "
                   "(default /var/lib/netboot)")
    p.add_argument("--database", type=_database_url, metavar="URL",
                   help="the site's PostgreSQL database, shared by several netboot servers, as a libpq URL (e.g. "
                   "postgresql://netboot@db.example/netboot or postgresql:///netboot?host=/run/postgresql): "
                   "with --dhcp START-END the leases are kept there, so that servers on one network never give an "
                   "address twice and each renews the others' leases; machines written through the status API are "
                   "kept there (over each server's machines file) and served by every server; and every server "
                   "shows the boots of all. The schema is created or upgraded at start")
    p.add_argument("--name", default=socket.gethostname(), metavar="NAME",
                   help="this server's name in the shared database and on its boot events (default: the host name)")
    p.add_argument("--loaders", action="append", default=[], metavar="ARCH=DIR",
                   help="shim, GRUB and MokManager of one architecture (x86_64 or arm64) for profiles with loader = "
                   "\"grub\" or \"uki\", and for every arm64 UEFI machine (DHCP architecture 11 or 19), from DIR "
                   "under the names the firmware asks for (x86_64: shimx64.efi, grubx64.efi, mmx64.efi; arm64: "
                   "shimaa64.efi, grubaa64.efi, mmaa64.efi, and optionally ipxe.efi, an arm64 iPXE that arm64 "
                   "machines of loader = \"ipxe\" profiles then get instead), instead of Debian's shim-signed, "
                   "shim-helpers-*-signed and grub-efi-*-signed; GRUB's modules from DIR/x86_64-efi/ or "
                   "DIR/arm64-efi/ (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print more")
    limits = HttpLimits()
    g = p.add_argument_group("HTTP")
    g.add_argument("--http-max-connections", type=int, default=limits.max_connections, metavar="N",
                   help="open connections at most; at the cap, idle connections of the addresses holding the most "
                        f"are closed, oldest first, to make room (default {limits.max_connections})")
    g.add_argument("--http-max-per-address", type=int, default=limits.max_per_address, metavar="N",
                   help="open connections from one client address (IPv6: one /64) at most; at the cap, its oldest "
                        f"idle one is closed to make room (default {limits.max_per_address})")
    g.add_argument("--http-idle-timeout", type=float, default=limits.idle_timeout, metavar="SECONDS",
                   help="close a connection that has not completed a request's headers for this long, from its "
                        f"start or its last response (default {limits.idle_timeout:g})")
    g = p.add_argument_group("status", "what is booting: a page, a JSON API and Prometheus metrics, on a "
                             "listener of their own that booting machines never see; with a token, the API also "
                             "changes the machines file (PUT, DELETE /api/machines/MAC) and wakes machines")
    g.add_argument("--status", default="127.0.0.1:9480", metavar="ADDR:PORT",
                   help="the status listener's address (default 127.0.0.1:9480; `none`: no listener)")
    token = g.add_mutually_exclusive_group()
    token.add_argument("--status-token", metavar="TOKEN",
                       help="require this bearer token on every status route (and allow changes)")
    token.add_argument("--status-token-file", type=Path, metavar="FILE",
                       help="the token from a file (the whole file, on one line), kept out of the process list; "
                            "the file must be its owner's alone (chmod 600)")
    g.add_argument("--status-public", action="store_true",
                   help="allow a non-loopback --status address without a token")
    g.add_argument("--status-name", action="append", default=[], metavar="NAME",
                   help="a host name the status listener answers to, besides its own address (and localhost on "
                        "loopback); without a token, requests for any other name are refused (DNS rebinding)")
    g.add_argument("--status-cert", type=Path, metavar="FILE",
                   help="make the status listener HTTPS only (TLS 1.2 and later), with this PEM certificate (its "
                        "chain after it); the token's cookie is then Secure. With --status-key")
    g.add_argument("--status-key", type=Path, metavar="FILE",
                   help="the unencrypted PEM private key of --status-cert")
    tftp_command.add_arguments(p)
    dhcp_command.add_arguments(p)
    dhcp6_command.add_arguments(p)
    p.set_defaults(func=_run_serve)


def _status(args: argparse.Namespace) -> StatusConfig | None:
    from netboot.server.server import Endpoint
    from netboot.status import credentials

    if args.status == "none":
        return None
    where = Endpoint.parse(args.status, "--status")
    token = args.status_token
    if args.status_token_file is not None:
        token = credentials.token_from_file(args.status_token_file)
    if (args.status_cert is None) != (args.status_key is None):
        raise NetbootError("--status-cert and --status-key go together: give both, or neither")
    tls = credentials.tls_context(args.status_cert, args.status_key) if args.status_cert is not None else None
    return StatusConfig(where.host, where.port, token, args.status_public, tuple(args.status_name), tls)


def _http_limits(args: argparse.Namespace) -> HttpLimits:
    try:
        return HttpLimits(max_connections=args.http_max_connections, max_per_address=args.http_max_per_address,
                          idle_timeout=args.http_idle_timeout)
    except ValueError as e:
        raise NetbootError(str(e)) from None


def _database_url(text: str) -> str:
    from netboot.state.database import check_url

    try:
        return check_url(text)
    except NetbootError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


def serve_options(args: argparse.Namespace):  # -> server.ServeOptions (imported late: the CLI loads fast)
    from netboot.server import server

    return server.ServeOptions(
        out=args.out,
        machines=args.machines,
        http=server.Endpoint.parse(args.http, "--http"),
        tftp=None if args.no_tftp else server.Endpoint.parse(args.tftp, "--tftp"),
        tftp_config=tftp_command.config_from_args(args),
        http_limits=_http_limits(args),
        dhcp=dhcp_command.config_from_args(args),
        dhcp6=dhcp6_command.config_from_args(args),
        status=_status(args),
        grace=args.grace,
        state_dir=args.state_dir,
        database=args.database,
        name=args.name,
        loaders=Loaders.from_options(args.loaders),
    )


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from netboot.server import server

    asyncio.run(server.serve(serve_options(args)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netboot", description="Boot machines over the network from a built system.")
    p.add_argument("--version", action="version", version=f"netboot {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_build(sub)
    _add_serve(sub)
    _add_cache(sub)
    _add_publish(sub)
    return p


def _terminate(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C so that half-written output is removed and child processes are stopped.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logging.basicConfig(level=level, format="netboot: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except NetbootError as e:
        print(f"netboot: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("netboot: interrupted", file=sys.stderr)
        return 130
