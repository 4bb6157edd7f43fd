"""The documentation: README.md leads (at most 300 lines, every docs/ page linked), every flag of every command's
--help is documented in a docs/ page, and every relative link of README.md and docs/ leads to a file (and heading)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from support import ROOT

from netboot import cli
from netboot.tftp import command as tftp_command

README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Markdown links and images: [text](target) and ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def options(parser: argparse.ArgumentParser, command: str) -> Iterator[tuple[str, str]]:
    """(command, option string) for every long option of `parser` and of its subcommands, --help aside."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{command} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield from ((command, flag) for flag in action.option_strings if flag.startswith("--"))


def documented(flag: str, text: str) -> bool:
    # Whole flags only: --tftp is not documented by --tftp-workers.
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


def docs_text() -> str:
    return "\n".join(page.read_text() for page in sorted(DOCS.glob("*.md")))


def test_the_commands_have_flags_to_check() -> None:
    flags = {flag for _, flag in options(cli.parser(), "netboot")}
    assert {"--version", "--out", "--machines", "--dhcp", "--status-token-file", "--clear"} <= flags, flags
    assert {"--root", "--listen"} <= {flag for _, flag in options(tftp_command.parser(), "python -m netboot.tftp")}


def test_every_flag_of_every_help_is_documented_in_docs() -> None:
    text = docs_text()
    commands = [(cli.parser(), "netboot"), (tftp_command.parser(), "python -m netboot.tftp")]
    missing = [f"{command} {flag}" for parser, name in commands for command, flag in options(parser, name)
               if not documented(flag, text)]
    assert not missing, "documented in no docs/*.md page: " + ", ".join(missing)


def test_a_flag_named_nowhere_is_found_missing() -> None:
    parser = argparse.ArgumentParser(prog="netboot")
    parser.add_argument("--tftp-worker")  # a prefix of a documented flag, documented nowhere itself
    assert [flag for _, flag in options(parser, "netboot") if not documented(flag, docs_text())] == ["--tftp-worker"]


def test_the_readme_leads_in_at_most_300_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move reference text into docs/"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "no docs/*.md"
    unlinked = [page.name for page in pages if page.resolve() not in linked]
    assert not unlinked, "docs pages README.md does not link: " + ", ".join(unlinked)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them: lower case, punctuation but `-` and `_` dropped,
    blanks as `-` (code blocks' `#` lines are no headings)."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"#+ (.*)", line)):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-"))
    return found


def test_every_relative_link_leads_to_a_file_and_heading() -> None:
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # another site's address
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to no file or heading: " + ", ".join(broken)
