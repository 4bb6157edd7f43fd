"""The status listener's changes (status/inventory.py's interface), made by `netboot serve`: machines' tables
written into the machines file (core/machines_file.py) and served at once, magic packets sent (wake.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from netboot.core.addresses import ipv4_interfaces
from netboot.core.errors import NetbootError
from netboot.core.logtext import clip
from netboot.core.machines_file import NotListed, Unwritable, delete_machine, put_machine
from netboot.server import wake
from netboot.status.inventory import Refused

log = logging.getLogger("netboot.serve")

Write = Callable[[Callable[[str], str]], Awaitable[None]]  # the server's: edit, check, replace, serve (see Server)
# With --database: a machine's table (None: removed) written into the site's database; True when added (Server).
WriteTable = Callable[[str, dict[str, Any] | None], Awaitable[bool]]
Seen = Callable[[str], tuple[str, str]]  # a MAC -> (the interface DHCP saw it on, the address of its last request)


class ServerInventory:
    def __init__(self, write: Write | None, profiles: Callable[[], list[str]], seen: Seen,
                 write_table: WriteTable | None = None) -> None:
        """`write`: None without a machines file (netboot serve --dir); `write_table`: with a database, which
        then takes every write instead of the file."""
        self._write = write
        self._write_table = write_table
        self._profiles = profiles
        self._seen = seen

    def profiles(self) -> list[str]:
        return self._profiles()

    async def put(self, mac: str, table: dict[str, Any]) -> bool:
        if self._write_table is not None:
            return await self._write_table(mac, table)
        added: list[bool] = []

        def edit(text: str) -> str:
            new, was_added = put_machine(text, mac, table)
            added.append(was_added)
            return new

        await self._edit(edit)
        log.info("machines file: %s %s (%s)", mac, "added" if added[-1] else "replaced",
                 clip(", ".join(f"{k}={v!r}" for k, v in table.items()), 200))
        return added[-1]

    async def delete(self, mac: str) -> None:
        if self._write_table is not None:
            await self._write_table(mac, None)
            return
        await self._edit(lambda text: delete_machine(text, mac))
        log.info("machines file: %s removed", mac)

    async def _edit(self, edit: Callable[[str], str]) -> None:
        if self._write is None:
            raise Refused(409, "netboot serve --dir has no machines file to write (serve with --machines FILE)")
        try:
            await self._write(edit)
        except NotListed as e:
            raise Refused(404, str(e)) from None
        except Unwritable as e:
            raise Refused(500, str(e)) from None
        except NetbootError as e:  # the file would not load with it: nothing was written
            raise Refused(400, f"not written: the machines file would not load with it: {e}") from None

    async def wake(self, mac: str) -> list[str]:
        interface, client = self._seen(mac)
        interfaces = await asyncio.to_thread(ipv4_interfaces)  # (pyroute2 runs a loop of its own)
        where = wake.targets(interfaces, interface, client)
        if not where:
            raise Refused(500, "this host has no IPv4 interface with a broadcast address to send the packet on")
        try:
            sent = await asyncio.to_thread(wake.send, mac, where)
        except OSError as e:
            raise Refused(500, f"cannot send the magic packet: {e.strerror}") from None
        log.info("wake: magic packet for %s sent on %s", mac, ", ".join(sent))
        return sent
