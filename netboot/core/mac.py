"""MAC addresses in any spelling users and firmware write them."""

from __future__ import annotations

import re

from netboot.core.errors import NetbootError

_HEX12 = re.compile(r"[0-9a-f]{12}")


class BadMac(NetbootError):
    pass


def normalize(text: str) -> str:
    """'52:54:00:12:34:56', '52-54-00-12-34-56', '525400123456', '5254.0012.3456', any case → '52:54:00:12:34:56';
    blanks around it are forgiven (what an operator types). A name a client sent is read by `exact`."""
    return exact(text.strip())


def exact(text: str) -> str:
    """`normalize` of one of the spellings and nothing else: a client's name with a MAC among blanks names no
    machine, and is refused rather than served and logged as that machine's."""
    bare = re.sub(r"[:\-.]", "", text.lower())
    parts = re.split(r"[:\-]", text)
    # Separated spellings must have six groups of two; a bare one twelve hex digits.
    if len(parts) not in (1, 6) or (len(parts) == 6 and any(len(p) != 2 for p in parts)):
        raise BadMac(f"invalid MAC address {text!r}")
    if not _HEX12.fullmatch(bare):
        raise BadMac(f"invalid MAC address {text!r}")
    return ":".join(bare[i : i + 2] for i in range(0, 12, 2))


def hyphenated(mac: str) -> str:
    """iPXE's ${mac:hexhyp} spelling, used in URLs."""
    return mac.replace(":", "-")
