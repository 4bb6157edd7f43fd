"""`netboot serve` with option 175 left out of its DHCP replies: how it answered iPXE before it said no-pxedhcp
(175.176 = 1), for the "before" of bench/dhcp_bench.py's iPXE section, on the same code and the same machine.

    python bench/serve_without_175.py serve ARGS...   (the arguments of `netboot serve`)

Nothing shipped has a switch for this: the option is taken out where replies become bytes (message.Reply.encode),
and each reply it is taken from is logged ("bench: option 175 left out"), so the bench can check it was.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netboot.cli import main
from netboot.dhcp import message

NAME = "ipxe_encapsulated"
assert message.OPTIONS[NAME][0] == 175, "netboot's codec names option 175 otherwise: follow it here"
_encode = message.Reply.encode
log = logging.getLogger("netboot.dhcp")


def encode_without_175(reply: message.Reply) -> bytes:
    if reply.options and NAME in reply.options:
        reply.options = {name: value for name, value in reply.options.items() if name != NAME}
        log.info("dhcp: bench: option 175 left out of the %s to %s", reply.type.name, reply.request.mac)
    return _encode(reply)


message.Reply.encode = encode_without_175  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
