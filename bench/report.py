"""BENCHMARKS.md, one section at a time: a benchmark run alone rewrites its own section and leaves the others
as they were measured."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def update_section(heading: str, text: str) -> None:
    """Replace the section that starts with the line `heading` (up to the next "## " heading) by `text`, or
    append `text` when there is no such section."""
    current = BENCHMARKS.read_text()
    start = current.find(heading + "\n")
    if start >= 0:
        end = current.find("\n## ", start + len(heading))
        current = current[:start] + text.rstrip() + "\n" + (current[end:] if end >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    BENCHMARKS.write_text(current)
    print(f"bench: updated {BENCHMARKS.name}", file=sys.stderr)


def publish(heading: str, text: str, update: bool) -> str:
    """Print a benchmark's section, and with `update` write it into BENCHMARKS.md; returns it."""
    print(text)
    if update:
        update_section(heading, text)
    return text


def arguments(doc: str | None, runs: int = 5) -> argparse.ArgumentParser:
    """A benchmark's command line: --runs, and --update to write its section of BENCHMARKS.md."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--update", action="store_true", help="replace this section of BENCHMARKS.md")
    return p
