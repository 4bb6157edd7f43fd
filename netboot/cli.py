"""Command line: `netboot build` (and, as they land, the serving commands)."""

from __future__ import annotations

import argparse
import logging
import sys

from netboot import __version__
from netboot.errors import NetbootError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="netboot", description="Boot machines over the network from a built system.")
    p.add_argument("--version", action="version", version=f"netboot {__version__}")
    p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="netboot: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except NetbootError as e:
        print(f"netboot: error: {e}", file=sys.stderr)
        return e.exit_status
