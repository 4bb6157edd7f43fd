"""The server's DUID (option 2): made once, from an interface's MAC, and kept in the state directory.

RFC 8415 §11: a DUID must not change, across restarts or a replaced network card, so a server stores the one it
made rather than deriving it at every start. A DUID-LLT (type 1, §11.2) from the first Ethernet interface's MAC
and the time, as ISC's and Kea's servers make theirs; with no Ethernet interface, a DUID-UUID (type 4, RFC 6355).
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from netboot.core.durable import replace, sync_dir
from netboot.core.errors import NetbootError

FILE = "dhcp6-server-duid"
_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC, where DUID-LLT times start (RFC 8415 §11.2)


def make(macs: Mapping[int, bytes], now: float | None = None) -> bytes:
    """A new DUID: DUID-LLT of the lowest-numbered interface with an Ethernet MAC, else DUID-UUID."""
    for _, mac in sorted(macs.items()):
        if len(mac) == 6 and any(mac) and not mac[0] & 1:
            seconds = int((time.time() if now is None else now) - _EPOCH) & 0xFFFFFFFF
            return struct.pack("!HHI", 1, 1, seconds) + mac
    return struct.pack("!H", 4) + uuid.uuid4().bytes


def load(state_dir: Path, macs: Mapping[int, bytes]) -> bytes:
    """The DUID kept in `state_dir` (hex on one line), made and written there first when there is none."""
    path = state_dir / FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as e:
        raise NetbootError(f"cannot read the DHCPv6 server DUID {path}: {e}") from None
    if text is not None:
        try:
            duid = bytes.fromhex(text)
        except ValueError:
            duid = b""
        if not 3 <= len(duid) <= 130:
            raise NetbootError(f"{path}: not a DUID (3 to 130 bytes in hex); remove it to make a new one")
        return duid
    duid = make(macs)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        replace(path, f"{duid.hex()}\n".encode())
        sync_dir(state_dir)
    except OSError as e:
        raise NetbootError(f"cannot write the DHCPv6 server DUID in --state-dir {state_dir}: {e.strerror}") from None
    return duid
