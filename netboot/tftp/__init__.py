"""TFTP server for netbooting: a sans-IO protocol core (`packets`, `session`) under a thin asyncio layer.

Public API for embedding (`netboot serve`):

    server = await start_tftp_server("::", 69, FileSystemResolver(root, ["/nix/store"]), TftpConfig())
    ...
    server.close(); await server.wait_closed()

A resolver is any callable `(name, peer) -> Content`; it raises `NotFound` / `AccessDenied` to refuse.
"""

from netboot.tftp.content import (
    AccessDenied,
    BytesContent,
    Content,
    ContentError,
    FileContent,
    FileSystemResolver,
    NotFound,
    Resolver,
)
from netboot.tftp.server import TftpConfig, TftpServer, start_tftp_server
from netboot.tftp.session import SessionConfig
from netboot.tftp.transfer import TransferStats

__all__ = [
    "AccessDenied",
    "BytesContent",
    "Content",
    "ContentError",
    "FileContent",
    "FileSystemResolver",
    "NotFound",
    "Resolver",
    "SessionConfig",
    "TftpConfig",
    "TftpServer",
    "TransferStats",
    "start_tftp_server",
]
