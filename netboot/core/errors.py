"""The one exception type that reaches the user as a one-line message, and the one for listeners that cannot bind."""

import errno
import os


class NetbootError(Exception):
    """A problem with the user's input or environment; the CLI prints it on one line and exits 2."""

    exit_status = 2


def cannot_listen(what: str, where: str, port: int, error: OSError, fix: str = "") -> NetbootError:
    """The error of a listener that could not bind: `what` (TFTP, HTTP…) on `where`, why, and what to do."""
    # (asyncio's servers spell out their own "error while attempting to bind on address…": the errno says it)
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EACCES and 0 < port < 1024:
        # Binding a port below 1024 takes CAP_NET_BIND_SERVICE (capabilities(7)); the unit grants it, not root.
        fix = "ports below 1024 need root or CAP_NET_BIND_SERVICE, as contrib/netboot.service grants"
    return NetbootError(f"cannot listen for {what} on {where}: {reason}" + (f" ({fix})" if fix else ""))
