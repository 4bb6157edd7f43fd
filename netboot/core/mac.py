"""MAC addresses in any spelling users and firmware write them."""

from __future__ import annotations

import re

from netboot.core.errors import NetbootError

_HEX12 = re.compile(r"[0-9a-f]{12}")


class BadMac(NetbootError):
    pass


def normalize(text: str) -> str:
    """'52:54:00:12:34:56', '52-54-00-12-34-56', '525400123456', '5254.0012.3456', any case → '52:54:00:12:34:56'."""
    bare = re.sub(r"[:\-.]", "", text.strip().lower())
    parts = re.split(r"[:\-]", text.strip())
    # Separated spellings must have six groups of two; a bare one twelve hex digits.
    if len(parts) not in (1, 6) or (len(parts) == 6 and any(len(p) != 2 for p in parts)):
        raise BadMac(f"invalid MAC address {text!r}")
    if not _HEX12.fullmatch(bare):
        raise BadMac(f"invalid MAC address {text!r}")
    return ":".join(bare[i : i + 2] for i in range(0, 12, 2))


def hyphenated(mac: str) -> str:
    """iPXE's ${mac:hexhyp} spelling, used in URLs."""
    return mac.replace(":", "-")
