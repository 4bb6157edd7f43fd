"""What the status listener may change, through an interface the server hands it (the status package never imports
the server): the machines' tables (in the machines file, or with --database in the site's database), and a
machine's power.

    put(mac, table)    the machine's table added or replaced; True when added
    delete(mac)        the machine's table removed
    wake(mac)          a Wake-on-LAN magic packet sent to it; where it went
    profiles()         the profiles a machine may be given (for the page's adoption form)

A write is refused with `Refused(status, reason)`: 400 for a table the machines file would not load with, 404 for a
machine it does not list, 409 when there is no machines file to write, 500 when it cannot be written, 503 when the
site's database cannot be reached.
"""

from __future__ import annotations

from typing import Any, Protocol

from netboot.core.errors import NetbootError


class Refused(NetbootError):
    """A change the listener answers with `status` and this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Inventory(Protocol):
    def profiles(self) -> list[str]: ...

    async def put(self, mac: str, table: dict[str, Any]) -> bool: ...

    async def delete(self, mac: str) -> None: ...

    async def wake(self, mac: str) -> list[str]: ...
