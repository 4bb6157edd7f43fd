"""What is booting: the boot record, and the status listener that shows it (page, JSON API, Prometheus).

`record` keeps the events and each machine's state; `metrics` turns them into Prometheus' format; `app` is the
listener's aiohttp application (its pages: `page.html` and `machine.html`, Jinja2 templates on `base.html`, with
`chart` drawing the boots of the last hour); `inventory` is what it may change, through the server; `credentials`
reads its token file and its certificate. `start_status` binds it, HTTPS only with a certificate, refusing to
expose it beyond loopback without a token.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from netboot.core.errors import NetbootError, cannot_listen
from netboot.status.app import make_status_app
from netboot.status.inventory import Inventory, Refused
from netboot.status.metrics import Live, Metrics
from netboot.status.record import BootEvent, BootRecord

__all__ = ["BootEvent", "BootRecord", "Inventory", "Live", "Refused", "StatusConfig", "start_status"]

log = logging.getLogger("netboot.serve")


@dataclass(frozen=True)
class StatusConfig:
    host: str = "127.0.0.1"
    port: int = 9480
    token: str | None = None
    public: bool = False  # allow a non-loopback address without a token
    names: tuple[str, ...] = ()  # host names it answers to besides its address (see app.py: DNS rebinding)
    tls: ssl.SSLContext | None = None  # HTTPS only (--status-cert, --status-key: credentials.tls_context)

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise NetbootError("--status-token: the token is empty")
        if self.token is None and not self.public and not ipaddress.ip_address(self.host).is_loopback:
            raise NetbootError(f"--status {self.host}: the status listener shows every machine; give it a "
                               "--status-token (or --status-token-file), or --status-public to expose it anyway")


async def start_status(config: StatusConfig, record: BootRecord, live: Live,
                       inventory: Inventory | None = None) -> tuple[web.AppRunner, int]:
    """Bind the listener; returns its runner (to clean up) and port. `inventory`: what it may change (writes
    need a token as well)."""
    runner = web.AppRunner(make_status_app(record, Metrics(record, live), config.token, config.names, inventory),
                           access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True, ssl_context=config.tls)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        host = f"[{config.host}]" if ":" in config.host else config.host
        raise cannot_listen("the status page", f"{host}:{config.port}", config.port, e,
                            "choose another with --status ADDR:PORT, or --status none") from e
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1] if sockets else config.port
    return runner, port
