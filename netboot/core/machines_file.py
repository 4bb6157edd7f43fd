"""Writing the machines file: one machine's table added, replaced or removed, everything else as it was.

tomlkit edits the text: it keeps comments, blank lines, the order and the spelling of everything it is not told
to change (tomllib, which reads the file, keeps none of that). `rewrite` puts the result in place: the caller
checks it as a load would first, and it replaces the file in one step, so that a reader sees the old file or
the new one, never a part of either.

Nothing is lost to another writer. netboot's writers take turns (a lock on the file's directory, flock(2), held
for a whole write), and each edits the file as it is on disk, not as it was loaded. Against anyone else, a hand
edit included, `rewrite` swaps its new file
in with renameat2(RENAME_EXCHANGE), which hands back the file it displaced: if that is not the text the edit
started from, someone saved the file in between, and the edit is made again on what they saved, which is then
put in place the same way (an edit that their text makes invalid puts their text back and fails). So an editor
that saves by renaming (vim, emacs, sed -i, most tools) never loses a change to netboot, nor netboot to it; what
no one can tell apart is a change written into the file in place (`>>`) at the very moment of the swap.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomlkit
import tomlkit.items
from tomlkit.exceptions import TOMLKitError

from netboot.core import mac as macs
from netboot.core.durable import exchange, sync_dir
from netboot.core.errors import NetbootError
from netboot.core.logtext import clip

log = logging.getLogger("netboot.serve")

T = TypeVar("T")
_ROUNDS = 16  # edits made again on what another writer saved meanwhile, at most, before giving up


class NotListed(NetbootError):
    """The machines file has no table for this MAC."""


class Unwritable(NetbootError):
    """The machines file cannot be read or replaced (permissions, a read-only or full file system)."""


def put_machine(text: str, mac: str, table: Mapping[str, Any]) -> tuple[str, bool]:
    """`text` with the table of `mac` (normalized) replaced by `table`, or added at the end of the machines; True
    when it is added. Keys the table keeps stay where they are, with their comments; new keys go after its last
    key; a table's values (template variables) are written inline, so that the machine stays one table."""
    doc = _parse(text)
    machines = doc.get("machines")
    if machines is None:
        machines = tomlkit.table(is_super_table=True)
        doc["machines"] = machines
    elif not isinstance(machines, tomlkit.items.Table | tomlkit.items.InlineTable):
        raise NetbootError("machines must be a table")
    key = _key_of(machines, mac)
    if key is None:
        new = tomlkit.inline_table() if isinstance(machines, tomlkit.items.InlineTable) else tomlkit.table()
        for k, v in table.items():
            new[k] = _value(v)
        machines[mac] = new
        return doc.as_string(), True
    current = machines[key]
    if not isinstance(current, tomlkit.items.Table | tomlkit.items.InlineTable):
        raise NetbootError(f"machines.{key!r} must be a table")
    for k in [k for k in current if k not in table]:
        del current[k]
    added: dict[str, Any] = {}
    for k, v in table.items():
        if k in current:
            if current[k] != v:  # (unchanged values keep their spelling)
                current[k] = _value(v)
        elif isinstance(current, tomlkit.items.Table):
            added[k] = v
        else:
            current[k] = _value(v)
    if not added:
        return doc.as_string(), False
    return _with_keys(doc, current, added), False


_ANCHOR = "# netboot: new keys go after this line "


def _with_keys(doc: tomlkit.TOMLDocument, table: tomlkit.items.Table, added: Mapping[str, Any]) -> str:
    """`doc`'s text with `added` put in `table` after its last key, or after its header when it has none.

    Table.add would put them after the comments at the table's end, which are often the heading of the table
    below (tomlkit keeps a comment with the table above it), and tomlkit has no public way to insert a key
    elsewhere. So: the line to follow is marked with a comment, the new keys' lines go after it in the text, and
    the mark gives the line its own comment back."""
    if table.is_super_table():  # (no header: its keys are dotted, `"52:54:…".profile = …`; tomlkit spells them)
        for k, v in added.items():
            table.add(k, _value(v))
        return doc.as_string()
    items = table.value
    plain = [k for k in items if not isinstance(items.item(k), tomlkit.items.Table | tomlkit.items.AoT)]
    anchor: tomlkit.items.Item = items.item(plain[-1]) if plain else table
    trivia = anchor.trivia
    ws, comment = trivia.comment_ws, trivia.comment
    mark = _ANCHOR + secrets.token_hex(16)  # (text that no file holds)
    anchor.comment(mark)
    text = doc.as_string()
    trivia.comment_ws, trivia.comment = ws, comment
    mark = " " + mark
    at = text.find(mark)
    if at < 0:  # (every table with a header renders the header's comment: not expected)
        raise NetbootError("the machines file cannot take a new key there; add it by hand")
    end = text.find("\n", at)
    end = len(text) if end < 0 else end + 1
    lines = tomlkit.document()
    for k, v in added.items():
        lines.add(k, _value(v))
    indent = trivia.indent if plain else ""
    new = "".join(indent + line for line in lines.as_string().splitlines(keepends=True))
    head = text[:at] + ws + comment + text[at + len(mark):end]
    return head + ("" if head.endswith("\n") else "\n") + new + text[end:]


def delete_machine(text: str, mac: str) -> str:
    """`text` without the table of `mac` (normalized), nor the comments that are about it: the lines right above
    its header and right below its last line (no blank line between); NotListed if there is none."""
    doc = _parse(text)
    machines = doc.get("machines")
    key = _key_of(machines, mac) if isinstance(machines, tomlkit.items.Table | tomlkit.items.InlineTable) else None
    if key is None:
        raise NotListed(f"{mac} has no table in the machines file (tables keyed by UUID or serial are edited by hand)")
    del machines[key]
    after = doc.as_string()
    # tomlkit takes the table out with what it holds: the comments at its end too, which are often the heading of
    # what follows (tomlkit keeps a comment with the table above it). Line by line: where the text parts, the
    # lines taken out.
    parted = next((i for i, (a, b) in enumerate(zip(text, after, strict=False)) if a != b), len(after))
    start = text.rfind("\n", 0, parted) + 1
    end = start + len(text) - len(after)
    if text[:start] + text[end:] != after:
        return after  # (not one run of whole lines: leave it to tomlkit)
    removed = text[start:end].splitlines(keepends=True)
    last = max((i for i, line in enumerate(removed) if line.strip() and not line.lstrip().startswith("#")),
               default=-1)
    tail = removed[last + 1:]
    blank = next((i for i, line in enumerate(tail) if not line.strip()), len(tail))
    kept = "".join(tail[blank:])  # from its first blank line on: the heading of what follows, kept
    above = start
    while above > 0:  # its own heading: the comment lines right above its header
        line_start = text.rfind("\n", 0, above - 1) + 1
        if not text[line_start:above].lstrip().startswith("#"):
            break
        above = line_start
    if above == 0 or text[:above].endswith("\n\n"):
        kept = kept.lstrip("\n")  # one blank line between what was above and what follows, as before
    trimmed = text[:above] + kept + text[end:]
    if not kept and not text[end:]:
        trimmed = trimmed.rstrip("\n") + "\n"  # it was the last thing in the file: no blank line left after it
    # Only comment and blank lines move: anything else (a line of a multi-line string) would change what it says.
    return trimmed if tomllib.loads(trimmed) == tomllib.loads(after) else after


def rewrite(path: Path, edit: Callable[[str], str], check: Callable[[str], T]) -> tuple[T, os.stat_result]:
    """Replace the machines file at `path` by `edit(its text)`, once `check` (which raises NetbootError for a
    file that would not load) accepts it; returns `check`'s result and the new file's stat (what a watcher of
    the file sees now). A NetbootError from `edit` or `check` leaves the file as it was. See the module's
    docstring for other writers."""
    real = Path(os.path.realpath(path))  # (a link to the file: the file itself is replaced, the link kept)
    try:
        directory = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise Unwritable(f"cannot open the directory of the machines file {real}: {e.strerror}") from None
    try:
        # The file itself cannot be locked: each write replaces it. Writers that did not take turns could each
        # take another's text that is about to be redone for what was saved (see the module's docstring).
        fcntl.flock(directory, fcntl.LOCK_EX)
        return _rewrite(path, real, edit, check)
    finally:
        os.close(directory)  # (and the lock with it)


def _rewrite(path: Path, real: Path, edit: Callable[[str], str], check: Callable[[str], T]
             ) -> tuple[T, os.stat_result]:
    theirs = _read(real)
    ours: str | None = None  # what this call last put in place
    for _ in range(_ROUNDS):
        failed: NetbootError | None = None
        try:
            target = edit(theirs)
            result = check(target)
        except NetbootError as e:
            if ours is None:
                raise
            target, failed = theirs, e  # their text, which the edit cannot go onto, goes back in place
        expected = theirs if ours is None else ours
        displaced, written = _swap_in(real, target, expected)
        if displaced == expected:
            if failed is not None:
                raise failed
            return result, written
        log.info("machines file: %s was saved while it was being written: the edit is made again on it", path)
        theirs, ours = displaced, target
    raise NetbootError(f"{path} kept changing while it was being written; try again")


def _swap_in(real: Path, text: str, expected: str) -> tuple[str, os.stat_result]:
    """Put `text` in place of the file and return the text it displaced (`expected`, unless someone else wrote
    the file meanwhile) and the new file's stat. The new file has the old one's mode; it and its name are made
    durable."""
    directory = real.parent
    try:
        mode = os.stat(real).st_mode & 0o7777
        fd, temp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".netboot-write", dir=directory)
    except OSError as e:
        raise Unwritable(f"cannot write the machines file {real}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
            written = os.fstat(f.fileno())  # (a rename keeps the inode, mtime and size)
        if exchange(temp, real):
            displaced = _read(Path(temp))
        else:
            # No RENAME_EXCHANGE on this file system: look just before renaming instead (a narrower window).
            displaced = _read(real)
            if displaced == expected:
                os.replace(temp, real)
        sync_dir(directory)
        return displaced, written
    except OSError as e:
        raise Unwritable(f"cannot write the machines file {real}: {e.strerror}") from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise Unwritable(f"cannot read the machines file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise NetbootError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse(text: str) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except TOMLKitError as e:
        raise NetbootError(f"the machines file is not valid TOML: {e}") from None


def _key_of(machines: Any, mac: str) -> str | None:
    """The key of `mac`'s table, in whatever spelling the file gives it."""
    for key in machines:
        try:
            if macs.normalize(str(key)) == mac:
                return str(key)
        except macs.BadMac:
            continue
    return None


def _value(value: Any) -> Any:
    """A JSON value as a TOML item; tables inline, so that they stay inside the machine's table."""
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        for k, v in value.items():
            table[k] = _value(v)
        return table
    if isinstance(value, list):
        array = tomlkit.array()
        for v in value:
            array.append(_value(v))
        return array
    return tomlkit.item(value)


MAX_DEPTH = 8  # tables and arrays within a machine's table, at most
MAX_VALUES = 512  # keys and array items in a machine's table, at most: tomlkit takes seconds for thousands
_KEY_SHOWN = 64  # characters of a key an error names


def table_from_json(body: Any) -> dict[str, Any]:
    """A machine's table from a JSON object: `profile`, `hostname`, `ip`, `append`, `ipxe_binary`, and its template
    variables, as keys of their own or gathered in `vars`; what TOML cannot hold (null, a string that is not
    Unicode) is refused, and so is a table too large to be a machine's. Whether the file loads with it is the
    caller's to check."""
    if not isinstance(body, dict):
        raise NetbootError("the body must be a JSON object: the machine's table")
    table = {k: v for k, v in body.items() if k != "vars"}
    variables = body.get("vars", {})
    if not isinstance(variables, dict):
        raise NetbootError("vars must be an object of template variables")
    for key in variables:
        if key in table:
            raise NetbootError(f"{clip(key, _KEY_SHOWN)} is given twice: as a key and in vars")
    table.update(variables)
    _check_value(table, "the table", 0, [MAX_VALUES])
    return table


def _check_value(value: Any, where: str, depth: int, left: list[int]) -> None:
    if value is None:
        raise NetbootError(f"{where}: null has no TOML spelling (leave the key out)")
    if depth > MAX_DEPTH:
        raise NetbootError(f"{where}: nested deeper than {MAX_DEPTH}")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict | list):
        left[0] -= len(value)
        if left[0] < 0:
            raise NetbootError(f"the table has more than {MAX_VALUES} keys and array items")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, f"{where}: a key")
            inner = clip(k, _KEY_SHOWN) if depth == 0 else f"{where}.{clip(k, _KEY_SHOWN)}"
            _check_value(v, inner, depth + 1, left)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]", depth + 1, left)


def _check_text(text: str, where: str) -> None:
    # JSON's \ud800-\udfff escapes decode to lone surrogates, which no UTF-8 file can hold.
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise NetbootError(f"{where}: a string with a lone surrogate (\\u{ord(text[e.start]):04x}) is not "
                           "Unicode text") from None
