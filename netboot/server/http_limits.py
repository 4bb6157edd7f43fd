"""The limits on HTTP connections of `netboot serve` (kept apart from aiohttp so the CLI loads fast)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 4096  # open connections in all
    # From one client address: iPXE uses one connection at a time, but a NAT (QEMU's user network, a
    # lab router) puts many machines behind one address.
    max_per_address: int = 1024
    idle_timeout: float = 15.0  # seconds for a request's headers to arrive, and for an idle keep-alive

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_address < 1 or self.idle_timeout <= 0:
            raise ValueError("HTTP connection limits must be at least 1 and the idle timeout positive")
